use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Cooperative shutdown signal passed into every service's `run`.
///
/// Cloning is cheap; all clones observe the same trigger. Tests trigger it
/// directly; binaries connect it to SIGINT and SIGTERM with [`Shutdown::on_signals`].
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// Creates an untriggered shutdown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a shutdown triggered by the first SIGINT or SIGTERM.
    ///
    /// Returns the shutdown and a future resolving on a *second* signal, so
    /// `main` can exit at once when the user is impatient.
    pub fn on_signals() -> std::io::Result<(Self, impl Future<Output = ()>)> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let shutdown = Self::new();
        let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("shutdown requested");
            trigger.trigger();
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            let _ = second_tx.send(());
        });
        Ok((shutdown, async move {
            if second_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        }))
    }

    /// Requests shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown is requested.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// Resolves once shutdown is requested; owns the handle, for futures
    /// handed to spawned tasks.
    pub async fn wait_owned(self) {
        self.token.cancelled_owned().await;
    }

    /// A token for libraries that take a `CancellationToken`.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// A child shutdown: triggered with this one, or alone.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
        }
    }
}

/// Waits for every task to finish, at most `grace`; aborts the rest.
///
/// Returns the first error a task reported, so a component that failed
/// during the drain is not silently forgotten.
pub async fn drain(mut tasks: JoinSet<anyhow::Result<()>>, grace: Duration) -> anyhow::Result<()> {
    let mut first_error = None;
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Ok(())))) => {}
            Ok(Some(Ok(Err(error)))) => {
                first_error.get_or_insert(error);
            }
            Ok(Some(Err(join_error))) if join_error.is_cancelled() => {}
            Ok(Some(Err(join_error))) => {
                first_error.get_or_insert(anyhow::anyhow!("task panicked: {join_error}"));
            }
            Err(_) => {
                tracing::warn!(remaining = tasks.len(), "drain timed out, aborting tasks");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_is_bounded_and_reports_errors() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async { Err(anyhow::anyhow!("boom")) });
        tasks.spawn(async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let started = std::time::Instant::now();
        let result = drain(tasks, Duration::from_millis(100)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(result.unwrap_err().to_string(), "boom");
    }

    #[tokio::test]
    async fn child_follows_parent() {
        let parent = Shutdown::new();
        let child = parent.child();
        parent.trigger();
        tokio::time::timeout(Duration::from_secs(1), child.wait())
            .await
            .unwrap();
    }
}
