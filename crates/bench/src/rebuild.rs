use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use futures::StreamExt;
use k8shell_bus::{
    Projection, ProjectionRunner, projection_status, rebuild_projection, stream_name,
};
use k8shell_events::workspace::WorkspaceRequested;
use k8shell_events::{AggregateId, CloudEvent, Context, subject};
use k8shell_provisioner::WorkspaceProjection;
use tokio_util::sync::CancellationToken;

use crate::report::{Section, per_sec, rate};
use crate::setup::BenchEnv;

/// Pads the workspace stream to `target` events, then rebuilds the
/// provisioner's projection from sequence 0 and times it. Baseline: an
/// ordered consumer reading the same stream with no database.
pub async fn rebuild(env: &BenchEnv, target: u64) -> anyhow::Result<Section> {
    let js = env.bus.jetstream().clone();
    let mut stream = js.get_stream(stream_name(Context::Workspace)).await?;
    let mut last = stream.info().await?.state.last_sequence;
    // Pipelined publishes: the padding is set-up, not the measurement.
    let mut pending = Vec::new();
    let mut n = 0u64;
    while last + (pending.len() as u64) < target {
        let id = AggregateId::new(format!("bench-rb-{n}"))?;
        n += 1;
        let event = CloudEvent::new(
            "k8shell/bench",
            &id,
            &WorkspaceRequested {
                workspace_id: id.to_string(),
                username: "bench".into(),
                blueprint: "dev".into(),
                metadata: Default::default(),
            },
        )?;
        pending.push(
            js.publish(subject(Context::Workspace, &id), event.to_json().into())
                .await?,
        );
        if pending.len() >= 1_000 {
            for ack in pending.drain(..) {
                last = last.max(ack.await?.sequence);
            }
        }
    }
    for ack in pending.drain(..) {
        last = last.max(ack.await?.sequence);
    }

    // Baseline: read everything, no database.
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = reader.messages().await?;
    let started = Instant::now();
    let mut read = 0u64;
    while read < last {
        match messages.next().await {
            Some(Ok(_)) => read += 1,
            other => anyhow::bail!("baseline read stopped at {read}: {other:?}"),
        }
    }
    let raw = rate(last as usize, started.elapsed());

    // k8shell: reset the projection and replay it.
    rebuild_projection(&env.bus, &env.pool, &WorkspaceProjection).await?;
    let token = CancellationToken::new();
    let runner = ProjectionRunner::new(
        env.bus.clone(),
        env.pool.clone(),
        Arc::new(WorkspaceProjection),
    );
    let started = Instant::now();
    let task = tokio::spawn(runner.run(token.clone()));
    loop {
        let status = projection_status(&env.pool, WorkspaceProjection.name()).await?;
        if status.last_sequence >= last {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("rebuild stuck at {}", status.last_sequence);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ours = rate(last as usize, started.elapsed());
    token.cancel();
    task.await??;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM workspaces")
        .fetch_one(&env.pool)
        .await?;
    Ok(Section {
        title: format!("Projection rebuild from a {last}-event stream"),
        rows: vec![[
            "events applied per second".into(),
            per_sec(ours),
            per_sec(raw),
            format!("{:.0}%", ours / raw * 100.0),
            "≥ 20,000/s".into(),
        ]],
        note: format!(
            "The provisioner's workspace projection replayed from sequence 0 after `rebuild` ({rows} rows; \
             the stream mixes `requested` inserts with `stopped` updates from the runs above). Baseline: an \
             ordered consumer reading the same stream without touching Postgres."
        ),
    })
}
