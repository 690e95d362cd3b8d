use std::fmt::Write as _;

use schemars::{Schema, SchemaGenerator};

use crate::authz::AuthzDecided;
use crate::session::{
    SessionEnded, SessionRecordingChunk, SessionRecordingEnded, SessionRecordingStarted,
    SessionStarted,
};
use crate::shield::{ShieldIpBanned, ShieldIpUnbanned, SshAuthFailed};
use crate::user::{
    OrgCreated, UserApproved, UserIdentityLinked, UserOrganizationSet, UserWaitlisted,
};
use crate::user::{
    UserCreated, UserLocked, UserLoginFailed, UserPasswordSet, UserPatCreated, UserPatRevoked,
    UserRolesSet, UserSshCertificateIssued, UserSshKeyAdded, UserSshKeyRemoved,
};
use crate::workspace::{
    WorkspaceDeleted, WorkspaceFailed, WorkspaceIdleWarning, WorkspaceProvisioning,
    WorkspaceRequested, WorkspaceRunning, WorkspaceStopScheduled, WorkspaceStopped,
    WorkspaceStopping,
};
use crate::{Context, EventData, SUBJECT_PREFIX};

/// Catalogue entry for one event type.
pub struct EventTypeInfo {
    /// CloudEvents `type`.
    pub event_type: &'static str,
    /// Context (stream) carrying it.
    pub context: Context,
    /// What happened.
    pub description: &'static str,
    /// Name of the Rust payload type (and of its schema definition).
    pub rust_type: &'static str,
    schema: fn(&mut SchemaGenerator) -> Schema,
}

fn entry<E: EventData>(rust_type: &'static str) -> EventTypeInfo {
    EventTypeInfo {
        event_type: E::TYPE,
        context: E::CONTEXT,
        description: E::DESCRIPTION,
        rust_type,
        schema: |generator| E::json_schema(generator),
    }
}

/// Returns every event type, grouped by context.
pub fn catalogue() -> Vec<EventTypeInfo> {
    vec![
        entry::<AuthzDecided>("AuthzDecided"),
        entry::<SshAuthFailed>("SshAuthFailed"),
        entry::<ShieldIpBanned>("ShieldIpBanned"),
        entry::<ShieldIpUnbanned>("ShieldIpUnbanned"),
        entry::<SessionStarted>("SessionStarted"),
        entry::<SessionEnded>("SessionEnded"),
        entry::<SessionRecordingStarted>("SessionRecordingStarted"),
        entry::<SessionRecordingChunk>("SessionRecordingChunk"),
        entry::<SessionRecordingEnded>("SessionRecordingEnded"),
        entry::<UserCreated>("UserCreated"),
        entry::<UserRolesSet>("UserRolesSet"),
        entry::<UserPasswordSet>("UserPasswordSet"),
        entry::<UserLoginFailed>("UserLoginFailed"),
        entry::<UserLocked>("UserLocked"),
        entry::<UserSshKeyAdded>("UserSshKeyAdded"),
        entry::<UserSshKeyRemoved>("UserSshKeyRemoved"),
        entry::<UserPatCreated>("UserPatCreated"),
        entry::<UserPatRevoked>("UserPatRevoked"),
        entry::<UserSshCertificateIssued>("UserSshCertificateIssued"),
        entry::<UserIdentityLinked>("UserIdentityLinked"),
        entry::<UserWaitlisted>("UserWaitlisted"),
        entry::<UserApproved>("UserApproved"),
        entry::<UserOrganizationSet>("UserOrganizationSet"),
        entry::<OrgCreated>("OrgCreated"),
        entry::<WorkspaceRequested>("WorkspaceRequested"),
        entry::<WorkspaceProvisioning>("WorkspaceProvisioning"),
        entry::<WorkspaceRunning>("WorkspaceRunning"),
        entry::<WorkspaceStopping>("WorkspaceStopping"),
        entry::<WorkspaceStopped>("WorkspaceStopped"),
        entry::<WorkspaceFailed>("WorkspaceFailed"),
        entry::<WorkspaceDeleted>("WorkspaceDeleted"),
        entry::<WorkspaceIdleWarning>("WorkspaceIdleWarning"),
        entry::<WorkspaceStopScheduled>("WorkspaceStopScheduled"),
    ]
}

/// Returns one JSON Schema document whose `$defs` hold every payload, keyed
/// by event type, and whose `oneOf` is the CloudEvents envelope per type.
pub fn json_schema_document() -> serde_json::Value {
    let mut generator = SchemaGenerator::default();
    let mut payloads = serde_json::Map::new();
    for info in catalogue() {
        payloads.insert(
            info.event_type.to_owned(),
            (info.schema)(&mut generator).to_value(),
        );
    }
    let mut defs = serde_json::Map::new();
    for (name, schema) in generator.definitions() {
        defs.insert(name.clone(), schema.clone());
    }
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://k8shell.dev/schemas/events.schema.json",
        "title": "k8shell event payloads",
        "description": "The `data` of each k8shell CloudEvent, keyed by its `type`.",
        "$defs": defs,
        "properties": payloads,
    })
}

/// Renders the catalogue of subjects and types as Markdown for `docs/events.md`.
pub fn catalogue_markdown() -> String {
    let mut out = String::new();
    let schema = json_schema_document();
    out.push_str("# Event catalogue\n\n");
    out.push_str(
        "Generated from `crates/events` by `K8SHELL_UPDATE_DOCS=1 cargo test -p k8shell-events`; \
         do not edit by hand. The JSON Schema of every payload is in \
         [`schemas/events.schema.json`](schemas/events.schema.json).\n\n",
    );
    out.push_str("Every event is a CloudEvents 1.0 structured-JSON document (`specversion`, `id`, `source`, \
`type`, `subject`, `time`, `datacontenttype`, `data`, optional `traceparent`) published with the NATS headers \
`Nats-Msg-Id` (= `id`) and `traceparent`. `subject` is the aggregate id.\n\n");
    out.push_str("## Streams and subjects\n\n| context | stream | subjects |\n|---|---|---|\n");
    for context in Context::ALL {
        let _ = writeln!(
            out,
            "| {context} | `K8SHELL_{}` | `{SUBJECT_PREFIX}.{context}.<aggregate-id>` |",
            context.as_str().to_uppercase()
        );
    }
    out.push_str("\n## Types\n");
    for context in Context::ALL {
        let entries: Vec<EventTypeInfo> = catalogue()
            .into_iter()
            .filter(|e| e.context == context)
            .collect();
        if entries.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n### {context}\n");
        for info in entries {
            let _ = writeln!(out, "#### `{}`\n\n{}\n", info.event_type, info.description);
            let _ = writeln!(out, "Payload `{}`:\n", info.rust_type);
            out.push_str("| field | type | required | description |\n|---|---|---|---|\n");
            let payload = &schema["properties"][info.event_type];
            let required: Vec<&str> = payload["required"]
                .as_array()
                .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            if let Some(props) = payload["properties"].as_object() {
                for (field, spec) in props {
                    let ty = spec["type"].as_str().unwrap_or("object");
                    let doc = spec["description"]
                        .as_str()
                        .unwrap_or("")
                        .replace('\n', " ");
                    let req = if required.contains(&field.as_str()) {
                        "yes"
                    } else {
                        "no"
                    };
                    let _ = writeln!(out, "| `{field}` | {ty} | {req} | {doc} |");
                }
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn type_names_are_unique_versioned_and_in_their_context() {
        let mut seen = HashSet::new();
        for info in catalogue() {
            assert!(
                seen.insert(info.event_type),
                "duplicate type {}",
                info.event_type
            );
            let prefix = format!("k8shell.{}.", info.context);
            assert!(
                info.event_type.starts_with(&prefix),
                "{} outside {prefix}",
                info.event_type
            );
            let version = info.event_type.rsplit('.').next().unwrap();
            assert!(version.starts_with('v') && version[1..].parse::<u32>().is_ok());
        }
    }

    /// The generated docs are committed; this fails when they drift from the
    /// code. Run with `K8SHELL_UPDATE_DOCS=1` to rewrite them.
    #[test]
    fn committed_catalogue_and_schema_are_current() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        let markdown = catalogue_markdown();
        let schema = serde_json::to_string_pretty(&json_schema_document()).unwrap() + "\n";
        let md_path = docs.join("events.md");
        let schema_path = docs.join("schemas/events.schema.json");
        if std::env::var_os("K8SHELL_UPDATE_DOCS").is_some() {
            std::fs::create_dir_all(docs.join("schemas")).unwrap();
            std::fs::write(&md_path, &markdown).unwrap();
            std::fs::write(&schema_path, &schema).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&md_path).unwrap_or_default(),
            markdown,
            "docs/events.md is stale"
        );
        assert_eq!(
            std::fs::read_to_string(&schema_path).unwrap_or_default(),
            schema,
            "events.schema.json is stale"
        );
    }
}
