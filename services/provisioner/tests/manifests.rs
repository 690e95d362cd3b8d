//! Golden files of the manifests both runtimes apply: the pod (podman and
//! Kubernetes flavours), the Kubernetes objects around it, a network policy
//! and an injection into a Deployment. `K8SHELL_UPDATE_GOLDEN=1` rewrites
//! them after an intended change; review the diff.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use k8shell_provisioner::blueprint::{CelScope, WorkspaceSpec, load_dir, resolve};
use k8shell_provisioner::runtime::inject::{InjectError, eject, inject};
use k8shell_provisioner::runtime::manifests::{
    DaemonTls, render_claims, render_network_policy, render_secret, render_service,
};
use k8shell_provisioner::runtime::render::{
    DaemonAccess, RenderTarget, render_daemon_config, render_pod, spec_hash,
};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("K8SHELL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{name} differs from the golden file (K8SHELL_UPDATE_GOLDEN=1 rewrites it):\n{actual}"
    );
}

fn yaml<T: serde::Serialize>(value: &T) -> String {
    serde_yaml_ng::to_string(value).unwrap()
}

/// The repository's `dev` blueprint with every feature switched on.
fn spec() -> WorkspaceSpec {
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../blueprints");
    for file in ["base.yaml", "dev.yaml"] {
        std::fs::copy(repo.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("full.yaml"),
        "name: full\ntemplate: dev\n\
         nodeSelector: {pool: workspaces}\n\
         tolerations: [{key: dedicated, operator: Equal, value: dev, effect: NoSchedule}]\n\
         storages:\n  - {name: team, type: shared, path: /team, size: 50Gi}\n  - {name: tmp, type: memory, path: /fast}\n\
         podman: {enabled: true}\nnetworkPolicy: restricted\n\
         securityContext: {addCapabilities: [SYS_PTRACE]}\n\
         apps: [{name: web, command: [python3, -m, http.server, '8000'], port: 8000}]\n",
    )
    .unwrap();
    let set = load_dir(dir.path()).unwrap();
    resolve(
        &set.get("full").unwrap().blueprint,
        &CelScope {
            user: serde_json::json!({"username": "alice"}),
            workspace: serde_json::json!({"id": "alice-1a7fd88", "blueprint": "full"}),
            ..Default::default()
        },
    )
    .unwrap()
}

fn kubernetes_target() -> RenderTarget {
    RenderTarget {
        k8shelld_image: "ghcr.io/k8shell/k8shelld:0.1.0".into(),
        access: DaemonAccess::Secret("alice-1a7fd88-k8shelld".into()),
        restart_policy: "Always",
        namespace: Some("workspaces".into()),
    }
}

#[test]
fn podman_pod() {
    let target = RenderTarget {
        k8shelld_image: "localhost/k8shell-k8shelld:0123456789ab".into(),
        access: DaemonAccess::HostDir("/var/lib/k8shell/workspaces/alice-1a7fd88/run".into()),
        restart_policy: "Never",
        namespace: None,
    };
    check("pod-podman.yaml", &yaml(&render_pod(&spec(), &target)));
    check(
        "k8shelld-podman.toml",
        &render_daemon_config(&spec(), "{\"keys\":[]}", false).unwrap(),
    );
}

/// A pod of the same name made by another platform (another state
/// directory) must not look current: the provisioner would adopt a pod
/// whose socket it cannot reach.
#[test]
fn the_spec_hash_covers_where_the_daemon_is_reached() {
    let at = |dir: &str| RenderTarget {
        k8shelld_image: "localhost/k8shell-k8shelld:0123456789ab".into(),
        access: DaemonAccess::HostDir(dir.into()),
        restart_policy: "Never",
        namespace: None,
    };
    let spec = spec();
    assert_eq!(
        spec_hash(&spec, &at("/a/run")),
        spec_hash(&spec, &at("/a/run"))
    );
    assert_ne!(
        spec_hash(&spec, &at("/a/run")),
        spec_hash(&spec, &at("/b/run"))
    );
}

#[test]
fn kubernetes_objects() {
    let spec = spec();
    let target = kubernetes_target();
    let namespace = target.namespace.clone();
    let config = render_daemon_config(&spec, "{\"keys\":[]}", true).unwrap();
    let tls = DaemonTls {
        cert_pem: "-----BEGIN CERTIFICATE-----\n(server)\n-----END CERTIFICATE-----\n".into(),
        key_pem: "-----BEGIN PRIVATE KEY-----\n(key)\n-----END PRIVATE KEY-----\n".into(),
        client_ca_pem: "-----BEGIN CERTIFICATE-----\n(ca)\n-----END CERTIFICATE-----\n".into(),
    };
    let mut documents = vec![yaml(&render_secret(&spec, &namespace, &config, &tls))];
    for claim in render_claims(&spec, &namespace, Some("fast-ssd")) {
        documents.push(yaml(&claim));
    }
    documents.push(yaml(&render_service(&spec, &namespace)));
    documents.push(yaml(
        &render_network_policy("restricted", &namespace).unwrap(),
    ));
    documents.push(yaml(&render_pod(&spec, &target)));
    check("kubernetes-objects.yaml", &documents.join("---\n"));
    check("k8shelld-kubernetes.toml", &config);
}

#[test]
fn network_policy_classes() {
    for class in ["isolated", "restricted", "open"] {
        let policy = render_network_policy(class, &None).unwrap();
        check(&format!("network-policy-{class}.yaml"), &yaml(&policy));
    }
    let error = render_network_policy("opne", &None).unwrap_err();
    assert!(error.contains("unknown network policy class \"opne\""));
}

#[test]
fn injection_and_eject() {
    let original: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(golden_dir().join("deployment.yaml")).unwrap(),
    )
    .unwrap();
    let spec = spec();
    let target = kubernetes_target();
    let injected = inject(&original, &spec, &target).unwrap();
    check("deployment-injected.yaml", &yaml(&injected));

    // One injected workspace per workload.
    assert_eq!(
        inject(&injected, &spec, &target).unwrap_err(),
        InjectError::AlreadyInjected("alice-1a7fd88".into())
    );
    // Eject gives back exactly the original.
    let ejected = eject(&injected).unwrap();
    let normalised: serde_json::Value = serde_json::to_value(
        serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(original).unwrap(),
    )
    .unwrap();
    assert_eq!(ejected, normalised);
    assert_eq!(eject(&ejected).unwrap_err(), InjectError::NotInjected);

    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    assert_eq!(
        inject(&pod, &spec, &target).unwrap_err(),
        InjectError::Kind("Pod".into())
    );
}
