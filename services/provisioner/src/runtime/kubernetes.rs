//! The Kubernetes runtime: the shared manifests applied with server-side
//! apply (field manager `k8shell`), the pod followed through its stages
//! (Scheduling, Pulling, Initializing, Starting, Running), critical
//! conditions failing the start with their reason, and k8shelld reached
//! over mutual TLS through the workspace's Service.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::manifests::{
    DAEMON_PORT, DaemonTls, RETAIN_LABEL, daemon_secret_name, render_claims, render_network_policy,
    render_secret, render_service,
};
use super::pki::WorkspaceCa;
use super::render::{
    self, DaemonAccess, RenderTarget, SPEC_HASH_ANNOTATION, WORKSPACE_CONTAINER, WORKSPACE_LABEL,
};
use super::{ActualState, Progress, ProgressSink, Runtime, RuntimeError, RuntimeEvent};
use crate::blueprint::WorkspaceSpec;
use k8shell_service::daemon_channel::DaemonClientTls;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "k8shell";

/// Kubernetes runtime settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace workspaces run in.
    pub namespace: String,
    /// StorageClass of workspace PVCs; the cluster default when unset.
    pub storage_class: Option<String>,
    /// Image with the static k8shelld at `/k8shelld`.
    pub k8shelld_image: String,
    /// Cluster DNS suffix of Services.
    pub cluster_domain: String,
    /// How often a starting pod is looked at.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Where the workspace CA lives (created on first start);
    /// `<state_dir>/workspace-ca` when unset.
    pub ca_dir: Option<PathBuf>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: "k8shell-workspaces".to_owned(),
            storage_class: None,
            k8shelld_image: format!("ghcr.io/k8shell/k8shelld:{}", env!("CARGO_PKG_VERSION")),
            cluster_domain: "cluster.local".to_owned(),
            poll_interval: Duration::from_millis(500),
            ca_dir: None,
        }
    }
}

/// Where a starting pod is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodStage {
    /// Waiting for a node.
    Scheduling,
    /// Pulling images.
    Pulling,
    /// Init containers (the k8shelld install step) running.
    Initializing,
    /// Containers starting.
    Starting,
    /// The workspace container runs and is ready.
    Running,
    /// A condition that will not resolve by waiting.
    Failed(String),
}

impl PodStage {
    fn progress(&self) -> (u8, &'static str) {
        match self {
            PodStage::Scheduling => (20, "Scheduling"),
            PodStage::Pulling => (35, "Pulling"),
            PodStage::Initializing => (50, "Initializing"),
            PodStage::Starting => (65, "Starting"),
            PodStage::Running => (75, "Running"),
            PodStage::Failed(_) => (0, "Failed"),
        }
    }
}

/// Waiting reasons that never resolve on their own.
const CRITICAL_REASONS: [&str; 6] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "OOMKilled",
];

/// Reads a pod's stage from its status.
pub fn pod_stage(pod: &Pod) -> PodStage {
    let Some(status) = &pod.status else {
        return PodStage::Scheduling;
    };
    if status.phase.as_deref() == Some("Failed") {
        return PodStage::Failed(format!(
            "pod failed: {}",
            status.message.clone().unwrap_or_default()
        ));
    }
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for container in statuses.clone() {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        let terminated = container
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref());
        if let Some(waiting) = waiting {
            let reason = waiting.reason.clone().unwrap_or_default();
            if CRITICAL_REASONS.contains(&reason.as_str()) {
                let message = waiting.message.clone().unwrap_or_default();
                let last = terminated
                    .and_then(|t| t.reason.clone())
                    .map(|r| format!(" (last exit: {r})"))
                    .unwrap_or_default();
                let mut text = format!("{reason}: {}", container.name);
                if !message.is_empty() {
                    text.push(' ');
                    text.push_str(&message);
                }
                text.push_str(&last);
                return PodStage::Failed(text);
            }
        }
    }
    let scheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled");
    match scheduled {
        Some(condition) if condition.status != "True" => {
            let message = condition.message.clone().unwrap_or_default();
            // An unbound claim does not bind by waiting on the pod.
            if message.contains("unbound") && message.contains("PersistentVolumeClaim") {
                return PodStage::Failed(format!("unbound PVC: {message}"));
            }
            return PodStage::Scheduling;
        }
        None => return PodStage::Scheduling,
        Some(_) => {}
    }
    let pulling = |reason: &Option<String>| {
        matches!(
            reason.as_deref(),
            Some("ContainerCreating" | "PodInitializing")
        )
    };
    let init_done = status
        .init_container_statuses
        .iter()
        .flatten()
        .all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()));
    if !init_done {
        let any_running = status
            .init_container_statuses
            .iter()
            .flatten()
            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        return if any_running {
            PodStage::Initializing
        } else {
            PodStage::Pulling
        };
    }
    let workspace = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == WORKSPACE_CONTAINER);
    match workspace {
        Some(c) if c.state.as_ref().is_some_and(|s| s.running.is_some()) => PodStage::Running,
        Some(c)
            if c.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .is_some_and(|w| pulling(&w.reason)) =>
        {
            PodStage::Pulling
        }
        _ => PodStage::Starting,
    }
}

/// Runs workspaces as pods in a cluster.
pub struct KubernetesRuntime {
    client: kube::Client,
    config: KubernetesConfig,
    ca: WorkspaceCa,
    /// The provisioner's client certificate for k8shelld, with the CA.
    daemon_tls: DaemonClientTls,
}

impl KubernetesRuntime {
    /// A runtime on `client` (in-cluster or `KUBECONFIG`, or a test double).
    pub fn new(
        client: kube::Client,
        config: KubernetesConfig,
        state_dir: &std::path::Path,
    ) -> Result<Self, RuntimeError> {
        let failed = |e: super::pki::PkiError| RuntimeError::Unavailable {
            runtime: "kubernetes",
            message: format!("workspace CA: {e}"),
        };
        let ca_dir = config
            .ca_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("workspace-ca"));
        let ca = WorkspaceCa::load_or_create(&ca_dir).map_err(failed)?;
        let client_identity = ca.client("k8shell-provisioner").map_err(failed)?;
        let daemon_tls = DaemonClientTls {
            ca_pem: ca.ca_pem.clone(),
            cert_pem: client_identity.cert_pem,
            key_pem: client_identity.key_pem,
        };
        Ok(Self {
            client,
            config,
            ca,
            daemon_tls,
        })
    }

    /// Connects with the default client configuration (in-cluster service
    /// account, else `KUBECONFIG` / `~/.kube/config`).
    pub async fn connect(
        config: KubernetesConfig,
        state_dir: &std::path::Path,
    ) -> Result<Self, RuntimeError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| RuntimeError::Unavailable {
                runtime: "kubernetes",
                message: e.to_string(),
            })?;
        Self::new(client, config, state_dir)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn service_host(&self, workspace_id: &str) -> String {
        format!("{workspace_id}.{}.svc", self.config.namespace)
    }

    async fn apply<K>(&self, object: &K) -> Result<(), RuntimeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + Serialize
            + serde::de::DeserializeOwned,
        <K as kube::Resource>::DynamicType: Default,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<K>()
            .patch(&name, &params, &Patch::Apply(object))
            .await
            .map(|_| ())
            .map_err(|e| {
                failed(
                    &format!("applying {} {name}", K::kind(&Default::default())),
                    e,
                )
            })
    }

    async fn provision_inner(
        &self,
        spec: &WorkspaceSpec,
        daemon_config: &str,
        progress: &ProgressSink,
    ) -> Result<String, RuntimeError> {
        let report = |stage: &str, percent: u8, detail: String| {
            let _ = progress.send(Progress {
                stage: stage.to_owned(),
                percent,
                detail,
            });
        };
        let id = &spec.workspace_id;
        let namespace = Some(self.config.namespace.clone());
        let host = self.service_host(id);
        let server = self
            .ca
            .server(vec![
                host.clone(),
                format!("{host}.{}", self.config.cluster_domain),
            ])
            .map_err(|e| RuntimeError::Failed {
                operation: "issuing k8shelld's certificate".to_owned(),
                message: e.to_string(),
            })?;
        let tls = DaemonTls {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            client_ca_pem: self.ca.ca_pem.clone(),
        };
        report(
            "Creating",
            10,
            "applying the workspace's objects".to_owned(),
        );
        self.apply(&render_secret(spec, &namespace, daemon_config, &tls))
            .await?;
        for claim in render_claims(spec, &namespace, self.config.storage_class.as_deref()) {
            self.apply(&claim).await?;
        }
        self.apply(&render_service(spec, &namespace)).await?;
        if let Some(class) = &spec.network_policy {
            let policy = render_network_policy(class, &namespace).map_err(|message| {
                RuntimeError::Failed {
                    operation: "rendering the network policy".to_owned(),
                    message,
                }
            })?;
            self.apply(&policy).await?;
        }
        let target = RenderTarget {
            k8shelld_image: self.config.k8shelld_image.clone(),
            access: DaemonAccess::Secret(daemon_secret_name(id)),
            restart_policy: "Always",
            namespace,
        };
        let pod = render::render_pod(spec, &target);
        let hash = render::spec_hash(spec, &target);
        let pods = self.api::<Pod>();
        let name = render::pod_name(id);
        // Pods are immutable where it matters: a changed spec is a new pod.
        if let Some(existing) = pods
            .get_opt(&name)
            .await
            .map_err(|e| failed("reading the pod", e))?
        {
            let same = existing
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SPEC_HASH_ANNOTATION))
                == Some(&hash);
            let terminating = existing.metadata.deletion_timestamp.is_some();
            if !same || terminating {
                pods.delete(&name, &DeleteParams::default())
                    .await
                    .map_err(|e| failed("replacing the pod", e))?;
                self.wait_gone(&name, Duration::from_secs(60)).await?;
            }
        }
        self.apply(&pod).await?;
        // The pod's status from a watch (list, then watch from its
        // resourceVersion; the watcher resumes by itself after a drop).
        let config =
            kube::runtime::watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut updates = kube::runtime::watcher(pods.clone(), config)
            .applied_objects()
            .boxed();
        let mut last = None;
        loop {
            let current = match updates.next().await {
                Some(Ok(pod)) => pod,
                Some(Err(error)) => {
                    // Transient (the watcher retries); say why it had to.
                    tracing::debug!(%error, pod = %name, "pod watch interrupted");
                    continue;
                }
                None => {
                    return Err(RuntimeError::Unavailable {
                        runtime: "kubernetes",
                        message: format!("the watch of pod {name} ended"),
                    });
                }
            };
            let stage = pod_stage(&current);
            if let PodStage::Failed(reason) = stage {
                return Err(RuntimeError::Failed {
                    operation: "starting the pod".to_owned(),
                    message: reason,
                });
            }
            if last.as_ref() != Some(&stage) {
                let (percent, label) = stage.progress();
                report(label, percent, format!("pod {name}"));
                last = Some(stage.clone());
            }
            if stage == PodStage::Running {
                break;
            }
        }
        Ok(format!("https://{host}:{DAEMON_PORT}"))
    }

    /// Injects `spec`'s workspace into a workload (`deployment`,
    /// `statefulset` or `daemonset` named `name` in `namespace`): applies
    /// the config Secret there, then replaces the workload with the patched
    /// one (optimistic: the resourceVersion read is the one written, so a
    /// concurrent change makes this fail instead of being lost).
    pub async fn inject_workload(
        &self,
        namespace: &str,
        kind: &str,
        name: &str,
        spec: &WorkspaceSpec,
        daemon_config: &str,
    ) -> Result<(), RuntimeError> {
        let server = self
            .ca
            .server(vec![format!("{}.{namespace}.svc", spec.workspace_id)])
            .map_err(|e| RuntimeError::Failed {
                operation: "issuing k8shelld's certificate".to_owned(),
                message: e.to_string(),
            })?;
        let tls = DaemonTls {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            client_ca_pem: self.ca.ca_pem.clone(),
        };
        let secret = render_secret(spec, &Some(namespace.to_owned()), daemon_config, &tls);
        let secret_name = secret.metadata.name.clone().unwrap_or_default();
        Api::<Secret>::namespaced(self.client.clone(), namespace)
            .patch(
                &secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|e| failed("applying the config secret", e))?;
        let target = RenderTarget {
            k8shelld_image: self.config.k8shelld_image.clone(),
            access: DaemonAccess::Secret(secret_name),
            restart_policy: "Always",
            namespace: Some(namespace.to_owned()),
        };
        self.edit_workload(namespace, kind, name, |manifest| {
            super::inject::inject(manifest, spec, &target).map_err(|e| e.to_string())
        })
        .await
    }

    /// Restores a workload to what it was before [`Self::inject_workload`].
    pub async fn eject_workload(
        &self,
        namespace: &str,
        kind: &str,
        name: &str,
    ) -> Result<(), RuntimeError> {
        self.edit_workload(namespace, kind, name, |manifest| {
            super::inject::eject(manifest).map_err(|e| e.to_string())
        })
        .await
    }

    async fn edit_workload<F>(
        &self,
        namespace: &str,
        kind: &str,
        name: &str,
        edit: F,
    ) -> Result<(), RuntimeError>
    where
        F: FnOnce(&serde_json::Value) -> Result<serde_json::Value, String>,
    {
        use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
        macro_rules! replace {
            ($ty:ty) => {{
                let api = Api::<$ty>::namespaced(self.client.clone(), namespace);
                let current = api
                    .get(name)
                    .await
                    .map_err(|e| failed(&format!("reading {kind} {name}"), e))?;
                let manifest =
                    serde_json::to_value(&current).map_err(|e| RuntimeError::Failed {
                        operation: format!("reading {kind} {name}"),
                        message: e.to_string(),
                    })?;
                let edited = edit(&manifest).map_err(|message| RuntimeError::Failed {
                    operation: format!("editing {kind} {name}"),
                    message,
                })?;
                let edited: $ty =
                    serde_json::from_value(edited).map_err(|e| RuntimeError::Failed {
                        operation: format!("editing {kind} {name}"),
                        message: e.to_string(),
                    })?;
                api.replace(name, &Default::default(), &edited)
                    .await
                    .map(|_| ())
                    .map_err(|e| failed(&format!("updating {kind} {name}"), e))
            }};
        }
        match kind.to_ascii_lowercase().as_str() {
            "deployment" => replace!(Deployment),
            "statefulset" => replace!(StatefulSet),
            "daemonset" => replace!(DaemonSet),
            other => Err(RuntimeError::Failed {
                operation: "injection".to_owned(),
                message: format!(
                    "cannot inject into a {other}; use a deployment, statefulset or daemonset"
                ),
            }),
        }
    }

    async fn wait_gone(&self, name: &str, limit: Duration) -> Result<(), RuntimeError> {
        let pods = self.api::<Pod>();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match pods.get_opt(name).await {
                Ok(None) => return Ok(()),
                Ok(Some(_)) if tokio::time::Instant::now() >= deadline => {
                    return Err(RuntimeError::Failed {
                        operation: format!("waiting for pod {name} to go"),
                        message: format!("still there after {limit:?}"),
                    });
                }
                Ok(Some(_)) => tokio::time::sleep(self.config.poll_interval).await,
                Err(e) => return Err(failed("reading the pod", e)),
            }
        }
    }
}

fn failed(operation: &str, error: kube::Error) -> RuntimeError {
    RuntimeError::Failed {
        operation: operation.to_owned(),
        message: error.to_string(),
    }
}

fn selector(workspace_id: &str) -> String {
    format!("{WORKSPACE_LABEL}={workspace_id}")
}

impl Runtime for KubernetesRuntime {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn daemon_uses_tls(&self) -> bool {
        true
    }

    fn daemon_channel<'a>(
        &'a self,
        endpoint: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<tonic::transport::Channel, String>> {
        Box::pin(crate::daemon::connect(
            endpoint,
            Some(&self.daemon_tls),
            timeout,
        ))
    }

    fn provision<'a>(
        &'a self,
        spec: &'a WorkspaceSpec,
        daemon_config: &'a str,
        progress: &'a ProgressSink,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        self.provision_inner(spec, daemon_config, progress).boxed()
    }

    /// A stop deletes the pod; claims, Secret and Service stay.
    fn stop<'a>(
        &'a self,
        workspace_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let name = render::pod_name(workspace_id);
            let params = DeleteParams {
                grace_period_seconds: Some(grace.as_secs().max(1) as u32),
                ..Default::default()
            };
            match self.api::<Pod>().delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
                Err(e) => return Err(failed("deleting the pod", e)),
            }
            self.wait_gone(&name, grace + Duration::from_secs(30)).await
        }
        .boxed()
    }

    fn delete<'a>(
        &'a self,
        workspace_id: &'a str,
        retain: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let ignore_missing = |result: Result<(), kube::Error>, what: &str| match result {
                Ok(()) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(e) => Err(failed(what, e)),
            };
            let params = DeleteParams::default();
            let name = render::pod_name(workspace_id);
            ignore_missing(
                self.api::<Pod>().delete(&name, &params).await.map(|_| ()),
                "deleting the pod",
            )?;
            ignore_missing(
                self.api::<Secret>()
                    .delete(&daemon_secret_name(workspace_id), &params)
                    .await
                    .map(|_| ()),
                "deleting the config secret",
            )?;
            ignore_missing(
                self.api::<Service>()
                    .delete(workspace_id, &params)
                    .await
                    .map(|_| ()),
                "deleting the service",
            )?;
            let claims = self
                .api::<PersistentVolumeClaim>()
                .list(&ListParams::default().labels(&selector(workspace_id)))
                .await
                .map_err(|e| failed("listing the claims", e))?;
            for claim in claims {
                let retained = claim
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(RETAIN_LABEL))
                    .is_some_and(|v| v == "true");
                if retain && retained {
                    continue;
                }
                let claim_name = claim.metadata.name.clone().unwrap_or_default();
                ignore_missing(
                    self.api::<PersistentVolumeClaim>()
                        .delete(&claim_name, &params)
                        .await
                        .map(|_| ()),
                    "deleting a claim",
                )?;
            }
            Ok(())
        }
        .boxed()
    }

    fn state<'a>(
        &'a self,
        workspace_id: &'a str,
    ) -> BoxFuture<'a, Result<ActualState, RuntimeError>> {
        async move {
            let pod = self
                .api::<Pod>()
                .get_opt(&render::pod_name(workspace_id))
                .await
                .map_err(|e| failed("reading the pod", e))?;
            Ok(match pod {
                None => ActualState::Missing,
                Some(pod) => match pod_stage(&pod) {
                    PodStage::Running => ActualState::Running,
                    PodStage::Failed(reason) => ActualState::Stopped { detail: reason },
                    other => ActualState::Stopped {
                        detail: format!("{other:?}"),
                    },
                },
            })
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ActualState)>, RuntimeError>> {
        async move {
            let pods = self
                .api::<Pod>()
                .list(&ListParams::default().labels(WORKSPACE_LABEL))
                .await
                .map_err(|e| failed("listing pods", e))?;
            Ok(pods
                .into_iter()
                .filter_map(|pod| {
                    let id = pod.metadata.labels.as_ref()?.get(WORKSPACE_LABEL)?.clone();
                    let state = match pod_stage(&pod) {
                        PodStage::Running => ActualState::Running,
                        other => ActualState::Stopped {
                            detail: format!("{other:?}"),
                        },
                    };
                    Some((id, state))
                })
                .collect())
        }
        .boxed()
    }

    fn watch(&self) -> mpsc::Receiver<RuntimeEvent> {
        let (tx, rx) = mpsc::channel(256);
        let api = self.api::<Pod>();
        tokio::spawn(async move {
            let config = kube::runtime::watcher::Config::default().labels(WORKSPACE_LABEL);
            let mut events = kube::runtime::watcher(api, config).boxed();
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        // The watcher retries by itself; say why it had to.
                        tracing::warn!(%error, "pod watch interrupted");
                        continue;
                    }
                };
                let (pod, removed) = match event {
                    kube::runtime::watcher::Event::Apply(pod) => (pod, false),
                    kube::runtime::watcher::Event::Delete(pod) => (pod, true),
                    _ => continue,
                };
                let Some(id) = pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(WORKSPACE_LABEL))
                    .cloned()
                else {
                    continue;
                };
                let kind = if removed {
                    "removed"
                } else {
                    match pod_stage(&pod) {
                        PodStage::Failed(_) => "died",
                        PodStage::Running => "started",
                        _ => continue,
                    }
                };
                let event = RuntimeEvent {
                    workspace_id: id,
                    kind: kind.to_owned(),
                    detail: String::new(),
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "alice-1a7fd88"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn stages_follow_the_pod_status() {
        let cases = [
            (
                serde_json::json!({"phase": "Pending"}),
                PodStage::Scheduling,
            ),
            (
                serde_json::json!({"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}]}),
                PodStage::Scheduling,
            ),
            (
                serde_json::json!({"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "initContainerStatuses": [{"name": "install-k8shelld", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": "PodInitializing"}}}]}),
                PodStage::Pulling,
            ),
            (
                serde_json::json!({"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "initContainerStatuses": [{"name": "install-k8shelld", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"running": {}}}]}),
                PodStage::Initializing,
            ),
            (
                serde_json::json!({"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "initContainerStatuses": [{"name": "install-k8shelld", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 0}}}],
                    "containerStatuses": [{"name": "workspace", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
                PodStage::Pulling,
            ),
            (
                serde_json::json!({"phase": "Running",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "initContainerStatuses": [{"name": "install-k8shelld", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 0}}}],
                    "containerStatuses": [{"name": "workspace", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
                        "state": {"running": {}}}]}),
                PodStage::Running,
            ),
        ];
        for (status, want) in cases {
            assert_eq!(pod_stage(&pod(status.clone())), want, "{status}");
        }
    }

    #[test]
    fn critical_conditions_fail_with_their_reason() {
        let image = pod(serde_json::json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "workspace", "image": "nope:1", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}}]}));
        let PodStage::Failed(reason) = pod_stage(&image) else {
            panic!("not failed")
        };
        assert!(
            reason.starts_with("ImagePullBackOff: workspace"),
            "{reason}"
        );
        assert!(reason.contains("nope:1"));

        let crash = pod(serde_json::json!({"phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "workspace", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}));
        assert_eq!(
            pod_stage(&crash),
            PodStage::Failed("CrashLoopBackOff: workspace (last exit: Error)".into())
        );

        let unbound = pod(serde_json::json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False",
                "message": "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."}]}));
        assert!(matches!(pod_stage(&unbound), PodStage::Failed(r) if r.starts_with("unbound PVC")));
    }
}
