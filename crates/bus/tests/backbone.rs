//! The event backbone against a real nats-server and PostgreSQL.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8shell_bus::{
    AppendError, ApplyError, Bus, EventStore, ExpectedVersion, Projection, ProjectionRunner,
    StoredEvent, projection_status, rebuild_projection,
};
use k8shell_events::workspace::{WorkspaceRequested, WorkspaceStopped};
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent};
use k8shell_testkit::TestInfra;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Records every application of every event, so a duplicate shows up as
/// `times = 2` and a gap as a missing row.
struct Ledger;

impl Projection for Ledger {
    fn name(&self) -> &'static str {
        "test-ledger"
    }
    fn context(&self) -> Context {
        Context::Workspace
    }
    fn apply<'a>(
        &'a self,
        db: &'a mut PgConnection,
        stored: &'a StoredEvent,
        _event: &'a DomainEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO ledger (event_id, sequence, times) VALUES ($1, $2, 1)
                 ON CONFLICT (event_id) DO UPDATE SET times = ledger.times + 1",
            )
            .bind(&stored.envelope.id)
            .bind(stored.sequence as i64)
            .execute(db)
            .await?;
            Ok(())
        })
    }
    fn reset<'a>(&'a self, db: &'a mut PgConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE ledger").execute(db).await?;
            Ok(())
        })
    }
}

async fn ledger_pool(infra: &TestInfra) -> PgPool {
    let pool = infra.pool("ledger").await.unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS ledger (event_id text PRIMARY KEY, sequence bigint NOT NULL, times int NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

fn spawn_runner(bus: &Bus, pool: &PgPool) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let runner = ProjectionRunner::new(bus.clone(), pool.clone(), Arc::new(Ledger)).batch_size(50);
    let child = token.clone();
    let handle = tokio::spawn(async move {
        runner.run(child).await.unwrap();
    });
    (token, handle)
}

fn requested(id: &AggregateId, n: usize) -> CloudEvent {
    CloudEvent::new(
        "k8shell/test",
        id,
        &WorkspaceRequested {
            workspace_id: id.to_string(),
            username: format!("user{n}"),
            blueprint: "dev".into(),
            metadata: Default::default(),
        },
    )
    .unwrap()
}

fn stopped(id: &AggregateId, reason: &str) -> CloudEvent {
    CloudEvent::new(
        "k8shell/test",
        id,
        &WorkspaceStopped {
            reason: reason.into(),
        },
    )
    .unwrap()
}

async fn ledger_counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), coalesce(max(times), 0)::bigint FROM ledger")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_for_rows(pool: &PgPool, rows: i64, within: Duration) -> (i64, i64) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let counts = ledger_counts(pool).await;
        if counts.0 >= rows || tokio::time::Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn append_one(store: &EventStore, id: &AggregateId, event: &CloudEvent) -> u64 {
    store
        .append(
            Context::Workspace,
            id,
            ExpectedVersion::Any,
            std::slice::from_ref(event),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn append_load_and_optimistic_concurrency() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    // Idempotent set-up: a second call changes nothing and does not fail.
    bus.ensure_streams().await.unwrap();
    let store = bus.event_store();
    let id = AggregateId::new("alice-0000001").unwrap();

    assert_eq!(
        store.load(Context::Workspace, &id).await.unwrap().version,
        0
    );
    let v1 = store
        .append(
            Context::Workspace,
            &id,
            ExpectedVersion::NoStream,
            &[requested(&id, 1)],
        )
        .await
        .unwrap();
    // A second "new aggregate" append must be refused.
    let err = store
        .append(
            Context::Workspace,
            &id,
            ExpectedVersion::NoStream,
            &[requested(&id, 2)],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err}");
    // A stale version is refused; the current one is accepted.
    let other = AggregateId::new("bob-0000002").unwrap();
    append_one(&store, &other, &requested(&other, 3)).await;
    let err = store
        .append(
            Context::Workspace,
            &id,
            ExpectedVersion::Exact(v1 + 5),
            &[stopped(&id, "x")],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }));
    let v2 = store
        .append(
            Context::Workspace,
            &id,
            ExpectedVersion::Exact(v1),
            &[stopped(&id, "a"), stopped(&id, "b")],
        )
        .await
        .unwrap();

    let loaded = store.load(Context::Workspace, &id).await.unwrap();
    assert_eq!(loaded.version, v2);
    let types: Vec<&str> = loaded
        .events
        .iter()
        .map(|e| e.envelope.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "k8shell.workspace.requested.v1",
            "k8shell.workspace.stopped.v1",
            "k8shell.workspace.stopped.v1"
        ]
    );
    // The other aggregate's event is not part of this one.
    assert!(
        loaded
            .events
            .iter()
            .all(|e| e.envelope.subject == "alice-0000001")
    );
}

#[tokio::test]
async fn same_event_id_is_stored_once() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let store = bus.event_store();
    let id = AggregateId::new("dup-1").unwrap();
    let event = requested(&id, 1);
    let first = append_one(&store, &id, &event).await;
    let second = append_one(&store, &id, &event).await;
    assert_eq!(
        first, second,
        "a retried append must resolve to the original sequence"
    );
    assert_eq!(
        store
            .load(Context::Workspace, &id)
            .await
            .unwrap()
            .events
            .len(),
        1
    );
}

#[tokio::test]
async fn thousand_events_exactly_once_across_a_killed_projection() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let pool = ledger_pool(&infra).await;
    let store = bus.event_store();

    let (token, handle) = spawn_runner(&bus, &pool);
    let mut running = Some((token, handle));
    for n in 0..1000 {
        let id = AggregateId::new(format!("ws-{}", n % 37)).unwrap();
        append_one(&store, &id, &requested(&id, n)).await;
        if n == 400 || n == 850 {
            // Kill the task mid-stream, without a graceful shutdown.
            if let Some((_token, handle)) = running.take() {
                handle.abort();
                let _ = handle.await;
            }
        }
        if n == 600 {
            // Restart it while appends continue.
            running = Some(spawn_runner(&bus, &pool));
        }
    }
    let (token, _handle) = spawn_runner(&bus, &pool);
    let (rows, max_times) = wait_for_rows(&pool, 1000, Duration::from_secs(30)).await;
    assert_eq!(rows, 1000, "every event applied");
    assert_eq!(max_times, 1, "no event applied twice");
    assert_eq!(
        projection_status(&pool, "test-ledger")
            .await
            .unwrap()
            .last_sequence,
        1000
    );
    token.cancel();
}

#[derive(Default)]
struct Counter {
    stops: Vec<String>,
}

impl k8shell_bus::Aggregate for Counter {
    const CONTEXT: Context = Context::Workspace;
    fn apply(&mut self, event: &StoredEvent) {
        if let Ok(DomainEvent::Workspace(k8shell_events::workspace::WorkspaceEvent::Stopped(s))) =
            DomainEvent::decode(&event.envelope)
        {
            self.stops.push(s.reason);
        }
    }
}

#[tokio::test]
async fn racing_writers_one_wins_loser_sees_winner() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let id = AggregateId::new("race-1").unwrap();

    // Both writers load version 0 and race to append; exactly one wins.
    let store_a = bus.event_store();
    let store_b = bus.event_store();
    let (event_a, event_b) = ([stopped(&id, "a")], [stopped(&id, "b")]);
    let (a, b) = tokio::join!(
        store_a.append(Context::Workspace, &id, ExpectedVersion::NoStream, &event_a),
        store_b.append(Context::Workspace, &id, ExpectedVersion::NoStream, &event_b),
    );
    assert!(
        a.is_ok() ^ b.is_ok(),
        "exactly one append wins: {a:?} {b:?}"
    );
    let loser = if a.is_ok() { "b" } else { "a" };

    // The loser retries through `execute`: its decision sees the winner's event.
    let seen = std::sync::Mutex::new(Vec::new());
    let executed =
        k8shell_bus::execute::<Counter, (), std::convert::Infallible, _>(&store_a, &id, |state| {
            seen.lock().unwrap().push(state.stops.clone());
            Ok((vec![stopped(&id, loser)], ()))
        })
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap()[0].len(),
        1,
        "the retried decision saw the winner"
    );
    assert_eq!(executed.state.stops.len(), 2);

    // Many concurrent executes on one aggregate: all land, none lost.
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = bus.event_store();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            k8shell_bus::execute::<Counter, (), std::convert::Infallible, _>(&store, &id, |_| {
                Ok((vec![stopped(&id, &format!("c{n}"))], ()))
            })
            .await
            .unwrap()
            .attempts
        }));
    }
    let mut total_attempts = 0;
    for task in tasks {
        total_attempts += task.await.unwrap();
    }
    let loaded = bus
        .event_store()
        .load(Context::Workspace, &id)
        .await
        .unwrap();
    assert_eq!(loaded.events.len(), 10);
    assert!(total_attempts >= 8);
}

#[tokio::test]
async fn nats_restart_loses_nothing_acknowledged_and_duplicates_nothing() {
    let mut infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let pool = ledger_pool(&infra).await;
    let (token, _handle) = spawn_runner(&bus, &pool);
    let store = bus.event_store();

    let writer = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for n in 0..300 {
            let id = AggregateId::new(format!("nr-{}", n % 5)).unwrap();
            let event = requested(&id, n);
            match store
                .append(
                    Context::Workspace,
                    &id,
                    ExpectedVersion::Any,
                    std::slice::from_ref(&event),
                )
                .await
            {
                Ok(_) => acknowledged.push(event.id),
                Err(error) => panic!("append {n} failed after retries: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acknowledged
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    infra.nats.restart().await.unwrap();
    let acknowledged = writer.await.unwrap();
    assert_eq!(acknowledged.len(), 300);

    let (rows, max_times) = wait_for_rows(&pool, 300, Duration::from_secs(60)).await;
    assert_eq!(max_times, 1, "no duplicates in the projection");
    assert_eq!(rows, 300, "every acknowledged event reached the projection");
    let ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM ledger")
        .fetch_all(&pool)
        .await
        .unwrap();
    for id in &acknowledged {
        assert!(ids.contains(id), "acknowledged event {id} lost");
    }
    token.cancel();
}

#[tokio::test]
async fn projection_waits_out_a_postgres_outage() {
    let mut infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let pool = ledger_pool(&infra).await;
    let (token, _handle) = spawn_runner(&bus, &pool);
    let store = bus.event_store();
    for n in 0..50 {
        let id = AggregateId::new(format!("pg-{n}")).unwrap();
        append_one(&store, &id, &requested(&id, n)).await;
    }
    assert_eq!(
        wait_for_rows(&pool, 50, Duration::from_secs(20)).await.0,
        50
    );

    infra.postgres.stop().await;
    for n in 50..150 {
        let id = AggregateId::new(format!("pg-{n}")).unwrap();
        append_one(&store, &id, &requested(&id, n)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    infra.postgres.start_again().await.unwrap();

    let (rows, max_times) = wait_for_rows(&pool, 150, Duration::from_secs(60)).await;
    assert_eq!(rows, 150, "caught up after postgres returned");
    assert_eq!(max_times, 1);
    token.cancel();
}

#[tokio::test]
async fn malformed_and_unknown_events_are_skipped() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let pool = ledger_pool(&infra).await;
    let (token, _handle) = spawn_runner(&bus, &pool);
    let store = bus.event_store();
    let id = AggregateId::new("skip-1").unwrap();

    append_one(&store, &id, &requested(&id, 1)).await;
    let js = bus.jetstream();
    // Not JSON at all.
    js.publish("k8shell.evt.workspace.skip-1", "\u{0}garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A valid envelope of a type nobody knows.
    let mut unknown = stopped(&id, "x");
    unknown.event_type = "k8shell.workspace.teleported.v1".into();
    js.publish("k8shell.evt.workspace.skip-1", unknown.to_json().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A known type whose data has the wrong shape.
    let mut bad = stopped(&id, "x");
    bad.data = serde_json::json!({"reason": 42});
    js.publish("k8shell.evt.workspace.skip-1", bad.to_json().into())
        .await
        .unwrap()
        .await
        .unwrap();
    append_one(&store, &id, &stopped(&id, "after")).await;

    let (rows, _) = wait_for_rows(&pool, 2, Duration::from_secs(20)).await;
    assert_eq!(rows, 2, "the good events before and after were applied");
    let status = projection_status(&pool, "test-ledger").await.unwrap();
    assert_eq!(
        status.last_sequence, 5,
        "the consumer moved past the bad ones"
    );
    // Loading the aggregate also survives them.
    assert_eq!(
        store.load(Context::Workspace, &id).await.unwrap().version,
        5
    );
    token.cancel();
}

#[tokio::test]
async fn rebuild_replays_to_the_same_rows() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let pool = ledger_pool(&infra).await;
    let (token, _handle) = spawn_runner(&bus, &pool);
    let store = bus.event_store();
    for n in 0..200 {
        let id = AggregateId::new(format!("rb-{}", n % 10)).unwrap();
        append_one(&store, &id, &requested(&id, n)).await;
    }
    assert_eq!(
        wait_for_rows(&pool, 200, Duration::from_secs(20)).await.0,
        200
    );
    let before: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_id, sequence FROM ledger ORDER BY sequence")
            .fetch_all(&pool)
            .await
            .unwrap();

    // Rebuild while the runner is live: it must notice and replay.
    rebuild_projection(&bus, &pool, &Ledger).await.unwrap();
    let (rows, max_times) = wait_for_rows(&pool, 200, Duration::from_secs(30)).await;
    assert_eq!(rows, 200);
    assert_eq!(max_times, 1, "rows were reset, not applied on top");
    let after: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_id, sequence FROM ledger ORDER BY sequence")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_eq!(
        projection_status(&pool, "test-ledger")
            .await
            .unwrap()
            .generation,
        1
    );
    token.cancel();
}
