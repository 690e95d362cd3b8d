//! Plumbing every k8shell service shares: layered configuration, graceful
//! shutdown, the admin HTTP server (`/healthz`, `/readyz`, `/metrics`), and
//! Postgres pools scoped to a service's own schema.
//!
//! Nothing here knows about a particular service or about the event bus.

mod admin;
mod config;
pub mod daemon_channel;
mod entry;
mod grpc;
mod health;
mod postgres;
mod probe;
mod shutdown;

pub use admin::{AdminServer, serve_admin};
pub use config::{ConfigError, load_config};
pub use entry::{service_main, service_main_with_logs, start_admin_only};

pub use grpc::spawn_grpc_server;
pub use health::{Health, HealthReport};
pub use postgres::{PostgresError, connect_schema};
pub use probe::spawn_probe;
pub use shutdown::{Shutdown, drain};

/// A started service: where it listens and the task that runs it.
pub struct RunningService {
    /// Service name, e.g. `provisioner`.
    pub name: &'static str,
    /// Listeners by role (`admin`, `grpc`, `ssh`, `http`).
    pub listeners: Vec<(&'static str, std::net::SocketAddr)>,
    /// Completes when the service has stopped.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningService {
    /// Address of the listener with the given role.
    pub fn listener(&self, role: &str) -> Option<std::net::SocketAddr> {
        self.listeners
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, a)| *a)
    }
}
