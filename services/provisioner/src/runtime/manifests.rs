//! The Kubernetes objects around a workspace pod: its k8shelld config
//! Secret, PVCs, the Service k8shelld is reached through, and one
//! NetworkPolicy per policy class. Shared with the pod renderer's names,
//! labels and volume layout.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, Secret, Service, ServicePort, ServiceSpec,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::render::{USER_LABEL, WORKSPACE_LABEL, claim_name, dns_name, state_claim_name};
use crate::blueprint::{StorageKindName, WorkspaceSpec};

/// Port k8shelld serves gRPC with mutual TLS on, in the pod.
pub const DAEMON_PORT: i32 = 7400;
/// Label selecting pods of a network policy class.
pub const NETWORK_POLICY_LABEL: &str = "k8shell.io/network-policy";
/// Label on objects kept when their workspace is deleted with retention.
pub const RETAIN_LABEL: &str = "k8shell.io/retain";
/// Label of the platform's own pods (the provisioner, sshproxy, apiserver),
/// the only ones allowed to reach k8shelld.
pub const PLATFORM_SELECTOR: (&str, &str) = ("app.kubernetes.io/part-of", "k8shell");

fn meta(name: String, namespace: &Option<String>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: namespace.clone(),
        labels: Some(labels),
        ..Default::default()
    }
}

/// Labels every object of a workspace carries.
pub fn owner_labels(spec: &WorkspaceSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (WORKSPACE_LABEL.to_owned(), spec.workspace_id.clone()),
        (USER_LABEL.to_owned(), spec.username.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "k8shell".to_owned(),
        ),
    ])
}

/// Name of the Secret holding k8shelld's config and TLS material.
pub fn daemon_secret_name(workspace_id: &str) -> String {
    dns_name(workspace_id, "k8shelld")
}

/// TLS material of one workspace's k8shelld.
#[derive(Clone, Debug)]
pub struct DaemonTls {
    /// Server certificate (PEM).
    pub cert_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
    /// CA that client certificates must chain to (PEM).
    pub client_ca_pem: String,
}

/// The Secret mounted at /etc/k8shelld: `k8shelld.toml` and TLS files.
pub fn render_secret(
    spec: &WorkspaceSpec,
    namespace: &Option<String>,
    daemon_config: &str,
    tls: &DaemonTls,
) -> Secret {
    let data = BTreeMap::from([
        (
            "k8shelld.toml".to_owned(),
            ByteString(daemon_config.as_bytes().to_vec()),
        ),
        (
            "tls.crt".to_owned(),
            ByteString(tls.cert_pem.as_bytes().to_vec()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(tls.key_pem.as_bytes().to_vec()),
        ),
        (
            "ca.crt".to_owned(),
            ByteString(tls.client_ca_pem.as_bytes().to_vec()),
        ),
    ]);
    Secret {
        metadata: meta(
            daemon_secret_name(&spec.workspace_id),
            namespace,
            owner_labels(spec),
        ),
        data: Some(data),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    }
}

/// PVCs for the k8shelld state volume and every `local` and `shared`
/// storage. Shared claims carry no workspace label: they belong to no one
/// workspace and outlive them all.
pub fn render_claims(
    spec: &WorkspaceSpec,
    namespace: &Option<String>,
    storage_class: Option<&str>,
) -> Vec<PersistentVolumeClaim> {
    let claim = |name: String, size: &str, labels: BTreeMap<String, String>, shared: bool| {
        PersistentVolumeClaim {
            metadata: meta(name, namespace, labels),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec![if shared {
                    "ReadWriteMany".to_owned()
                } else {
                    "ReadWriteOnce".to_owned()
                }]),
                storage_class_name: storage_class.map(str::to_owned),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(size.to_owned()),
                    )])),
                    limits: None,
                }),
                ..Default::default()
            }),
            status: None,
        }
    };
    let mut claims = vec![claim(
        state_claim_name(&spec.workspace_id),
        "64Mi",
        owner_labels(spec),
        false,
    )];
    for storage in &spec.storages {
        let size = storage.size.as_deref().unwrap_or("10Gi");
        match storage.kind {
            StorageKindName::Local => {
                let mut labels = owner_labels(spec);
                if storage.retain {
                    labels.insert(RETAIN_LABEL.to_owned(), "true".to_owned());
                }
                claims.push(claim(claim_name(spec, storage), size, labels, false));
            }
            StorageKindName::Shared => {
                let mut labels = BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "k8shell".to_owned(),
                )]);
                if !storage.global {
                    labels.insert(USER_LABEL.to_owned(), spec.username.clone());
                }
                claims.push(claim(claim_name(spec, storage), size, labels, true));
            }
            StorageKindName::EmptyDir | StorageKindName::Memory => {}
        }
    }
    claims
}

/// The ClusterIP Service the platform reaches k8shelld through
/// (`https://<id>.<namespace>.svc:7400`).
pub fn render_service(spec: &WorkspaceSpec, namespace: &Option<String>) -> Service {
    Service {
        metadata: meta(spec.workspace_id.clone(), namespace, owner_labels(spec)),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(
                WORKSPACE_LABEL.to_owned(),
                spec.workspace_id.clone(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some("k8shelld".to_owned()),
                port: DAEMON_PORT,
                target_port: Some(IntOrString::Int(DAEMON_PORT)),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".to_owned()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The NetworkPolicy of a policy class, shared by every workspace of the
/// class (pods are selected by [`NETWORK_POLICY_LABEL`]). Ingress: only the
/// platform, only to k8shelld. Egress by class:
///
/// - `isolated`: DNS only;
/// - `restricted`: DNS, HTTP and HTTPS;
/// - `open`: anything.
///
/// Unknown classes are refused, so a typo never means "open".
pub fn render_network_policy(
    class: &str,
    namespace: &Option<String>,
) -> Result<NetworkPolicy, String> {
    let port = |p: i32, protocol: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some(protocol.to_owned()),
        ..Default::default()
    };
    let dns = NetworkPolicyEgressRule {
        ports: Some(vec![port(53, "UDP"), port(53, "TCP")]),
        to: None,
    };
    let egress = match class {
        "isolated" => vec![dns],
        "restricted" => vec![
            dns,
            NetworkPolicyEgressRule {
                ports: Some(vec![port(80, "TCP"), port(443, "TCP")]),
                to: None,
            },
        ],
        "open" => vec![NetworkPolicyEgressRule::default()],
        other => {
            return Err(format!(
                "unknown network policy class {other:?}: use isolated, restricted or open"
            ));
        }
    };
    let platform = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                PLATFORM_SELECTOR.0.to_owned(),
                PLATFORM_SELECTOR.1.to_owned(),
            )])),
            ..Default::default()
        }),
        namespace_selector: Some(LabelSelector::default()),
        ip_block: None,
    };
    Ok(NetworkPolicy {
        metadata: meta(
            format!("k8shell-{class}"),
            namespace,
            BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "k8shell".to_owned(),
            )]),
        ),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    NETWORK_POLICY_LABEL.to_owned(),
                    class.to_owned(),
                )])),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![platform]),
                ports: Some(vec![port(DAEMON_PORT, "TCP")]),
            }]),
            egress: Some(egress),
        }),
    })
}
