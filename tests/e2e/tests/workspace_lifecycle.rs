//! The provisioner against real podman: blueprints → pods → k8shelld.
//!
//! Needs podman, the static k8shelld (`K8SHELL_K8SHELLD_STATIC`) and the
//! Debian workspace image, all of which `./scripts/test` provides; a
//! missing piece fails with what to do.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_proto::provisioner::v1 as pb;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use k8shell_provisioner::tokens::WorkspaceTokens;
use k8shell_testkit::{TestProvisioner, containers_conf, exec, unix_channel};
use tonic::transport::Channel;

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .output()
        .expect("podman is installed (scripts/test installs it)")
}

/// Blueprints of these tests, beside the repository's defaults.
const TEST_BLUEPRINTS: &str = r#"
name: team-a
template: dev
storages:
  - {name: team, type: shared, path: /team}
---
name: team-b
template: dev
storages:
  - {name: team, type: shared, path: /team}
---
name: sleepy
template: dev
idleTimeout: 4s
"#;

struct Harness {
    client: ProvisionerServiceClient<Channel>,
    tokens: std::sync::Arc<WorkspaceTokens>,
    blueprints: PathBuf,
    provisioner: TestProvisioner,
    /// Users whose leftovers were removed.
    users: std::collections::HashSet<String>,
}

impl Harness {
    async fn start() -> Self {
        let provisioner = TestProvisioner::start(TEST_BLUEPRINTS).await.unwrap();
        let client = ProvisionerServiceClient::connect(provisioner.url.clone())
            .await
            .unwrap();
        let tokens = provisioner.tokens.clone();
        Self {
            client,
            tokens,
            blueprints: provisioner.blueprints.clone(),
            provisioner,
            users: Default::default(),
        }
    }

    async fn stop(self) {
        self.provisioner.stop().await;
    }

    /// Creates (and starts) a workspace and waits until it runs. The
    /// first time a user appears, pods and volumes an earlier, failed run
    /// left under the same names are removed (each user belongs to one
    /// test; a second workspace of the user must find its retained volumes).
    async fn running(&mut self, username: &str, blueprint: &str) -> pb::Workspace {
        if self.users.insert(username.to_owned()) {
            k8shell_testkit::remove_workspaces_of(username);
        }
        let created = self
            .client
            .create_workspace(pb::CreateWorkspaceRequest {
                username: username.into(),
                blueprint: blueprint.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let id = created.workspace.unwrap().id;
        self.settle(&id).await
    }

    /// The projection's row once it shows `state` (it follows the event
    /// stream within moments; the last row read after 2 s otherwise).
    async fn read_model_at(&mut self, id: &str, state: pb::WorkspaceState) -> pb::Workspace {
        let mut workspace = pb::Workspace::default();
        for _ in 0..100 {
            workspace = self
                .client
                .get_workspace(pb::GetWorkspaceRequest {
                    id: id.to_owned(),
                    min_version: 0,
                })
                .await
                .unwrap()
                .into_inner();
            if workspace.state() == state {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        workspace
    }

    /// Follows a workspace until it settles; returns it (RUNNING expected).
    async fn settle(&mut self, id: &str) -> pb::Workspace {
        let events = self.events_until_settled(id).await;
        let last = events.last().unwrap().workspace.clone().unwrap();
        assert_eq!(
            last.state(),
            pb::WorkspaceState::Running,
            "workspace {id} did not start: {:?}",
            events
                .iter()
                .map(|e| (&e.event, &e.detail))
                .collect::<Vec<_>>()
        );
        last
    }

    /// The workspace's progress stream.
    async fn watch(
        &mut self,
        id: &str,
        until_settled: bool,
    ) -> tonic::Streaming<pb::WorkspaceProgress> {
        self.client
            .watch_workspace(pb::WatchWorkspaceRequest {
                id: id.into(),
                until_settled,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn events_until_settled(&mut self, id: &str) -> Vec<pb::WorkspaceProgress> {
        let mut stream = self.watch(id, true).await;
        let mut events = Vec::new();
        let collect = async {
            while let Some(message) = stream.message().await.unwrap() {
                events.push(message);
            }
        };
        tokio::time::timeout(Duration::from_secs(90), collect)
            .await
            .expect("the workspace settles within 90 s");
        events
    }

    /// Waits until `id` reaches `state`, following its events.
    async fn wait_for(&mut self, id: &str, state: pb::WorkspaceState) -> Vec<String> {
        let mut stream = self.watch(id, false).await;
        let mut seen = Vec::new();
        let wait = async {
            while let Some(message) = stream.message().await.unwrap() {
                seen.push(message.event.clone());
                if message.workspace.unwrap().state() == state {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(90), wait)
            .await
            .unwrap_or_else(|_| panic!("{id} never reached {state:?}; saw {seen:?}"));
        seen
    }

    async fn sh(&self, workspace: &pb::Workspace, script: &str) -> k8shell_testkit::ExecOutput {
        let socket = workspace.endpoint.strip_prefix("unix://").unwrap();
        let mut client = K8shelldClient::new(unix_channel(Path::new(socket)).await.unwrap());
        let token = self.tokens.token(&workspace.id).await.unwrap();
        exec(&mut client, &token, &["sh", "-c", script], "")
            .await
            .unwrap()
    }
}

/// A fresh token straight from identity (not the provisioner's cache), and
/// the id of the key that signed it.
async fn fresh_token(identity_url: &str, workspace_id: &str) -> (String, String) {
    use k8shell_proto::identity::v1 as id_pb;
    let mut identity =
        id_pb::identity_service_client::IdentityServiceClient::connect(identity_url.to_owned())
            .await
            .unwrap();
    let token = identity
        .issue_service_token(id_pb::IssueServiceTokenRequest {
            service: "e2e".into(),
            workspace_id: workspace_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    (token, kid)
}

async fn cleanup(harness: &mut Harness, id: &str) {
    let _ = harness
        .client
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: id.into(),
            keep_volumes: false,
        })
        .await;
}

#[tokio::test]
async fn dev_workspace_lifecycle_user_init_scripts_storage_and_retention() {
    let mut h = Harness::start().await;
    let ws = h.running("alice", "dev").await;
    assert!(ws.id.starts_with("alice-"), "{}", ws.id);

    let id = h.sh(&ws, "id -un; id -u; cat $HOME/WELCOME; pwd").await;
    let lines: Vec<&str> = id.stdout.lines().collect();
    assert_eq!(lines[0], "alice", "{id:?}");
    assert_eq!(lines[1], "1000");
    assert_eq!(
        lines[2],
        format!("Welcome to {}.", ws.id),
        "init script ran"
    );
    let git = h.sh(&ws, "git config --global init.defaultBranch").await;
    assert_eq!(git.stdout.trim(), "main", "the second init script ran too");

    // Local storage survives stop and start.
    h.sh(&ws, "echo kept > $HOME/note").await;
    let stopped = h
        .client
        .stop_workspace(pb::StopWorkspaceRequest {
            id: ws.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.id, ws.id);
    h.wait_for(&ws.id, pb::WorkspaceState::Stopped).await;
    let state = podman(&[
        "container",
        "inspect",
        &format!("{}-workspace", ws.id),
        "--format",
        "{{.State.Status}}",
    ]);
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "exited");
    h.client
        .start_workspace(pb::StartWorkspaceRequest { id: ws.id.clone() })
        .await
        .unwrap();
    let ws = h.settle(&ws.id).await;
    assert_eq!(h.sh(&ws, "cat $HOME/note").await.stdout, "kept\n");
    let reruns = h.sh(&ws, "cat $HOME/WELCOME | wc -l").await;
    assert_eq!(reruns.stdout.trim(), "1", "init scripts run once");

    // Delete with retention keeps the home volume; the same user and
    // blueprint get the same id back, and the volume with it.
    h.client
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: ws.id.clone(),
            keep_volumes: true,
        })
        .await
        .unwrap();
    let volume = format!("{}-home", ws.id);
    assert!(podman(&["volume", "exists", &volume]).status.success());
    assert!(
        !podman(&["volume", "exists", &format!("{}-scratch", ws.id)])
            .status
            .success(),
        "scratch volumes go with the workspace"
    );
    assert!(
        !podman(&["pod", "exists", &ws.id]).status.success(),
        "the pod is gone"
    );
    let again = h.running("alice", "dev").await;
    assert_eq!(again.id, ws.id);
    assert_eq!(h.sh(&again, "cat $HOME/note").await.stdout, "kept\n");

    // Without retention, everything goes.
    cleanup(&mut h, &again.id).await;
    assert!(!podman(&["volume", "exists", &volume]).status.success());
    h.stop().await;
}

#[tokio::test]
async fn shared_storage_is_seen_by_two_workspaces() {
    let mut h = Harness::start().await;
    let a = h.running("bob", "team-a").await;
    let b = h.running("bob", "team-b").await;
    assert_ne!(a.id, b.id);
    let wrote = h.sh(&a, "echo hello-from-a > /team/greeting").await;
    assert_eq!(
        wrote.exit.code,
        Some(0),
        "the user owns the shared volume: {wrote:?}"
    );
    assert_eq!(
        h.sh(&b, "cat /team/greeting").await.stdout,
        "hello-from-a\n"
    );
    cleanup(&mut h, &a.id).await;
    cleanup(&mut h, &b.id).await;
    assert!(
        podman(&["volume", "exists", "k8shell-shared-bob-team"])
            .status
            .success(),
        "shared volumes outlive the workspaces"
    );
    let _ = podman(&["volume", "rm", "-f", "k8shell-shared-bob-team"]);
    h.stop().await;
}

#[tokio::test]
async fn a_killed_container_is_noticed_and_restarted() {
    let mut h = Harness::start().await;
    let ws = h.running("carol", "dev").await;
    // Follow the workspace from before the kill, so no step is missed.
    let mut watch = h.watch(&ws.id, false).await;
    let killed = podman(&["kill", &format!("{}-workspace", ws.id)]);
    assert!(killed.status.success());
    let mut seen = Vec::new();
    let follow = async {
        while let Some(message) = watch.message().await.unwrap() {
            let state = message.workspace.as_ref().unwrap().state();
            seen.push((message.event.clone(), message.detail.clone()));
            if state == pb::WorkspaceState::Running && seen.iter().any(|(e, _)| e == "failed") {
                return message.workspace.unwrap();
            }
        }
        panic!("the watch ended");
    };
    let ws = tokio::time::timeout(Duration::from_secs(90), follow)
        .await
        .unwrap_or_else(|_| panic!("no restart; saw {seen:?}"));
    let failure = seen.iter().find(|(e, _)| e == "failed").unwrap();
    assert!(failure.1.contains("exited with code 137"), "{seen:?}");
    assert_eq!(h.sh(&ws, "echo back").await.stdout, "back\n");
    cleanup(&mut h, &ws.id).await;
    h.stop().await;
}

#[tokio::test]
async fn two_concurrent_starts_start_once_and_ensure_running_cold_starts() {
    let mut h = Harness::start().await;
    let ws = h.running("dave", "dev").await;
    h.client
        .stop_workspace(pb::StopWorkspaceRequest {
            id: ws.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.wait_for(&ws.id, pb::WorkspaceState::Stopped).await;

    let mut watch = h.watch(&ws.id, false).await;
    let (mut c1, mut c2) = (h.client.clone(), h.client.clone());
    let request = || pb::StartWorkspaceRequest { id: ws.id.clone() };
    let (r1, r2) = tokio::join!(c1.start_workspace(request()), c2.start_workspace(request()));
    assert!(r1.is_ok() && r2.is_ok(), "{r1:?} {r2:?}");
    let mut claims = 0;
    let collect = async {
        while let Some(message) = watch.message().await.unwrap() {
            let workspace = message.workspace.unwrap();
            if message.event == "provisioning"
                && workspace.stage == "Starting"
                && workspace.progress_percent == 5
            {
                claims += 1;
            }
            if workspace.state() == pb::WorkspaceState::Running {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), collect)
        .await
        .unwrap();
    assert_eq!(claims, 1, "two starts, one start");

    // Cold start: EnsureRunning on a stopped workspace returns once
    // k8shelld answers, with progress on the way.
    h.client
        .stop_workspace(pb::StopWorkspaceRequest {
            id: ws.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.wait_for(&ws.id, pb::WorkspaceState::Stopped).await;
    let mut stream = h
        .client
        .ensure_running(pb::EnsureRunningRequest {
            user_string: "dave~dev".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let mut last = None;
    while let Some(message) = stream.message().await.unwrap() {
        events.push(message.event.clone());
        last = message.workspace;
    }
    let last = last.unwrap();
    assert_eq!(last.state(), pb::WorkspaceState::Running, "{events:?}");
    assert!(events.contains(&"provisioning".to_owned()), "{events:?}");
    assert_eq!(
        h.sh(&last, "echo up").await.stdout,
        "up\n",
        "k8shelld answers at once"
    );

    // A delayed stop: recorded as an event, carried out when due.
    let asked = std::time::Instant::now();
    h.client
        .stop_workspace(pb::StopWorkspaceRequest {
            id: ws.id.clone(),
            delay_seconds: 2,
            reason: "lunch".into(),
        })
        .await
        .unwrap();
    // Read-your-writes: the projection may still be behind the running
    // event EnsureRunning reported (it answers from the event stream).
    let still = h
        .client
        .get_workspace(pb::GetWorkspaceRequest {
            id: ws.id.clone(),
            min_version: last.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.state(), pb::WorkspaceState::Running);
    h.wait_for(&ws.id, pb::WorkspaceState::Stopped).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        asked.elapsed()
    );
    let stopped = h.read_model_at(&ws.id, pb::WorkspaceState::Stopped).await;
    assert_eq!(stopped.reason, "lunch");
    cleanup(&mut h, &ws.id).await;
    h.stop().await;
}

#[tokio::test]
async fn idle_workspaces_are_warned_then_stopped() {
    let mut h = Harness::start().await;
    let ws = h.running("erin", "sleepy").await;
    let seen = h.wait_for(&ws.id, pb::WorkspaceState::Stopped).await;
    let warning = seen.iter().position(|e| e == "idle_warning");
    let stopping = seen.iter().position(|e| e == "stopping");
    assert!(
        matches!((warning, stopping), (Some(w), Some(s)) if w < s),
        "a warning comes before the stop: {seen:?}"
    );
    let workspace = h.read_model_at(&ws.id, pb::WorkspaceState::Stopped).await;
    assert_eq!(workspace.reason, "idle");
    cleanup(&mut h, &ws.id).await;
    h.stop().await;
}

#[tokio::test]
async fn objects_of_a_deleted_workspace_are_collected() {
    let mut h = Harness::start().await;
    let ws = h.running("gail", "dev").await;
    // A delete whose runtime part never happened (provisioner killed
    // between the event and the cleanup): only the event is there.
    let store = h.provisioner.event_store().await.unwrap();
    let id = k8shell_events::AggregateId::new(ws.id.clone()).unwrap();
    let deleted = k8shell_events::CloudEvent::new(
        "test",
        &id,
        &k8shell_events::workspace::WorkspaceDeleted {
            volumes_retained: true,
        },
    )
    .unwrap();
    store
        .append(
            k8shell_events::Context::Workspace,
            &id,
            k8shell_bus::ExpectedVersion::Any,
            &[deleted],
        )
        .await
        .unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if !podman(&["pod", "exists", &ws.id]).status.success() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the pod of the deleted workspace was removed");
    let home = format!("{}-home", ws.id);
    assert!(
        podman(&["volume", "exists", &home]).status.success(),
        "retained volumes stay"
    );
    let _ = podman(&["volume", "rm", "-f", &home]);
    h.stop().await;
}

#[tokio::test]
async fn an_attached_session_keeps_an_idle_workspace_running() {
    use k8shell_proto::k8shelld::v1::{ShellRequest, ShellStart, shell_request};
    let mut h = Harness::start().await;
    let ws = h.running("fiona", "sleepy").await;
    // Attach a shell and type nothing: idle by input, but someone is there.
    let socket = ws.endpoint.strip_prefix("unix://").unwrap().to_owned();
    let mut daemon = K8shelldClient::new(unix_channel(Path::new(&socket)).await.unwrap());
    let token = h.tokens.token(&ws.id).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ShellRequest {
        msg: Some(shell_request::Msg::Start(ShellStart {
            argv: vec!["sh".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let shell = daemon
        .shell(k8shell_testkit::bearer(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    // Twice the idle timeout (4 s) with the client attached.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let now = h
        .client
        .get_workspace(pb::GetWorkspaceRequest {
            id: ws.id.clone(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        now.state(),
        pb::WorkspaceState::Running,
        "never stopped under an attached client"
    );
    // Detach: the idle clock starts now, and the workspace stops.
    drop(tx);
    drop(shell);
    h.wait_for(&ws.id, pb::WorkspaceState::Stopped).await;
    cleanup(&mut h, &ws.id).await;
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_and_broken_blueprints_get_clear_errors() {
    let mut h = Harness::start().await;
    let missing = h
        .client
        .create_workspace(pb::CreateWorkspaceRequest {
            username: "frank".into(),
            blueprint: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(missing.message().contains("blueprint \"nope\""));
    let template = h
        .client
        .create_workspace(pb::CreateWorkspaceRequest {
            user_string: "frank~base".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(template.code(), tonic::Code::InvalidArgument);
    assert!(template.message().contains("template"), "{template:?}");
    let bad_string = h
        .client
        .create_workspace(pb::CreateWorkspaceRequest {
            user_string: "Frank~dev".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_string.code(), tonic::Code::InvalidArgument);
    let unknown = h
        .client
        .start_workspace(pb::StartWorkspaceRequest {
            id: "frank-0000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // A broken file: the error names file, blueprint and field; the last
    // good set stays in force.
    std::fs::write(
        h.blueprints.join("broken.yaml"),
        "name: broken\ntemplate: dev\nresources: {limits: {memory: lots}}\n",
    )
    .unwrap();
    let mut errors = Vec::new();
    for _ in 0..50 {
        let listed = h
            .client
            .list_blueprints(pb::ListBlueprintsRequest {
                include_templates: true,
            })
            .await
            .unwrap()
            .into_inner();
        if !listed.errors.is_empty() {
            assert!(listed.blueprints.iter().any(|b| b.name == "dev"));
            assert!(
                listed
                    .blueprints
                    .iter()
                    .any(|b| b.name == "base" && b.is_template)
            );
            errors = listed.errors;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("broken.yaml: blueprint \"broken\": resources.limits.memory"),
        "{errors:?}"
    );
    h.stop().await;
}

/// Identity rotates its signing key while a workspace runs (every 20 s in
/// the tests); the provisioner gives the workspace each new key set, so a
/// token signed by a key that did not exist when the workspace started is
/// accepted.
#[tokio::test]
async fn identity_key_rotations_reach_running_workspaces() {
    let mut h = Harness::start().await;
    let ws = h.running("gus", "dev").await;
    let identity_url = h.provisioner.identity_url.clone();
    let (_, first_kid) = fresh_token(&identity_url, &ws.id).await;
    // Two rotations: the signer is then a key created after the workspace
    // was given its keys (the first rotation's new "next" key).
    let mut kids = vec![first_kid];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while kids.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotations: {kids:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, kid) = fresh_token(&identity_url, &ws.id).await;
        if kids.last() != Some(&kid) {
            kids.push(kid);
        }
    }
    // Pushes happen on the provisioner's 2 s reconcile tick.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (token, _) = fresh_token(&identity_url, &ws.id).await;
    let socket = ws.endpoint.strip_prefix("unix://").unwrap();
    let mut client = K8shelldClient::new(unix_channel(Path::new(socket)).await.unwrap());
    let output = exec(&mut client, &token, &["true"], "").await.unwrap();
    assert_eq!(output.exit.code, Some(0), "{output:?}");
    cleanup(&mut h, &ws.id).await;
    h.stop().await;
}
