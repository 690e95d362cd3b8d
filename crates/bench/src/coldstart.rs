//! Workspace cold start against real podman, beside a bare
//! `podman run --rm <image> true` of the same image in the same run:
//!
//! - Create → k8shelld answering (EnsureRunning on a new workspace);
//! - Stopped → EnsureRunning returns (k8shelld answering);
//! - Stop → stopped.

use std::process::Command;
use std::time::{Duration, Instant};

use k8shell_proto::provisioner::v1 as pb;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use k8shell_testkit::{TestProvisioner, containers_conf};
use tonic::transport::Channel;

use crate::report::{Section, ms, percentile, percentile_rows};

const IMAGE: &str = "localhost/k8shell-debian:bookworm";

fn bare_podman_run() -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new("podman")
        .args(["run", "--rm", "--network", "none", IMAGE, "true"])
        .env("CONTAINERS_CONF", containers_conf())
        .status()?;
    anyhow::ensure!(status.success(), "podman run failed");
    Ok(started.elapsed())
}

/// Runs EnsureRunning to its end; errors if it does not end running.
async fn ensure_running(
    client: &mut ProvisionerServiceClient<Channel>,
    request: pb::EnsureRunningRequest,
) -> anyhow::Result<pb::Workspace> {
    let mut stream = client.ensure_running(request).await?.into_inner();
    let mut last = None;
    while let Some(message) = stream.message().await? {
        last = message.workspace;
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("no progress"))?;
    anyhow::ensure!(
        last.state() == pb::WorkspaceState::Running,
        "ended {:?}: {}",
        last.state(),
        last.reason
    );
    Ok(last)
}

async fn stop_and_wait(
    client: &mut ProvisionerServiceClient<Channel>,
    id: &str,
) -> anyhow::Result<Duration> {
    let mut watch = client
        .watch_workspace(pb::WatchWorkspaceRequest {
            id: id.to_owned(),
            until_settled: false,
        })
        .await?
        .into_inner();
    let started = Instant::now();
    client
        .stop_workspace(pb::StopWorkspaceRequest {
            id: id.to_owned(),
            ..Default::default()
        })
        .await?;
    while let Some(message) = watch.message().await? {
        if message.workspace.map(|w| w.state()) == Some(pb::WorkspaceState::Stopped) {
            return Ok(started.elapsed());
        }
    }
    anyhow::bail!("watch ended before {id} stopped")
}

pub async fn cold_start(runs: usize) -> anyhow::Result<Section> {
    let provisioner = TestProvisioner::start("").await?;
    let mut client = ProvisionerServiceClient::connect(provisioner.url.clone()).await?;

    // Warm-up: the k8shelld image build and podman's first-use costs are
    // not what a user waits for on the hundredth workspace.
    bare_podman_run()?;
    let warm = ensure_running(
        &mut client,
        pb::EnsureRunningRequest {
            user_string: "warmup~dev".into(),
            ..Default::default()
        },
    )
    .await?;
    client
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: warm.id,
            keep_volumes: false,
        })
        .await?;

    let mut baseline = Vec::with_capacity(runs);
    let mut create = Vec::with_capacity(runs);
    let mut ids = Vec::with_capacity(runs);
    for n in 0..runs {
        baseline.push(bare_podman_run()?);
        let started = Instant::now();
        let workspace = ensure_running(
            &mut client,
            pb::EnsureRunningRequest {
                username: format!("bench{n}"),
                blueprint: "dev".into(),
                ..Default::default()
            },
        )
        .await?;
        create.push(started.elapsed());
        ids.push(workspace.id);
    }
    // Stop/start cycles on one workspace; the others are removed first so
    // every cycle runs on the same, quiet machine.
    for id in ids.iter().skip(1) {
        client
            .delete_workspace(pb::DeleteWorkspaceRequest {
                id: id.clone(),
                keep_volumes: false,
            })
            .await?;
    }
    let id = ids.first().cloned().unwrap_or_default();
    let mut stops = Vec::with_capacity(runs);
    let mut starts = Vec::with_capacity(runs);
    for _ in 0..runs {
        stops.push(stop_and_wait(&mut client, &id).await?);
        let started = Instant::now();
        ensure_running(
            &mut client,
            pb::EnsureRunningRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
        starts.push(started.elapsed());
    }
    client
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id,
            keep_volumes: false,
        })
        .await?;
    provisioner.stop().await;

    for samples in [&mut baseline, &mut create, &mut stops, &mut starts] {
        samples.sort();
    }
    let mut rows = Vec::new();
    for mut row in percentile_rows(&create, &baseline, ["", ""]) {
        row[0] = format!("create → k8shelld answers, {}", row[0]);
        rows.push(row);
    }
    for mut row in percentile_rows(&starts, &baseline, ["≤ 1 s", "≤ 2 s"]) {
        row[0] = format!("stopped → EnsureRunning returns, {}", row[0]);
        rows.push(row);
    }
    for (name, p, target) in [("p50", 0.5, "≤ 3 s"), ("p99", 0.99, "≤ 3 s")] {
        rows.push([
            format!("stop → stopped, {name}"),
            ms(percentile(&stops, p)),
            "—".to_owned(),
            "—".to_owned(),
            target.to_owned(),
        ]);
    }
    Ok(Section {
        title: format!("Workspace cold start, {runs} runs each (podman, `dev` blueprint)"),
        rows,
        note: "Baseline: `podman run --rm --network none localhost/k8shell-debian:bookworm true` \
               in the same run, which starts one container and exits; a workspace start \
               is a pod (infra + install step + workspace container), k8shelld's boot \
               (user, volumes) and its first authenticated answer. EnsureRunning returns \
               only after k8shelld answered a GetActivity call with a workspace token."
            .to_owned(),
    })
}
