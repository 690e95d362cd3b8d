//! The one manifest renderer both runtimes use: a workspace spec becomes a
//! Kubernetes Pod (k8s-openapi types), so the local podman mode runs the
//! same objects a cluster would.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HostPathVolumeSource,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements, SecretVolumeSource,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::blueprint::{StorageKindName, WorkspaceSpec};

/// Label carrying the workspace id on every object.
pub const WORKSPACE_LABEL: &str = "k8shell.io/workspace";
/// Label carrying the owner.
pub const USER_LABEL: &str = "k8shell.io/user";
/// Label carrying the blueprint.
pub const BLUEPRINT_LABEL: &str = "k8shell.io/blueprint";
/// Annotation with the hash of what was rendered: a changed spec is
/// re-created on the next start, an unchanged one just started.
pub const SPEC_HASH_ANNOTATION: &str = "k8shell.io/spec-hash";
/// Name of the workspace container.
pub const WORKSPACE_CONTAINER: &str = "workspace";
/// Where k8shelld is installed in the workspace container.
pub const TOOLS_DIR: &str = "/opt/k8shell";
/// Where k8shelld keeps its state (init-script records) across restarts.
pub const STATE_DIR: &str = "/var/lib/k8shelld";
/// Directory of k8shelld's unix socket (local runtime).
pub const RUN_DIR: &str = "/run/k8shell";
/// Where the config Secret is mounted (Kubernetes runtime).
pub const DAEMON_CONFIG_DIR: &str = "/etc/k8shelld";

/// How k8shelld gets its configuration and how the platform reaches it.
#[derive(Clone, Debug)]
pub enum DaemonAccess {
    /// A host directory bind-mounted at [`RUN_DIR`]: config file in, unix
    /// socket out (podman).
    HostDir(String),
    /// A Secret with `k8shelld.toml` and TLS material, k8shelld on TCP with
    /// mutual TLS (Kubernetes).
    Secret(String),
}

/// Runtime-specific choices the renderer needs.
#[derive(Clone, Debug)]
pub struct RenderTarget {
    /// Image holding the static k8shelld at `/k8shelld`.
    pub k8shelld_image: String,
    /// Config and endpoint.
    pub access: DaemonAccess,
    /// `Never` under podman, where the reconcile loop restarts (and podman
    /// 4.x would otherwise loop init containers); `Always` on Kubernetes.
    pub restart_policy: &'static str,
    /// Namespace (Kubernetes).
    pub namespace: Option<String>,
}

/// Names of the volumes a workspace owns, for the runtime to clean up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedVolumes {
    /// Deleted with the workspace unless retained.
    pub persistent: Vec<String>,
    /// Persistent ones kept when the delete asks to retain.
    pub retainable: Vec<String>,
    /// Scratch volumes (emptyDir under podman are named volumes too).
    pub scratch: Vec<String>,
}

/// A Kubernetes name: `<a>-<b>` when it fits in 63 characters, else
/// shortened with a hash so distinct inputs stay distinct.
pub fn dns_name(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let keep = 63 - hash.len() - 1;
    format!("{}-{hash}", full[..keep].trim_end_matches('-'))
}

/// Pod name of a workspace.
pub fn pod_name(workspace_id: &str) -> String {
    workspace_id.to_owned()
}

/// Claim (podman: volume) name of a storage.
pub fn claim_name(spec: &WorkspaceSpec, storage: &crate::blueprint::ResolvedStorage) -> String {
    match storage.kind {
        StorageKindName::Shared if storage.global => dns_name("k8shell-shared", &storage.name),
        StorageKindName::Shared => {
            dns_name(&format!("k8shell-shared-{}", spec.username), &storage.name)
        }
        _ => dns_name(&spec.workspace_id, &storage.name),
    }
}

/// Claim of k8shelld's state volume.
pub fn state_claim_name(workspace_id: &str) -> String {
    dns_name(workspace_id, "k8shell-state")
}

fn tools_volume(workspace_id: &str) -> String {
    dns_name(workspace_id, "k8shell-bin")
}

fn podman_socket_volume(workspace_id: &str) -> String {
    dns_name(workspace_id, "podman-run")
}

/// Volumes the workspace owns (never shared ones).
pub fn owned_volumes(spec: &WorkspaceSpec) -> OwnedVolumes {
    let mut owned = OwnedVolumes::default();
    owned.persistent.push(state_claim_name(&spec.workspace_id));
    owned.scratch.push(tools_volume(&spec.workspace_id));
    if spec.podman_sidecar.is_some() {
        owned.scratch.push(podman_socket_volume(&spec.workspace_id));
    }
    for storage in &spec.storages {
        let name = claim_name(spec, storage);
        match storage.kind {
            StorageKindName::Local if storage.retain => owned.retainable.push(name),
            StorageKindName::Local => owned.persistent.push(name),
            StorageKindName::Shared => {}
            StorageKindName::EmptyDir | StorageKindName::Memory => owned.scratch.push(name),
        }
    }
    owned
}

/// Hash of everything that shapes the pod.
pub fn spec_hash(spec: &WorkspaceSpec, target: &RenderTarget) -> String {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(spec).unwrap_or_default());
    hasher.update(target.k8shelld_image.as_bytes());
    hasher.update(target.restart_policy.as_bytes());
    // Where the config comes from and the socket goes: a pod of the same
    // name made by another platform (another state directory) is not one
    // this platform can reach, and must be re-created, not adopted.
    hasher.update(format!("{:?}", target.access).as_bytes());
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn claim_volume(name: &str, claim: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: None,
        }),
        ..Default::default()
    }
}

fn empty_dir(name: &str, memory: bool) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: memory.then(|| "Memory".to_owned()),
            size_limit: None,
        }),
        ..Default::default()
    }
}

fn resources(spec: &WorkspaceSpec) -> Option<ResourceRequirements> {
    let amounts = |cpu: &Option<String>, memory: &Option<String>| {
        let mut map = BTreeMap::new();
        if let Some(cpu) = cpu {
            map.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        if let Some(memory) = memory {
            map.insert("memory".to_owned(), Quantity(memory.clone()));
        }
        (!map.is_empty()).then_some(map)
    };
    let requests = amounts(&spec.cpu_request, &spec.memory_request);
    let limits = amounts(&spec.cpu_limit, &spec.memory_limit);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..Default::default()
    })
}

/// Renders the workspace pod.
pub fn render_pod(spec: &WorkspaceSpec, target: &RenderTarget) -> Pod {
    let id = &spec.workspace_id;
    let mut labels = spec.labels.clone();
    labels.insert(WORKSPACE_LABEL.to_owned(), id.clone());
    labels.insert(USER_LABEL.to_owned(), spec.username.clone());
    labels.insert(BLUEPRINT_LABEL.to_owned(), spec.blueprint.clone());
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "k8shell".to_owned(),
    );
    if let Some(class) = &spec.network_policy {
        labels.insert(
            super::manifests::NETWORK_POLICY_LABEL.to_owned(),
            class.clone(),
        );
    }
    let mut annotations = spec.annotations.clone();
    annotations.insert(SPEC_HASH_ANNOTATION.to_owned(), spec_hash(spec, target));

    let tools = tools_volume(id);
    let state = state_claim_name(id);
    let mut volumes = vec![empty_dir(&tools, false), claim_volume(&state, &state)];
    let mut mounts = vec![
        mount(&tools, TOOLS_DIR, true),
        mount(&state, STATE_DIR, false),
    ];
    let config_path = match &target.access {
        DaemonAccess::HostDir(dir) => {
            volumes.push(Volume {
                name: dns_name(id, "k8shell-run"),
                host_path: Some(HostPathVolumeSource {
                    path: dir.clone(),
                    type_: Some("Directory".to_owned()),
                }),
                ..Default::default()
            });
            mounts.push(mount(&dns_name(id, "k8shell-run"), RUN_DIR, false));
            format!("{RUN_DIR}/k8shelld.toml")
        }
        DaemonAccess::Secret(secret) => {
            volumes.push(Volume {
                name: dns_name(id, "k8shelld-config"),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    default_mode: Some(0o400),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(mount(
                &dns_name(id, "k8shelld-config"),
                DAEMON_CONFIG_DIR,
                true,
            ));
            format!("{DAEMON_CONFIG_DIR}/k8shelld.toml")
        }
    };
    for storage in &spec.storages {
        let volume_name = dns_name(id, &storage.name);
        volumes.push(match storage.kind {
            StorageKindName::Local | StorageKindName::Shared => {
                claim_volume(&volume_name, &claim_name(spec, storage))
            }
            StorageKindName::EmptyDir => empty_dir(&volume_name, false),
            StorageKindName::Memory => empty_dir(&volume_name, true),
        });
        mounts.push(mount(&volume_name, &storage.path, storage.read_only));
    }

    let mut env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            value_from: None,
        })
        .collect();
    env.push(EnvVar {
        name: "K8SHELL_WORKSPACE_ID".to_owned(),
        value: Some(id.clone()),
        value_from: None,
    });

    let mut containers = Vec::new();
    if let Some(image) = &spec.podman_sidecar {
        let socket_volume = podman_socket_volume(id);
        volumes.push(empty_dir(&socket_volume, false));
        mounts.push(mount(&socket_volume, "/run/podman", false));
        env.push(EnvVar {
            name: "CONTAINER_HOST".to_owned(),
            value: Some("unix:///run/podman/podman.sock".to_owned()),
            value_from: None,
        });
        env.push(EnvVar {
            name: "DOCKER_HOST".to_owned(),
            value: Some("unix:///run/podman/podman.sock".to_owned()),
            value_from: None,
        });
        containers.push(Container {
            name: "podman".to_owned(),
            image: Some(image.clone()),
            command: Some(
                [
                    "podman",
                    "system",
                    "service",
                    "--time=0",
                    "unix:///run/podman/podman.sock",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            security_context: Some(SecurityContext {
                privileged: Some(true),
                ..Default::default()
            }),
            volume_mounts: Some(vec![mount(&socket_volume, "/run/podman", false)]),
            ..Default::default()
        });
    }
    let capabilities = (!spec.add_capabilities.is_empty() || !spec.drop_capabilities.is_empty())
        .then(|| Capabilities {
            add: (!spec.add_capabilities.is_empty()).then(|| spec.add_capabilities.clone()),
            drop: (!spec.drop_capabilities.is_empty()).then(|| spec.drop_capabilities.clone()),
        });
    containers.insert(
        0,
        Container {
            name: WORKSPACE_CONTAINER.to_owned(),
            image: Some(spec.image.clone()),
            image_pull_policy: Some(spec.pull_policy.clone()),
            command: Some(vec![
                format!("{TOOLS_DIR}/k8shelld"),
                "--config".to_owned(),
                config_path,
            ]),
            env: Some(env),
            resources: resources(spec),
            // k8shelld runs as root to create the workspace user and switch
            // to it; the user's processes run unprivileged.
            security_context: Some(SecurityContext {
                privileged: spec.privileged.then_some(true),
                capabilities,
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            working_dir: Some("/".to_owned()),
            ports: matches!(target.access, DaemonAccess::Secret(_)).then(|| {
                vec![ContainerPort {
                    name: Some("k8shelld".to_owned()),
                    container_port: super::manifests::DAEMON_PORT,
                    protocol: Some("TCP".to_owned()),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
    );

    let tolerations: Vec<Toleration> = spec
        .tolerations
        .iter()
        .filter_map(|t| serde_json::from_value(t.clone()).ok())
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(id)),
            namespace: target.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            hostname: Some(id.clone()),
            restart_policy: Some(target.restart_policy.to_owned()),
            termination_grace_period_seconds: Some(3),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            init_containers: Some(vec![Container {
                name: "install-k8shelld".to_owned(),
                image: Some(target.k8shelld_image.clone()),
                image_pull_policy: Some("IfNotPresent".to_owned()),
                command: Some(vec![
                    "/k8shelld".to_owned(),
                    "install".to_owned(),
                    TOOLS_DIR.to_owned(),
                ]),
                volume_mounts: Some(vec![mount(&tools, TOOLS_DIR, false)]),
                ..Default::default()
            }]),
            containers,
            volumes: Some(volumes),
            node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            ..Default::default()
        }),
        status: None,
    }
}

/// k8shelld's TLS listener (Kubernetes runtime).
#[derive(Serialize)]
struct DaemonTlsListener {
    addr: String,
    cert_path: String,
    key_path: String,
    client_ca_path: String,
}

/// k8shelld's configuration file for a workspace.
#[derive(Serialize)]
struct DaemonConfig<'a> {
    workspace_id: &'a str,
    jwks: &'a str,
    socket_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<DaemonTlsListener>,
    state_dir: &'a str,
    bootstrap_user: &'a crate::blueprint::WorkspaceUser,
    user_volumes: Vec<&'a str>,
    init_scripts: &'a [crate::blueprint::ResolvedInitScript],
    apps: &'a [crate::blueprint::ResolvedApp],
}

/// Renders `k8shelld.toml`; `tls` serves gRPC on TCP with mutual TLS
/// (files from the config Secret) instead of the unix socket.
pub fn render_daemon_config(
    spec: &WorkspaceSpec,
    jwks: &str,
    tls: bool,
) -> Result<String, toml::ser::Error> {
    toml::to_string(&DaemonConfig {
        workspace_id: &spec.workspace_id,
        jwks,
        socket_path: format!("{RUN_DIR}/k8shelld.sock"),
        tls: tls.then(|| DaemonTlsListener {
            addr: format!("0.0.0.0:{}", super::manifests::DAEMON_PORT),
            cert_path: format!("{DAEMON_CONFIG_DIR}/tls.crt"),
            key_path: format!("{DAEMON_CONFIG_DIR}/tls.key"),
            client_ca_path: format!("{DAEMON_CONFIG_DIR}/ca.crt"),
        }),
        state_dir: STATE_DIR,
        bootstrap_user: &spec.user,
        user_volumes: spec
            .storages
            .iter()
            .filter(|s| !s.read_only)
            .map(|s| s.path.as_str())
            .collect(),
        init_scripts: &spec.init_scripts,
        apps: &spec.apps,
    })
}

/// The pod as YAML (what `podman kube play` reads, and the golden files).
pub fn to_yaml(pod: &Pod) -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_shortened_distinctly() {
        let base = "a".repeat(60);
        let one = dns_name(&base, "home");
        let two = dns_name(&base, "cache");
        assert!(one.len() <= 63 && two.len() <= 63);
        assert_ne!(one, two);
        assert_eq!(dns_name("alice-1234567", "home"), "alice-1234567-home");
    }
}
