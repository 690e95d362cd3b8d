//! From a blueprint to the spec of one workspace: every CEL expression is
//! evaluated, every default filled in. Runtimes only ever see a
//! [`WorkspaceSpec`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::catalog::{parse_idle_timeout, valid_quantity};
use super::expr::{CelScope, EvalError, Evaluator, Expr};
use super::model::{
    Blueprint, ExposedPort, PodmanSidecar, PullPolicy, SecurityContext, SharedScope, StorageKind,
    Toleration,
};

/// A blueprint could not be turned into a workspace spec.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The blueprint is a template.
    #[error("blueprint {0:?} is a template and can't be provisioned")]
    Template(String),
    /// An expression failed.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// An evaluated value is invalid.
    #[error("{path}: {message}")]
    Invalid {
        /// Field path.
        path: String,
        /// Why.
        message: String,
    },
    /// The CEL scope could not be built.
    #[error("cannot build the CEL scope: {0}")]
    Scope(String),
}

/// The workspace account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceUser {
    /// Login name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
    /// Passwordless sudo.
    pub sudo: bool,
}

/// A volume with its values evaluated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedStorage {
    /// Name in the blueprint.
    pub name: String,
    /// Kind.
    pub kind: StorageKindName,
    /// Mount path.
    pub path: String,
    /// Capacity.
    pub size: Option<String>,
    /// Kept after delete.
    pub retain: bool,
    /// Sharing scope (shared only).
    pub global: bool,
    /// Read-only mount.
    pub read_only: bool,
}

/// Storage kind, serialisable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StorageKindName {
    /// Per workspace, persistent.
    Local,
    /// Between workspaces, persistent.
    Shared,
    /// Pod lifetime.
    EmptyDir,
    /// Pod lifetime, in memory.
    Memory,
}

/// An init script with its values evaluated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedInitScript {
    /// Name.
    pub name: String,
    /// Script.
    pub script: String,
    /// Run as root.
    pub as_root: bool,
}

/// An app with its values evaluated (k8shelld's app config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedApp {
    /// Name.
    pub name: String,
    /// argv.
    pub command: Vec<String>,
    /// Binary that must exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// Install script.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install: Option<String>,
    /// Install as root.
    pub install_as_root: bool,
    /// Port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `http` or `tcp`.
    pub protocol: String,
    /// `always`, `on-failure`, `never`.
    pub restart: String,
    /// Started with the workspace.
    pub autostart: bool,
    /// Environment.
    pub env: BTreeMap<String, String>,
}

/// Everything a runtime needs to run one workspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceSpec {
    /// Workspace id.
    pub workspace_id: String,
    /// Owner.
    pub username: String,
    /// Blueprint name.
    pub blueprint: String,
    /// Image.
    pub image: String,
    /// Pull policy.
    pub pull_policy: String,
    /// The account.
    pub user: WorkspaceUser,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Pod labels (the runtime adds its own `k8shell.io/*` labels).
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// CPU request.
    pub cpu_request: Option<String>,
    /// Memory request.
    pub memory_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
    /// Node selector.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations, as Kubernetes JSON.
    pub tolerations: Vec<serde_json::Value>,
    /// Volumes.
    pub storages: Vec<ResolvedStorage>,
    /// Init scripts.
    pub init_scripts: Vec<ResolvedInitScript>,
    /// Apps.
    pub apps: Vec<ResolvedApp>,
    /// Exposed ports: (name, port, protocol, public).
    pub ports: Vec<(String, u16, String, bool)>,
    /// Podman sidecar image, when enabled.
    pub podman_sidecar: Option<String>,
    /// Network policy class.
    pub network_policy: Option<String>,
    /// Privileged container.
    pub privileged: bool,
    /// Capabilities added.
    pub add_capabilities: Vec<String>,
    /// Capabilities dropped.
    pub drop_capabilities: Vec<String>,
    /// Connection banner.
    pub splash: Option<String>,
    /// Idle auto-stop; `None` never stops.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

/// Default podman sidecar image on Kubernetes.
pub const DEFAULT_PODMAN_IMAGE: &str = "quay.io/podman/stable";

/// Resolves `blueprint` for one workspace.
pub fn resolve(blueprint: &Blueprint, scope: &CelScope) -> Result<WorkspaceSpec, ResolveError> {
    if blueprint.is_template {
        return Err(ResolveError::Template(blueprint.name.clone()));
    }
    let ev = Evaluator::new(scope).map_err(ResolveError::Scope)?;
    let opt = |path: &str, value: &Option<Expr<String>>| -> Result<Option<String>, EvalError> {
        value.as_ref().map(|v| ev.eval(path, v)).transpose()
    };
    let map = |field: &str,
               values: &BTreeMap<String, Expr<String>>|
     -> Result<BTreeMap<String, String>, EvalError> {
        values
            .iter()
            .map(|(k, v)| Ok((k.clone(), ev.eval(&format!("{field}.{k}"), v)?)))
            .collect()
    };
    let workspace_id = json_str(&scope.workspace, "id");
    let username = json_str(&scope.user, "username");

    let image = opt("image", &blueprint.image)?.unwrap_or_default();
    if image.trim().is_empty() {
        return Err(invalid("image", "is empty"));
    }
    let user_name = opt("user.name", &blueprint.user.name)?.unwrap_or_else(|| username.clone());
    if !valid_login(&user_name) {
        return Err(invalid(
            "user.name",
            &format!("{user_name:?} is not a valid login name"),
        ));
    }
    let uid = match &blueprint.user.uid {
        Some(uid) => ev.eval("user.uid", uid)?,
        None => 1000,
    };
    if uid == 0 {
        return Err(invalid(
            "user.uid",
            "0 is root; the workspace user must not be root",
        ));
    }
    let gid = match &blueprint.user.gid {
        Some(gid) => ev.eval("user.gid", gid)?,
        None => uid,
    };
    let user = WorkspaceUser {
        home: opt("user.home", &blueprint.user.home)?
            .unwrap_or_else(|| format!("/home/{user_name}")),
        shell: opt("user.shell", &blueprint.user.shell)?.unwrap_or_else(|| "/bin/bash".to_owned()),
        sudo: blueprint.user.sudo.unwrap_or(false),
        name: user_name,
        uid,
        gid,
    };

    let quantity =
        |path: &str, value: &Option<Expr<String>>| -> Result<Option<String>, ResolveError> {
            let value = opt(path, value)?;
            match value {
                Some(q) if !valid_quantity(&q) => {
                    Err(invalid(path, &format!("{q:?} is not a quantity")))
                }
                other => Ok(other),
            }
        };

    let mut storages = Vec::with_capacity(blueprint.storages.len());
    for (index, storage) in blueprint.storages.iter().enumerate() {
        let path = ev.eval(&format!("storages[{index}].path"), &storage.path)?;
        if !path.starts_with('/') {
            return Err(invalid(
                &format!("storages[{index}].path"),
                "must be an absolute path",
            ));
        }
        storages.push(ResolvedStorage {
            name: storage.name.clone(),
            kind: match storage.kind {
                StorageKind::Local => StorageKindName::Local,
                StorageKind::Shared => StorageKindName::Shared,
                StorageKind::EmptyDir => StorageKindName::EmptyDir,
                StorageKind::Memory => StorageKindName::Memory,
            },
            path,
            size: quantity(&format!("storages[{index}].size"), &storage.size)?,
            retain: storage.retain,
            global: storage.scope == Some(SharedScope::Global),
            read_only: storage.read_only,
        });
    }

    let init_scripts = blueprint
        .init_scripts
        .iter()
        .enumerate()
        .map(|(index, script)| {
            Ok(ResolvedInitScript {
                name: script.name.clone(),
                script: ev.eval(&format!("initScripts[{index}].script"), &script.script)?,
                as_root: script.as_root,
            })
        })
        .collect::<Result<Vec<_>, EvalError>>()?;

    let mut apps = Vec::with_capacity(blueprint.apps.len());
    for (index, app) in blueprint.apps.iter().enumerate() {
        let command = app
            .command
            .iter()
            .enumerate()
            .map(|(arg, value)| ev.eval(&format!("apps[{index}].command[{arg}]"), value))
            .collect::<Result<Vec<_>, _>>()?;
        if command.is_empty() {
            return Err(invalid(&format!("apps[{index}].command"), "is empty"));
        }
        apps.push(ResolvedApp {
            name: app.name.clone(),
            command,
            binary: app.binary.clone(),
            install: opt(&format!("apps[{index}].install"), &app.install)?,
            install_as_root: app.install_as_root,
            port: app.port,
            protocol: app.protocol.clone().unwrap_or_else(|| "http".to_owned()),
            restart: app.restart.clone().unwrap_or_else(|| "always".to_owned()),
            autostart: app.autostart.unwrap_or(true),
            env: map(&format!("apps[{index}].env"), &app.env)?,
        });
    }

    let idle_timeout = match opt("idleTimeout", &blueprint.idle_timeout)? {
        Some(value) => parse_idle_timeout(&value).map_err(|m| invalid("idleTimeout", &m))?,
        None => None,
    };
    let SecurityContext {
        privileged,
        add_capabilities,
        drop_capabilities,
    } = blueprint.security_context.clone();
    let PodmanSidecar {
        enabled: podman_enabled,
        image: podman_image,
    } = blueprint.podman.clone();

    Ok(WorkspaceSpec {
        workspace_id,
        username,
        blueprint: blueprint.name.clone(),
        image,
        pull_policy: match blueprint.image_pull_policy {
            Some(PullPolicy::Always) => "Always",
            Some(PullPolicy::Never) => "Never",
            Some(PullPolicy::IfNotPresent) | None => "IfNotPresent",
        }
        .to_owned(),
        user,
        env: map("env", &blueprint.env)?,
        labels: map("labels", &blueprint.labels)?,
        annotations: map("annotations", &blueprint.annotations)?,
        cpu_request: quantity("resources.requests.cpu", &blueprint.resources.requests.cpu)?,
        memory_request: quantity(
            "resources.requests.memory",
            &blueprint.resources.requests.memory,
        )?,
        cpu_limit: quantity("resources.limits.cpu", &blueprint.resources.limits.cpu)?,
        memory_limit: quantity(
            "resources.limits.memory",
            &blueprint.resources.limits.memory,
        )?,
        node_selector: map("nodeSelector", &blueprint.node_selector)?,
        tolerations: blueprint.tolerations.iter().map(toleration_json).collect(),
        storages,
        init_scripts,
        apps,
        ports: blueprint
            .ports
            .iter()
            .map(|p: &ExposedPort| {
                (
                    p.name.clone(),
                    p.port,
                    p.protocol.clone().unwrap_or_else(|| "http".to_owned()),
                    p.public,
                )
            })
            .collect(),
        podman_sidecar: podman_enabled
            .then(|| podman_image.unwrap_or_else(|| DEFAULT_PODMAN_IMAGE.to_owned())),
        network_policy: blueprint.network_policy.clone(),
        privileged,
        add_capabilities,
        drop_capabilities,
        splash: opt("splash", &blueprint.splash)?,
        idle_timeout,
    })
}

fn invalid(path: &str, message: &str) -> ResolveError {
    ResolveError::Invalid {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

fn json_str(value: &serde_json::Value, key: &str) -> String {
    value
        .get(key)
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A POSIX-portable login name (what `useradd` accepts without force).
fn valid_login(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn toleration_json(toleration: &Toleration) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    if let Some(key) = &toleration.key {
        object.insert("key".into(), key.clone().into());
    }
    if let Some(operator) = toleration.operator {
        object.insert("operator".into(), format!("{operator:?}").into());
    }
    if let Some(value) = &toleration.value {
        object.insert("value".into(), value.clone().into());
    }
    if let Some(effect) = toleration.effect {
        object.insert("effect".into(), format!("{effect:?}").into());
    }
    if let Some(seconds) = toleration.toleration_seconds {
        object.insert("tolerationSeconds".into(), seconds.into());
    }
    serde_json::Value::Object(object)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::catalog::load_files;
    use super::*;

    fn scope() -> CelScope {
        CelScope {
            user: serde_json::json!({"username": "alice"}),
            workspace: serde_json::json!({"id": "alice-1234567", "blueprint": "dev"}),
            metadata: BTreeMap::from([("size".to_owned(), "big".to_owned())]),
            env: BTreeMap::new(),
        }
    }

    fn blueprint(yaml: &str) -> Blueprint {
        let set = load_files(&[(PathBuf::from("t.yaml"), yaml.to_owned())]).unwrap();
        set.iter().next().unwrap().blueprint.clone()
    }

    #[test]
    fn defaults_and_expressions_are_filled_in() {
        let spec = resolve(
            &blueprint(
                "name: dev\nimage: debian\n\
                 env: {WS: !cel \"workspace.id\"}\n\
                 resources: {limits: {memory: !cel \"metadata.size == 'big' ? '8Gi' : '2Gi'\"}}\n\
                 storages: [{name: home, type: local, path: !cel \"'/home/' + user.username\"}]\n\
                 idleTimeout: 45m\n",
            ),
            &scope(),
        )
        .unwrap();
        assert_eq!(spec.workspace_id, "alice-1234567");
        assert_eq!(
            spec.user,
            WorkspaceUser {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/bash".into(),
                sudo: false,
            }
        );
        assert_eq!(spec.env["WS"], "alice-1234567");
        assert_eq!(spec.memory_limit.as_deref(), Some("8Gi"));
        assert_eq!(spec.storages[0].path, "/home/alice");
        assert_eq!(spec.idle_timeout, Some(Duration::from_secs(45 * 60)));
        assert_eq!(spec.pull_policy, "IfNotPresent");
    }

    #[test]
    fn bad_evaluated_values_and_templates_are_refused() {
        let error = resolve(
            &blueprint("name: dev\nimage: debian\nresources: {limits: {cpu: !cel \"'lots'\"}}\n"),
            &scope(),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "resources.limits.cpu: \"lots\" is not a quantity"
        );
        let error = resolve(
            &blueprint("name: dev\nimage: debian\nuser: {uid: !cel \"0\"}\n"),
            &scope(),
        )
        .unwrap_err();
        assert!(
            error.to_string().starts_with("user.uid: 0 is root"),
            "{error}"
        );
        let error = resolve(&blueprint("name: t\nisTemplate: true\n"), &scope()).unwrap_err();
        assert!(matches!(error, ResolveError::Template(_)));
    }
}
