use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8shell_bus::{
    ApplyError, ExpectedVersion, Projection, ProjectionRunner, Rejection, StoredEvent,
};
use k8shell_events::workspace::WorkspaceRequested;
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent, subject};
use k8shell_provisioner::WorkspaceProjection;
use sqlx::PgConnection;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::report::{Section, ms, percentile};
use crate::setup::BenchEnv;

/// The provisioner's real projection plus a NOTIFY, which Postgres delivers
/// only when the applying transaction commits: the moment a reader can see
/// the row.
struct NotifyingProjection;

impl Projection for NotifyingProjection {
    fn name(&self) -> &'static str {
        "bench-latency"
    }
    fn context(&self) -> Context {
        Context::Workspace
    }
    fn apply<'a>(
        &'a self,
        db: &'a mut PgConnection,
        stored: &'a StoredEvent,
        event: &'a DomainEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            WorkspaceProjection.apply(&mut *db, stored, event).await?;
            sqlx::query("SELECT pg_notify('k8shell_bench', $1)")
                .bind(&stored.envelope.subject)
                .execute(&mut *db)
                .await?;
            Ok(())
        })
    }
    fn reset<'a>(&'a self, db: &'a mut PgConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        WorkspaceProjection.reset(db)
    }
    fn apply_batch<'a>(
        &'a self,
        db: &'a mut PgConnection,
        events: &'a [(StoredEvent, DomainEvent)],
    ) -> BoxFuture<'a, Result<Vec<Rejection>, sqlx::Error>> {
        Box::pin(async move {
            let rejected = WorkspaceProjection.apply_batch(&mut *db, events).await?;
            let subjects: Vec<&str> = events
                .iter()
                .map(|(s, _)| s.envelope.subject.as_str())
                .collect();
            sqlx::query("SELECT pg_notify('k8shell_bench', s) FROM UNNEST($1::text[]) AS s")
                .bind(&subjects)
                .execute(&mut *db)
                .await?;
            Ok(rejected)
        })
    }
}

fn requested(id: &AggregateId) -> CloudEvent {
    CloudEvent::new(
        "k8shell/bench",
        id,
        &WorkspaceRequested {
            workspace_id: id.to_string(),
            username: "bench".into(),
            blueprint: "dev".into(),
            metadata: Default::default(),
        },
    )
    .unwrap()
}

/// Appends `count` new workspaces at `rate` per second and measures, for
/// each, the time from the start of the append to the commit of the
/// projection row. Baseline: raw publish → ack at the same rate.
pub async fn steady_rate(env: &BenchEnv, rate: u32, count: usize) -> anyhow::Result<Section> {
    let interval = Duration::from_secs(1) / rate;

    // Baseline: raw publishes of the same payloads at the same rate.
    let js = env.bus.jetstream().clone();
    let raw_latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut ticker = tokio::time::interval(interval);
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        ticker.tick().await;
        let id = AggregateId::new(format!("bench-lat-raw-{n}"))?;
        let payload: bytes::Bytes = requested(&id).to_json().into();
        let js = js.clone();
        let latencies = raw_latencies.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            js.publish(subject(Context::Workspace, &id), payload)
                .await
                .unwrap()
                .await
                .unwrap();
            latencies.lock().unwrap().push(started.elapsed());
        }));
    }
    for task in tasks {
        task.await?;
    }

    // k8shell: append, project, commit.
    let token = CancellationToken::new();
    let runner = ProjectionRunner::new(
        env.bus.clone(),
        env.pool.clone(),
        Arc::new(NotifyingProjection),
    );
    let runner_task = tokio::spawn(runner.run(token.clone()));
    let mut listener = PgListener::connect_with(&env.pool).await?;
    listener.listen("k8shell_bench").await?;
    // Let the runner catch up with the baseline's events before measuring.
    let ready_target = env
        .bus
        .jetstream()
        .get_stream("K8SHELL_WORKSPACE")
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    loop {
        let status = k8shell_bus::projection_status(&env.pool, "bench-latency").await?;
        if status.last_sequence >= ready_target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while tokio::time::timeout(Duration::from_millis(200), listener.recv())
        .await
        .is_ok()
    {}

    let sent: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(count)));
    let collector = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            while latencies.len() < count {
                let Ok(Ok(notification)) =
                    tokio::time::timeout(Duration::from_secs(30), listener.recv()).await
                else {
                    break;
                };
                let seen = Instant::now();
                if let Some(started) = sent.lock().unwrap().remove(notification.payload()) {
                    latencies.push(seen - started);
                }
            }
            latencies
        })
    };
    let store = env.bus.event_store();
    let append_latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut ticker = tokio::time::interval(interval);
    let started_all = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        ticker.tick().await;
        let id = AggregateId::new(format!("bench-lat-{n}"))?;
        let event = requested(&id);
        let store = store.clone();
        let sent = sent.clone();
        let append_latencies = append_latencies.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            sent.lock().unwrap().insert(id.to_string(), started);
            store
                .append(Context::Workspace, &id, ExpectedVersion::NoStream, &[event])
                .await
                .unwrap();
            append_latencies.lock().unwrap().push(started.elapsed());
        }));
    }
    for task in tasks {
        task.await?;
    }
    let achieved_rate = count as f64 / started_all.elapsed().as_secs_f64();
    let mut ours = collector.await?;
    token.cancel();
    runner_task.await??;

    let mut raw = Arc::try_unwrap(raw_latencies)
        .map_err(|_| anyhow::anyhow!("latencies shared"))?
        .into_inner()?;
    raw.sort();
    ours.sort();
    let mut appends = Arc::try_unwrap(append_latencies)
        .map_err(|_| anyhow::anyhow!("latencies shared"))?
        .into_inner()?;
    appends.sort();
    let seen = ours.len();
    let (p50, p99) = (percentile(&ours, 0.50), percentile(&ours, 0.99));
    let (raw_p50, raw_p99) = (percentile(&raw, 0.50), percentile(&raw, 0.99));
    Ok(Section {
        title: format!("Append → visible in projection at {rate} events/s"),
        rows: vec![
            [
                "p50".into(),
                ms(p50),
                ms(raw_p50),
                format!("{:.1}×", p50.as_secs_f64() / raw_p50.as_secs_f64()),
                String::new(),
            ],
            [
                "p99".into(),
                ms(p99),
                ms(raw_p99),
                format!("{:.1}×", p99.as_secs_f64() / raw_p99.as_secs_f64()),
                "≤ 25 ms".into(),
            ],
            [
                "append acknowledged, p99 (part of the above)".into(),
                ms(percentile(&appends, 0.99)),
                ms(raw_p99),
                format!(
                    "{:.1}×",
                    percentile(&appends, 0.99).as_secs_f64() / raw_p99.as_secs_f64()
                ),
                String::new(),
            ],
            [
                "max".into(),
                ms(ours.last().copied().unwrap_or_default()),
                ms(raw.last().copied().unwrap_or_default()),
                String::new(),
                String::new(),
            ],
        ],
        note: format!(
            "{seen} of {count} events observed, offered at {achieved_rate:.0}/s. k8shell: from the start of \
             `append` to the commit of the projection row (a `NOTIFY` in the applying transaction). Baseline: \
             raw `js.publish` → ack of the same payloads at the same rate."
        ),
    })
}
