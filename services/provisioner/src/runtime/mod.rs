//! Where workspaces run. One trait, two implementations (podman locally,
//! Kubernetes in production), one shared manifest renderer.

pub mod inject;
pub mod kubernetes;
pub mod manifests;
pub mod pki;
pub mod podman;
pub mod render;

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::blueprint::WorkspaceSpec;

/// A runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime's tool or API could not be reached.
    #[error("{runtime} unavailable: {message}")]
    Unavailable {
        /// Runtime name.
        runtime: &'static str,
        /// Why.
        message: String,
    },
    /// The runtime refused or failed the operation.
    #[error("{operation} failed: {message}")]
    Failed {
        /// What was attempted.
        operation: String,
        /// The runtime's words.
        message: String,
    },
}

/// What the runtime sees of one workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActualState {
    /// Nothing exists.
    Missing,
    /// Created, not running (stopped, exited, never started).
    Stopped {
        /// Why it is not running, when the runtime says (exit code, reason).
        detail: String,
    },
    /// Running.
    Running,
}

/// A stage reached while provisioning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// `Rendering`, `Pulling`, `Creating`, `Starting`, ...
    pub stage: String,
    /// 0 to 100.
    pub percent: u8,
    /// What the runtime said.
    pub detail: String,
}

/// Receives progress while a runtime works.
pub type ProgressSink = mpsc::UnboundedSender<Progress>;

/// Something happened to a workspace behind the provisioner's back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeEvent {
    /// The workspace.
    pub workspace_id: String,
    /// `died`, `removed`, ...
    pub kind: String,
    /// Details (exit code).
    pub detail: String,
}

/// A place workspaces run.
pub trait Runtime: Send + Sync + 'static {
    /// `podman` or `kubernetes`.
    fn name(&self) -> &'static str;

    /// Whether k8shelld serves TCP with mutual TLS (else a unix socket).
    fn daemon_uses_tls(&self) -> bool {
        false
    }

    /// A gRPC channel to the k8shelld at `endpoint` (as the runtime's
    /// `provision` returned it). The default dials `unix://` sockets.
    fn daemon_channel<'a>(
        &'a self,
        endpoint: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<tonic::transport::Channel, String>> {
        Box::pin(crate::daemon::connect(endpoint, None, timeout))
    }

    /// Makes the workspace run as `spec` says: creates it, starts it when
    /// stopped, re-creates it when its spec changed. Idempotent. Returns
    /// the endpoint k8shelld will answer on (`unix:///...`, `https://...`).
    fn provision<'a>(
        &'a self,
        spec: &'a WorkspaceSpec,
        daemon_config: &'a str,
        progress: &'a ProgressSink,
    ) -> BoxFuture<'a, Result<String, RuntimeError>>;

    /// Stops the workspace, keeping everything; waits at most `grace`
    /// before killing.
    fn stop<'a>(
        &'a self,
        workspace_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Removes the workspace and every volume it ever owned (the runtime
    /// keeps track, so a blueprint changed or removed since never leaves
    /// volumes behind); `retain` keeps the storages marked for retention.
    fn delete<'a>(
        &'a self,
        workspace_id: &'a str,
        retain: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// What runs now.
    fn state<'a>(
        &'a self,
        workspace_id: &'a str,
    ) -> BoxFuture<'a, Result<ActualState, RuntimeError>>;

    /// Every workspace the runtime holds, with its state.
    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ActualState)>, RuntimeError>>;

    /// Streams events until the receiver is dropped; the implementation
    /// reconnects on its own.
    fn watch(&self) -> mpsc::Receiver<RuntimeEvent>;
}
