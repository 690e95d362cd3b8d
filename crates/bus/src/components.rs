//! The components every event-sourced service runs beside its API: health
//! probes of the bus and of Postgres, and its projection runners reporting
//! to health. One place, so every service behaves the same.

use std::sync::Arc;
use std::time::Duration;

use k8shell_service::{Health, Shutdown, spawn_probe};
use sqlx::PgPool;
use tokio::task::JoinSet;

use anyhow::Context as _;

use crate::{Bus, BusConfig, BusMetrics, Projection, ProjectionRunner};

/// Health components these helpers report: register them at start.
pub const BACKBONE_COMPONENTS: [&str; 2] = ["bus", "postgres"];

/// Connects what every event-sourced service starts with: its own Postgres
/// schema, migrated, and the bus with its streams set up.
pub async fn connect_backbone(
    name: &str,
    bus: &BusConfig,
    metrics: BusMetrics,
    database_url: &str,
    schema: &str,
    pool_size: u32,
    migrator: &sqlx::migrate::Migrator,
) -> anyhow::Result<(Bus, PgPool)> {
    let pool = k8shell_service::connect_schema(database_url, schema, pool_size)
        .await
        .context("failed to connect to postgres")?;
    migrator
        .run(&pool)
        .await
        .with_context(|| format!("failed to run {name} migrations"))?;
    let bus = Bus::connect(bus.clone(), metrics)
        .await
        .context("failed to connect to nats")?;
    bus.ensure_streams()
        .await
        .context("failed to set up event streams")?;
    Ok((bus, pool))
}

/// Probes NATS and Postgres every second into `health`.
pub fn spawn_backbone_probes(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    health: &Health,
    shutdown: &Shutdown,
    bus: &Bus,
    pool: &PgPool,
) {
    let probe_bus = bus.clone();
    let probe = spawn_probe(
        health.clone(),
        "bus",
        Duration::from_secs(1),
        shutdown.clone(),
        move || {
            let state = probe_bus.connection_state();
            async move { state }
        },
    );
    tasks.spawn(async move { probe.await? });
    let pool = pool.clone();
    let probe = spawn_probe(
        health.clone(),
        "postgres",
        Duration::from_secs(1),
        shutdown.clone(),
        move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("postgres: {e}"))
            }
        },
    );
    tasks.spawn(async move { probe.await? });
}

/// Runs `projection` until shutdown, its state reported as the health
/// component `component` (registered by the caller).
pub fn spawn_projection(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    health: &Health,
    shutdown: &Shutdown,
    component: &'static str,
    bus: &Bus,
    pool: &PgPool,
    projection: Arc<dyn Projection>,
) {
    let reporter = health.clone();
    let runner = ProjectionRunner::new(bus.clone(), pool.clone(), projection).health_reporter(
        Arc::new(move |state: Result<(), String>| match state {
            Ok(()) => reporter.ready(component),
            Err(detail) => reporter.not_ready(component, detail),
        }),
    );
    let token = shutdown.token();
    tasks.spawn(async move { Ok(runner.run(token).await?) });
}

/// The service's supervisor: waits for shutdown or for a component to exit
/// (which takes the service down with it), stops every component, drains
/// them within `grace`, closes the pool, and reports the first failure.
pub fn supervise(
    name: &'static str,
    shutdown: Shutdown,
    components: Shutdown,
    mut tasks: JoinSet<anyhow::Result<()>>,
    grace: Duration,
    pool: PgPool,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = shutdown.wait() => None,
            exited = tasks.join_next() => exited,
        };
        components.trigger();
        let drained = k8shell_service::drain(tasks, grace).await;
        pool.close().await;
        if let Some(Ok(Err(error))) = first {
            return Err(error.context(format!("{name} component failed")));
        }
        drained
    })
}
