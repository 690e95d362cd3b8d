//! Injection: a workspace added to an existing Deployment, StatefulSet or
//! DaemonSet by patching its pod template with the k8shelld install step
//! and a k8shelld container (sharing the process namespace, so the
//! developer sees the application's processes). What was added is recorded
//! in an annotation on the workload, and eject removes exactly that.
//!
//! Limits, as documented: no storages (replicas would share them), no
//! podman sidecar, no NetworkPolicy; k8shelld's state lives in the pod.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::render::{
    RenderTarget, STATE_DIR, WORKSPACE_CONTAINER, WORKSPACE_LABEL, dns_name, render_pod,
};
use crate::blueprint::WorkspaceSpec;

/// Annotation on the workload holding the [`InjectionRecord`] as JSON.
pub const INJECTION_ANNOTATION: &str = "k8shell.io/injection";

/// What an injection added, so eject can take exactly that away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectionRecord {
    /// The injected workspace.
    pub workspace_id: String,
    /// Init containers added.
    pub init_containers: Vec<String>,
    /// Containers added.
    pub containers: Vec<String>,
    /// Volumes added.
    pub volumes: Vec<String>,
    /// `shareProcessNamespace` before the injection.
    pub share_process_namespace: Option<bool>,
    /// Whether the pod template had the workspace label before (never, but
    /// recorded so eject restores labels exactly).
    pub labels_added: Vec<String>,
}

/// An injection or eject that can't be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// Not a Deployment, StatefulSet or DaemonSet.
    #[error("cannot inject into a {0}; use a Deployment, StatefulSet or DaemonSet")]
    Kind(String),
    /// The manifest does not parse as its kind.
    #[error("invalid {kind}: {message}")]
    Invalid {
        /// Kind.
        kind: String,
        /// Why.
        message: String,
    },
    /// One injected workspace per workload.
    #[error("the workload already has workspace {0} injected")]
    AlreadyInjected(String),
    /// Nothing to eject.
    #[error("the workload has no injected workspace")]
    NotInjected,
    /// The recorded injection can't be read.
    #[error("the {INJECTION_ANNOTATION} annotation is unreadable: {0}")]
    Record(String),
}

/// Patches `template` in place; returns what was added.
pub fn inject_template(
    template: &mut PodTemplateSpec,
    spec: &WorkspaceSpec,
    target: &RenderTarget,
) -> InjectionRecord {
    // What injection leaves out (see the module docs).
    let mut spec = spec.clone();
    spec.storages.clear();
    spec.podman_sidecar = None;
    spec.network_policy = None;
    let spec = &spec;
    let pod = render_pod(spec, target);
    let pod_spec = pod.spec.unwrap_or_default();
    let id = &spec.workspace_id;
    let tools = dns_name(id, "k8shell-bin");
    let config = dns_name(id, "k8shelld-config");
    let keep_volume = |name: &str| name == tools || name == config;

    let mut init = pod_spec.init_containers.unwrap_or_default();
    for container in &mut init {
        container.name = dns_name(id, &container.name);
    }
    let mut daemon = pod_spec
        .containers
        .into_iter()
        .find(|c| c.name == WORKSPACE_CONTAINER)
        .unwrap_or_default();
    daemon.name = dns_name(id, "k8shelld");
    if let Some(mounts) = daemon.volume_mounts.as_mut() {
        mounts.retain(|m| keep_volume(&m.name) && m.mount_path != STATE_DIR);
    }
    let volumes: Vec<_> = pod_spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter(|v| keep_volume(&v.name))
        .collect();

    let record = InjectionRecord {
        workspace_id: id.clone(),
        init_containers: init.iter().map(|c| c.name.clone()).collect(),
        containers: vec![daemon.name.clone()],
        volumes: volumes.iter().map(|v| v.name.clone()).collect(),
        share_process_namespace: template
            .spec
            .as_ref()
            .and_then(|s| s.share_process_namespace),
        labels_added: vec![WORKSPACE_LABEL.to_owned()],
    };
    let labels = template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .labels
        .get_or_insert_with(Default::default);
    labels.insert(WORKSPACE_LABEL.to_owned(), id.clone());
    let target_spec = template.spec.get_or_insert_with(Default::default);
    target_spec
        .init_containers
        .get_or_insert_with(Vec::new)
        .extend(init);
    target_spec.containers.push(daemon);
    target_spec
        .volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes);
    target_spec.share_process_namespace = Some(true);
    record
}

/// Removes what `record` says was added.
pub fn eject_template(template: &mut PodTemplateSpec, record: &InjectionRecord) {
    if let Some(spec) = template.spec.as_mut() {
        if let Some(init) = spec.init_containers.as_mut() {
            init.retain(|c| !record.init_containers.contains(&c.name));
            if init.is_empty() {
                spec.init_containers = None;
            }
        }
        spec.containers
            .retain(|c| !record.containers.contains(&c.name));
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| !record.volumes.contains(&v.name));
            if volumes.is_empty() {
                spec.volumes = None;
            }
        }
        spec.share_process_namespace = record.share_process_namespace;
    }
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        for label in &record.labels_added {
            labels.remove(label);
        }
    }
}

/// The parts of a workload injection touches.
trait Workload {
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
    fn template_mut(&mut self) -> Option<&mut PodTemplateSpec>;
}

macro_rules! workload {
    ($ty:ty) => {
        impl Workload for $ty {
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
            fn template_mut(&mut self) -> Option<&mut PodTemplateSpec> {
                self.spec.as_mut().map(|s| &mut s.template)
            }
        }
    };
}
workload!(Deployment);
workload!(StatefulSet);
workload!(DaemonSet);

fn with_workload<F>(
    manifest: &serde_json::Value,
    change: F,
) -> Result<serde_json::Value, InjectError>
where
    F: FnOnce(&mut dyn Workload) -> Result<(), InjectError>,
{
    let kind = manifest
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_owned();
    let invalid = |e: serde_json::Error| InjectError::Invalid {
        kind: kind.clone(),
        message: e.to_string(),
    };
    macro_rules! edit {
        ($ty:ty) => {{
            let mut workload: $ty = serde_json::from_value(manifest.clone()).map_err(invalid)?;
            change(&mut workload)?;
            serde_json::to_value(&workload).map_err(invalid)
        }};
    }
    match kind.as_str() {
        "Deployment" => edit!(Deployment),
        "StatefulSet" => edit!(StatefulSet),
        "DaemonSet" => edit!(DaemonSet),
        other => Err(InjectError::Kind(other.to_owned())),
    }
}

fn recorded(workload: &mut dyn Workload) -> Result<Option<InjectionRecord>, InjectError> {
    workload
        .metadata_mut()
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECTION_ANNOTATION))
        .map(|json| serde_json::from_str(json).map_err(|e| InjectError::Record(e.to_string())))
        .transpose()
}

/// Injects `spec`'s workspace into a workload manifest (JSON of a
/// Deployment, StatefulSet or DaemonSet).
pub fn inject(
    manifest: &serde_json::Value,
    spec: &WorkspaceSpec,
    target: &RenderTarget,
) -> Result<serde_json::Value, InjectError> {
    with_workload(manifest, |workload| {
        if let Some(existing) = recorded(workload)? {
            return Err(InjectError::AlreadyInjected(existing.workspace_id));
        }
        let template = workload
            .template_mut()
            .ok_or_else(|| InjectError::Invalid {
                kind: "workload".to_owned(),
                message: "it has no spec.template".to_owned(),
            })?;
        let record = inject_template(template, spec, target);
        let json =
            serde_json::to_string(&record).map_err(|e| InjectError::Record(e.to_string()))?;
        workload
            .metadata_mut()
            .annotations
            .get_or_insert_with(Default::default)
            .insert(INJECTION_ANNOTATION.to_owned(), json);
        Ok(())
    })
}

/// Restores a workload to what it was before [`inject`].
pub fn eject(manifest: &serde_json::Value) -> Result<serde_json::Value, InjectError> {
    with_workload(manifest, |workload| {
        let record = recorded(workload)?.ok_or(InjectError::NotInjected)?;
        if let Some(template) = workload.template_mut() {
            eject_template(template, &record);
        }
        let metadata = workload.metadata_mut();
        if let Some(annotations) = metadata.annotations.as_mut() {
            annotations.remove(INJECTION_ANNOTATION);
            if annotations.is_empty() {
                metadata.annotations = None;
            }
        }
        Ok(())
    })
}
