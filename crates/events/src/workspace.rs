//! Workspace lifecycle: requested → provisioning → running → stopping →
//! stopped → deleted, or failed with a reason. Aggregate id: the workspace id.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Context, EventData};

/// Declares the `EventData` impl of one workspace event.
macro_rules! workspace_event {
    ($ty:ty, $name:literal, $description:literal) => {
        impl EventData for $ty {
            const TYPE: &'static str = concat!("k8shell.workspace.", $name, ".v1");
            const CONTEXT: Context = Context::Workspace;
            const DESCRIPTION: &'static str = $description;
        }
    };
}

/// A user asked for a workspace built from a blueprint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRequested {
    /// Canonical workspace id, `<username>-<hex>`.
    pub workspace_id: String,
    /// Owner of the workspace.
    pub username: String,
    /// Blueprint the workspace is built from.
    pub blueprint: String,
    /// Free-form key/values from the request, in scope of the blueprint's
    /// CEL expressions as `metadata`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}
workspace_event!(
    WorkspaceRequested,
    "requested",
    "A user asked for a workspace built from a blueprint."
);

/// The runtime is creating the workspace; one event per stage reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceProvisioning {
    /// Stage name, e.g. `Scheduling`, `Pulling`, `Starting`.
    pub stage: String,
    /// Rough completion, 0 to 100.
    pub progress_percent: u8,
    /// What the runtime reported at this stage.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}
workspace_event!(
    WorkspaceProvisioning,
    "provisioning",
    "The runtime reached a provisioning stage."
);

/// k8shelld answers inside the workspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceRunning {
    /// How the platform reaches k8shelld: `unix:///path` or `https://host:port`.
    pub endpoint: String,
    /// The blueprint's `splash`, shown when a user logs in (SSH); empty:
    /// none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub splash: String,
}
workspace_event!(
    WorkspaceRunning,
    "running",
    "The workspace is up and its daemon answers."
);

/// A stop was decided and is in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceStopping {
    /// Why it stops: `user`, `idle`, `admin`, ...
    pub reason: String,
}
workspace_event!(
    WorkspaceStopping,
    "stopping",
    "A stop was decided and is in progress."
);

/// The workspace no longer runs; its storage is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceStopped {
    /// Why it stopped.
    pub reason: String,
}
workspace_event!(
    WorkspaceStopped,
    "stopped",
    "The workspace stopped; its storage is kept."
);

/// Provisioning or running failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceFailed {
    /// Human-readable cause, e.g. `ImagePullBackOff: image not found`.
    pub reason: String,
}
workspace_event!(
    WorkspaceFailed,
    "failed",
    "Provisioning or running failed, with the reason."
);

/// The workspace was removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceDeleted {
    /// Whether volumes marked for retention were kept.
    pub volumes_retained: bool,
}
workspace_event!(WorkspaceDeleted, "deleted", "The workspace was removed.");

/// The workspace has been idle and will be stopped unless it is used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceIdleWarning {
    /// Seconds since the last session or input.
    pub idle_seconds: u64,
    /// Seconds until the stop, if the workspace stays idle.
    pub stop_in_seconds: u64,
}
workspace_event!(
    WorkspaceIdleWarning,
    "idle_warning",
    "The workspace is idle and will be stopped soon unless it is used."
);

/// A stop was asked for at a later time; a start, stop or delete before
/// then cancels it. Survives provisioner restarts (it is an event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceStopScheduled {
    /// RFC 3339 time of the stop.
    pub at: String,
    /// Why, recorded on the stop.
    pub reason: String,
}
workspace_event!(
    WorkspaceStopScheduled,
    "stop_scheduled",
    "A stop was scheduled for a later time."
);

/// Every workspace event this build understands.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkspaceEvent {
    /// See [`WorkspaceRequested`].
    Requested(WorkspaceRequested),
    /// See [`WorkspaceProvisioning`].
    Provisioning(WorkspaceProvisioning),
    /// See [`WorkspaceRunning`].
    Running(WorkspaceRunning),
    /// See [`WorkspaceStopping`].
    Stopping(WorkspaceStopping),
    /// See [`WorkspaceStopped`].
    Stopped(WorkspaceStopped),
    /// See [`WorkspaceFailed`].
    Failed(WorkspaceFailed),
    /// See [`WorkspaceDeleted`].
    Deleted(WorkspaceDeleted),
    /// See [`WorkspaceIdleWarning`].
    IdleWarning(WorkspaceIdleWarning),
    /// See [`WorkspaceStopScheduled`].
    StopScheduled(WorkspaceStopScheduled),
}
