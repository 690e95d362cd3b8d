//! The first flow through the backbone: CreateWorkspace appends
//! `workspace.requested`, the provisioner's projection applies it, and
//! GetWorkspace / ListWorkspaces answer from Postgres. Real NATS, real
//! PostgreSQL, the whole platform as `k8shell up` starts it.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use k8shell_proto::provisioner::v1::{
    CreateWorkspaceRequest, GetWorkspaceRequest, ListWorkspacesRequest, WorkspaceState,
};
use k8shell_testkit::TestPlatform;
use tonic::Code;
use tonic::transport::Channel;

async fn client(platform: &TestPlatform) -> ProvisionerServiceClient<Channel> {
    ProvisionerServiceClient::connect(platform.url("provisioner", "grpc"))
        .await
        .unwrap()
}

fn create(username: &str, blueprint: &str) -> CreateWorkspaceRequest {
    CreateWorkspaceRequest {
        username: username.into(),
        blueprint: blueprint.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_get_list_through_events_and_projection() {
    let platform = TestPlatform::start().await.unwrap();
    let mut provisioner = client(&platform).await;
    // A second blueprint, added while the platform runs (it is watched).
    std::fs::write(
        platform.dir().join("blueprints/ops.yaml"),
        "name: ops\ntemplate: dev\n",
    )
    .unwrap();

    // Watch the stream like an SRE would: the event must be plain CloudEvents JSON.
    let nats = async_nats_client(&platform).await;
    let mut events = nats.subscribe("k8shell.evt.workspace.>").await.unwrap();

    let created = provisioner
        .create_workspace(create("alice", "dev"))
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let workspace = created.workspace.unwrap();
    assert!(workspace.id.starts_with("alice-"));
    assert_eq!(workspace.id.len(), "alice-".len() + 7);
    assert_eq!(workspace.state(), WorkspaceState::Requested);

    let message = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        message.subject.as_str(),
        format!("k8shell.evt.workspace.{}", workspace.id)
    );
    let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["type"], "k8shell.workspace.requested.v1");
    assert_eq!(envelope["source"], "k8shell/provisioner");
    assert_eq!(envelope["data"]["username"], "alice");
    let headers = message.headers.unwrap();
    assert_eq!(
        headers.get("Nats-Msg-Id").unwrap().as_str(),
        envelope["id"].as_str().unwrap()
    );

    // Read-your-writes: wait for the projection to reach the version we wrote.
    let fetched = provisioner
        .get_workspace(GetWorkspaceRequest {
            id: workspace.id.clone(),
            min_version: workspace.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.username, "alice");
    assert_eq!(fetched.blueprint, "dev");
    // Provisioning began at once (this platform has no k8shelld to run, so
    // it goes on to fail; the lifecycle is tested against podman elsewhere).
    assert!(fetched.version >= workspace.version);

    // Idempotent: the same request returns the same workspace and appends nothing.
    let again = provisioner
        .create_workspace(create("alice", "dev"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.workspace.unwrap().id, workspace.id);
    let requested_again = async {
        while let Some(message) = events.next().await {
            let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            if envelope["type"] == "k8shell.workspace.requested.v1" {
                return;
            }
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(300), requested_again)
            .await
            .is_err(),
        "a repeated create must not append a request"
    );

    // A second user and blueprint, then list with filters and paging.
    provisioner
        .create_workspace(create("bob", "dev"))
        .await
        .unwrap();
    let mut ops = None;
    for _ in 0..50 {
        match provisioner.create_workspace(create("alice", "ops")).await {
            Ok(created) => {
                ops = Some(created);
                break;
            }
            // The watcher has not picked the new file up yet.
            Err(status) if status.code() == tonic::Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    assert!(ops.is_some(), "the new blueprint was picked up");
    wait_visible(&mut provisioner, 3).await;

    let alice_list = provisioner
        .list_workspaces(ListWorkspacesRequest {
            username: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let blueprints: Vec<&str> = alice_list
        .workspaces
        .iter()
        .map(|w| w.blueprint.as_str())
        .collect();
    assert_eq!(blueprints, ["ops", "dev"], "newest first, only alice's");

    let page1 = provisioner
        .list_workspaces(ListWorkspacesRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.workspaces.len(), 2);
    assert!(!page1.next_page_token.is_empty());
    let page2 = provisioner
        .list_workspaces(ListWorkspacesRequest {
            page_size: 2,
            page_token: page1.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.workspaces.len(), 1);
    assert!(page2.next_page_token.is_empty());

    platform.stop().await.unwrap();
}

async fn wait_visible(provisioner: &mut ProvisionerServiceClient<Channel>, count: usize) {
    for _ in 0..200 {
        let all = provisioner
            .list_workspaces(ListWorkspacesRequest::default())
            .await
            .unwrap()
            .into_inner();
        if all.workspaces.len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("projection did not show {count} workspaces");
}

async fn async_nats_client(platform: &TestPlatform) -> async_nats::Client {
    let state = k8shell_platform::PlatformState::read(platform.dir())
        .unwrap()
        .unwrap();
    async_nats::connect(state.nats_url).await.unwrap()
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let platform = TestPlatform::start().await.unwrap();
    let mut provisioner = client(&platform).await;

    let err = provisioner
        .create_workspace(create("Alice!", "dev"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("invalid username"),
        "{}",
        err.message()
    );

    let err = provisioner
        .create_workspace(create("alice", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("invalid blueprint"),
        "{}",
        err.message()
    );

    let err = provisioner
        .get_workspace(GetWorkspaceRequest {
            id: "nobody-0000000".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = provisioner
        .get_workspace(GetWorkspaceRequest {
            id: "a.b>".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = provisioner
        .list_workspaces(ListWorkspacesRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = provisioner
        .list_workspaces(ListWorkspacesRequest {
            state: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing was appended by the refused requests.
    let all = provisioner
        .list_workspaces(ListWorkspacesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.workspaces.is_empty());
    platform.stop().await.unwrap();
}

#[tokio::test]
async fn external_servers_are_used_when_urls_are_given() {
    let infra = k8shell_testkit::TestInfra::start().await.unwrap();
    let platform = TestPlatform::start_with_urls(
        Some(infra.nats.url()),
        Some(infra.postgres.url().to_owned()),
    )
    .await
    .unwrap();
    let state = platform.platform().state();
    assert!(!state.embedded_nats && !state.embedded_postgres);
    assert!(
        !platform.dir().join("nats").exists(),
        "no private nats-server was started"
    );
    assert!(
        !platform.dir().join("postgres").exists(),
        "no private postgres was started"
    );

    let mut provisioner = client(&platform).await;
    let created = provisioner
        .create_workspace(create("dave", "dev"))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    provisioner
        .get_workspace(GetWorkspaceRequest {
            id: created.id.clone(),
            min_version: created.version,
        })
        .await
        .unwrap();

    // The event is on the given NATS, the row in the given PostgreSQL.
    let bus = infra.bus().await.unwrap();
    let id = k8shell_events::AggregateId::new(created.id.clone()).unwrap();
    let loaded = bus
        .event_store()
        .load(k8shell_events::Context::Workspace, &id)
        .await
        .unwrap();
    // The request, then provisioning (which fails here: no k8shelld).
    assert!(!loaded.events.is_empty());
    assert_eq!(
        loaded.events[0].envelope.event_type,
        "k8shell.workspace.requested.v1"
    );
    let pool = infra.pool("provisioner").await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM workspaces WHERE id = $1")
        .bind(&created.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    platform.stop().await.unwrap();
}
