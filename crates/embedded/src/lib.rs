//! Private infrastructure for the embedded platform and for tests: a
//! `nats-server -js` on a loopback port and a PostgreSQL cluster reachable
//! only through a unix socket, both with their state under a directory we
//! own, both stopped politely.
//!
//! `k8shell up` and `k8shell-testkit` start them through this same code.

mod binaries;
mod nats;
mod postgres;
mod process;

pub use nats::{NatsOptions, NatsServer};
pub use postgres::{Durability, PostgresCluster, PostgresOptions};

/// A private server could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// A required program is not installed.
    #[error("{program} not found (looked in {searched}); install it with: {hint}")]
    MissingBinary {
        /// Program name.
        program: &'static str,
        /// Where we looked.
        searched: String,
        /// How to install it.
        hint: &'static str,
    },
    /// A filesystem or process operation failed.
    #[error("{action}")]
    Io {
        /// What we were doing.
        action: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server did not become ready.
    #[error("{server} did not start: {detail}")]
    NotReady {
        /// Which server.
        server: &'static str,
        /// What we saw (including the tail of its log).
        detail: String,
    },
    /// The data directory is unusable (permissions, another server running).
    #[error("{0}")]
    DataDir(String),
}

pub(crate) fn io_error(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedError {
    let action = action.into();
    move |source| EmbeddedError::Io { action, source }
}
