//! Real infrastructure for tests: a private NATS server and PostgreSQL
//! cluster per test (so tests can stop and restart them), and whole
//! platforms started through the same code as `k8shell up`.
//!
//! Missing binaries fail the test with an install hint; nothing is skipped.

use std::sync::Once;

use k8shell_bus::{Bus, BusConfig, BusMetrics};
pub use k8shell_embedded::Durability;
use k8shell_embedded::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions};
use sqlx::PgPool;
use tempfile::TempDir;

mod exec;
mod oidc;
mod pki;
mod platform;
mod provisioner;
mod sftp;
mod tokens;

pub use exec::{ExecOutput, exec};
pub use oidc::{Journey, OidcBrowser, TestOidcProvider};
pub use pki::{TestPki, test_pki};
pub use platform::TestPlatform;
pub use provisioner::{TestProvisioner, containers_conf, remove_workspaces_of, repo_root};
pub use sftp::sftp_session;

pub use k8shell_service::daemon_channel::bearer;
pub use tokens::{TokenIssuer, unix_channel};

/// Installs a test log subscriber once per process (`RUST_LOG` honoured).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter =
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,async_nats=warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A private NATS server and PostgreSQL cluster in a temporary directory.
pub struct TestInfra {
    /// NATS server; tests may restart it.
    pub nats: NatsServer,
    /// PostgreSQL cluster; tests may stop and start it.
    pub postgres: PostgresCluster,
    dir: TempDir,
}

impl TestInfra {
    /// Starts both servers, PostgreSQL without fsync.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Durability::Ephemeral).await
    }

    /// Starts both servers with the given PostgreSQL durability (benchmarks
    /// measure with fsync on, as in production).
    pub async fn start_with(durability: Durability) -> anyhow::Result<Self> {
        init_tracing();
        let dir = tempfile::Builder::new().prefix("k8shell-test-").tempdir()?;
        let nats = NatsServer::start(NatsOptions {
            dir: dir.path().join("nats"),
            port: None,
        })
        .await?;
        let postgres = PostgresCluster::start(PostgresOptions {
            dir: dir.path().join("postgres"),
            durability,
        })
        .await?;
        Ok(Self {
            nats,
            postgres,
            dir,
        })
    }

    /// The temporary directory holding both servers' state.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Bus configuration pointing at the private server.
    pub fn bus_config(&self) -> BusConfig {
        BusConfig {
            url: self.nats.url(),
            client_name: "k8shell-test".into(),
            ..BusConfig::default()
        }
    }

    /// A connected bus with its streams set up.
    pub async fn bus(&self) -> anyhow::Result<Bus> {
        let bus = Bus::connect(self.bus_config(), BusMetrics::default()).await?;
        bus.ensure_streams().await?;
        Ok(bus)
    }

    /// A pool scoped to `schema` in the private cluster.
    pub async fn pool(&self, schema: &str) -> anyhow::Result<PgPool> {
        Ok(k8shell_service::connect_schema(self.postgres.url(), schema, 8).await?)
    }
}
