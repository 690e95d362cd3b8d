//! The Kubernetes runtime at the API-call level: a mock API server (no
//! cluster can run here) checks what the runtime sends and answers as a
//! server would. `kubernetes_cluster_end_to_end` runs the real thing when
//! a cluster is configured.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8shell_provisioner::blueprint::{CelScope, WorkspaceSpec, load_dir, resolve};
use k8shell_provisioner::runtime::Runtime;
use k8shell_provisioner::runtime::kubernetes::{KubernetesConfig, KubernetesRuntime};
use kube::client::Body;
use tokio::sync::mpsc;

#[derive(Debug)]
struct Seen {
    method: Method,
    uri: String,
    content_type: String,
    body: serde_json::Value,
}

fn spec() -> WorkspaceSpec {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bp.yaml"),
        "name: dev\nimage: debian:bookworm\nnetworkPolicy: isolated\n\
         storages:\n  - {name: home, type: local, path: /home/alice, retain: true}\n  - {name: cache, type: local, path: /cache}\n",
    )
    .unwrap();
    let set = load_dir(dir.path()).unwrap();
    resolve(
        &set.get("dev").unwrap().blueprint,
        &CelScope {
            user: serde_json::json!({"username": "alice"}),
            workspace: serde_json::json!({"id": "alice-1a7fd88", "blueprint": "dev"}),
            ..Default::default()
        },
    )
    .unwrap()
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "reason": reason, "message": reason, "code": code,
    });
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn json(value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(value).unwrap()))
        .unwrap()
}

fn running_pod(applied: &serde_json::Value, running: bool) -> serde_json::Value {
    let mut pod = applied.clone();
    pod["status"] = if running {
        serde_json::json!({"phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "initContainerStatuses": [{"name": "install-k8shelld", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}],
            "containerStatuses": [{"name": "workspace", "image": "x", "imageID": "", "ready": true,
                "restartCount": 0, "state": {"running": {}}}]})
    } else {
        serde_json::json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}]})
    };
    pod
}

fn pod_list(pod: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": "1"},
        "items": [pod],
    })
}

/// Serves requests with `answer` until the client goes away; returns them.
fn mock_server<F>(answer: F) -> (kube::Client, tokio::task::JoinHandle<Vec<Seen>>)
where
    F: Fn(&Seen, &[Seen]) -> Response<Body> + Send + 'static,
{
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen: Vec<Seen> = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let request = Seen {
                method: parts.method,
                uri: parts.uri.to_string(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            };
            send.send_response(answer(&request, &seen));
            seen.push(request);
        }
        seen
    });
    (kube::Client::new(service, "ws"), server)
}

fn config() -> KubernetesConfig {
    KubernetesConfig {
        namespace: "ws".into(),
        poll_interval: Duration::from_millis(5),
        ..Default::default()
    }
}

#[tokio::test]
async fn provision_applies_every_object_server_side_and_follows_the_pod() {
    let (client, server) = mock_server(|request, seen| {
        let pod_path = "/api/v1/namespaces/ws/pods/alice-1a7fd88";
        let applied = seen
            .iter()
            .find(|s| s.method == Method::PATCH && s.uri.starts_with(pod_path));
        match (&request.method, request.uri.split('?').next().unwrap()) {
            (&Method::PATCH, _) => json(&request.body),
            // Before the apply: no such pod.
            (&Method::GET, path) if path == pod_path => status(404, "NotFound"),
            // The watcher: a list (pending), then a watch (running).
            (&Method::GET, "/api/v1/namespaces/ws/pods") => {
                let applied = &applied.unwrap().body;
                if request.uri.contains("watch=true") {
                    let mut pod = running_pod(applied, true);
                    pod["metadata"]["resourceVersion"] = "2".into();
                    let event = serde_json::json!({"type": "MODIFIED", "object": pod});
                    Response::builder()
                        .body(Body::from(format!("{event}\n").into_bytes()))
                        .unwrap()
                } else {
                    json(&pod_list(running_pod(applied, false)))
                }
            }
            _ => status(404, "NotFound"),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let runtime = KubernetesRuntime::new(client, config(), dir.path()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let endpoint = runtime
        .provision(&spec(), "workspace_id = \"alice-1a7fd88\"\n", &tx)
        .await
        .unwrap();
    assert_eq!(endpoint, "https://alice-1a7fd88.ws.svc:7400");
    drop(runtime);
    let seen = server.await.unwrap();

    let applied: Vec<String> = seen
        .iter()
        .filter(|s| s.method == Method::PATCH)
        .map(|s| s.uri.split('?').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        applied,
        [
            "/api/v1/namespaces/ws/secrets/alice-1a7fd88-k8shelld",
            "/api/v1/namespaces/ws/persistentvolumeclaims/alice-1a7fd88-k8shell-state",
            "/api/v1/namespaces/ws/persistentvolumeclaims/alice-1a7fd88-home",
            "/api/v1/namespaces/ws/persistentvolumeclaims/alice-1a7fd88-cache",
            "/api/v1/namespaces/ws/services/alice-1a7fd88",
            "/apis/networking.k8s.io/v1/namespaces/ws/networkpolicies/k8shell-isolated",
            "/api/v1/namespaces/ws/pods/alice-1a7fd88",
        ]
    );
    for request in seen.iter().filter(|s| s.method == Method::PATCH) {
        assert!(
            request.uri.contains("fieldManager=k8shell") && request.uri.contains("force=true"),
            "server-side apply as k8shell, forced: {}",
            request.uri
        );
        assert_eq!(request.content_type, "application/apply-patch+yaml");
    }
    let secret = &seen[0].body;
    assert!(secret["data"]["tls.crt"].is_string() && secret["data"]["ca.crt"].is_string());
    let home = &seen[2].body;
    assert_eq!(home["metadata"]["labels"]["k8shell.io/retain"], "true");
    let pod = &seen
        .iter()
        .rfind(|s| s.method == Method::PATCH)
        .unwrap()
        .body;
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(
        pod["metadata"]["labels"]["k8shell.io/network-policy"],
        "isolated"
    );

    let mut stages = Vec::new();
    while let Ok(progress) = rx.try_recv() {
        stages.push(progress.stage);
    }
    assert_eq!(stages, ["Creating", "Scheduling", "Running"]);
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_start_with_the_reason() {
    let (client, server) = mock_server(|request, seen| {
        match (&request.method, request.uri.split('?').next().unwrap()) {
            (&Method::PATCH, _) => json(&request.body),
            (&Method::GET, "/api/v1/namespaces/ws/pods") => {
                let applied = &seen
                    .iter()
                    .rfind(|s| s.method == Method::PATCH)
                    .unwrap()
                    .body;
                let mut pod = applied.clone();
                pod["status"] = serde_json::json!({"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "containerStatuses": [{"name": "workspace", "image": "debian:bookworm", "imageID": "",
                        "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}}]});
                json(&pod_list(pod))
            }
            _ => status(404, "NotFound"),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let runtime = KubernetesRuntime::new(client, config(), dir.path()).unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let error = runtime.provision(&spec(), "", &tx).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("ErrImagePull: workspace manifest unknown"),
        "{error}"
    );
    drop(runtime);
    server.await.unwrap();
}

#[tokio::test]
async fn delete_with_retention_keeps_only_retained_claims() {
    let (client, server) = mock_server(|request, _| match request.method {
        Method::DELETE => status(200, "Success"),
        Method::GET if request.uri.contains("persistentvolumeclaims") => json(&serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {},
        "items": [
            {"metadata": {"name": "alice-1a7fd88-home", "labels": {"k8shell.io/retain": "true"}}},
            {"metadata": {"name": "alice-1a7fd88-cache"}},
            {"metadata": {"name": "alice-1a7fd88-k8shell-state"}},
        ]})),
        _ => status(404, "NotFound"),
    });
    let dir = tempfile::tempdir().unwrap();
    let runtime = KubernetesRuntime::new(client, config(), dir.path()).unwrap();
    runtime.delete("alice-1a7fd88", true).await.unwrap();
    drop(runtime);
    let seen = server.await.unwrap();
    let deleted: Vec<String> = seen
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| s.uri.split('?').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        deleted,
        [
            "/api/v1/namespaces/ws/pods/alice-1a7fd88",
            "/api/v1/namespaces/ws/secrets/alice-1a7fd88-k8shelld",
            "/api/v1/namespaces/ws/services/alice-1a7fd88",
            "/api/v1/namespaces/ws/persistentvolumeclaims/alice-1a7fd88-cache",
            "/api/v1/namespaces/ws/persistentvolumeclaims/alice-1a7fd88-k8shell-state",
        ]
    );
    let list = seen.iter().find(|s| s.method == Method::GET).unwrap();
    assert!(
        list.uri
            .contains("labelSelector=k8shell.io%2Fworkspace%3Dalice-1a7fd88"),
        "{}",
        list.uri
    );
}

#[tokio::test]
async fn injection_replaces_the_workload_and_eject_restores_it() {
    let deployment: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/deployment.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let stored = std::sync::Arc::new(std::sync::Mutex::new({
        let mut d = deployment.clone();
        d["metadata"]["resourceVersion"] = "41".into();
        d
    }));
    let state = stored.clone();
    let (client, server) = mock_server(move |request, _| {
        let path = request.uri.split('?').next().unwrap();
        match (&request.method, path) {
            (&Method::PATCH, _) => json(&request.body),
            (&Method::GET, "/apis/apps/v1/namespaces/team-a/deployments/api") => {
                json(&state.lock().unwrap())
            }
            (&Method::PUT, "/apis/apps/v1/namespaces/team-a/deployments/api") => {
                *state.lock().unwrap() = request.body.clone();
                json(&request.body)
            }
            _ => status(404, "NotFound"),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let runtime = KubernetesRuntime::new(client, config(), dir.path()).unwrap();
    runtime
        .inject_workload("team-a", "Deployment", "api", &spec(), "")
        .await
        .unwrap();
    {
        let injected = stored.lock().unwrap();
        assert_eq!(
            injected["metadata"]["resourceVersion"], "41",
            "the update carries the version it read"
        );
        let containers = injected["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[1]["name"], "alice-1a7fd88-k8shelld");
    }
    let again = runtime
        .inject_workload("team-a", "Deployment", "api", &spec(), "")
        .await
        .unwrap_err();
    assert!(
        again
            .to_string()
            .contains("already has workspace alice-1a7fd88"),
        "{again}"
    );
    runtime
        .eject_workload("team-a", "deployment", "api")
        .await
        .unwrap();
    let ejected = stored.lock().unwrap().clone();
    assert_eq!(
        ejected["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(ejected["metadata"]["annotations"].is_null());
    let pod = runtime
        .inject_workload("team-a", "CronJob", "x", &spec(), "")
        .await
        .unwrap_err();
    assert!(
        pod.to_string().contains("cannot inject into a cronjob"),
        "{pod}"
    );
    drop(runtime);
    let seen = server.await.unwrap();
    assert!(
        seen.iter().any(|s| s.method == Method::PATCH
            && s.uri.starts_with("/api/v1/namespaces/team-a/secrets/")),
        "the config secret goes to the workload's namespace"
    );
}

/// Against a real cluster: `KUBECONFIG=… K8SHELL_K8S_TEST_IMAGE=<image with
/// sh> cargo nextest run -p k8shell-provisioner --run-ignored only`. It
/// provisions into namespace `k8shell-e2e` (which must exist), checks the
/// pod runs, stops and deletes it. No cluster can run on the development
/// machines of this project, so it is ignored by default.
#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG) and a k8shelld image"]
async fn kubernetes_cluster_end_to_end() {
    let image =
        std::env::var("K8SHELL_K8S_TEST_IMAGE").unwrap_or_else(|_| "debian:bookworm".into());
    let mut spec = spec();
    spec.image = image;
    spec.network_policy = None;
    let dir = tempfile::tempdir().unwrap();
    let runtime = KubernetesRuntime::connect(
        KubernetesConfig {
            namespace: "k8shell-e2e".into(),
            ..Default::default()
        },
        dir.path(),
    )
    .await
    .unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let endpoint = runtime.provision(&spec, "", &tx).await.unwrap();
    assert!(endpoint.starts_with("https://"));
    assert_eq!(
        runtime.state(&spec.workspace_id).await.unwrap(),
        k8shell_provisioner::runtime::ActualState::Running
    );
    runtime
        .stop(&spec.workspace_id, Duration::from_secs(3))
        .await
        .unwrap();
    runtime.delete(&spec.workspace_id, false).await.unwrap();
}
