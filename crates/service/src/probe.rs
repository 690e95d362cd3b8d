use std::time::Duration;

use crate::{Health, Shutdown};

/// Runs `check` every `interval` and reports the result as the readiness of
/// `component`, until shutdown. Used for dependencies (NATS, Postgres) whose
/// loss should flip `/readyz` without stopping the service.
pub fn spawn_probe<F, Fut>(
    health: Health,
    component: &'static str,
    interval: Duration,
    shutdown: Shutdown,
    check: F,
) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        loop {
            match check().await {
                Ok(()) => health.ready(component),
                Err(detail) => health.not_ready(component, detail),
            }
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
        }
    })
}
