//! Identity: users, their credentials (passwords, SSH keys, personal
//! access tokens), login, and the only signer of tokens (ES256 JWTs) and
//! SSH user certificates.
//!
//! Changes are events on `k8shell.evt.user.<username>`; reads come from
//! the `identity-users` projection; secrets (password and token hashes,
//! sealed private keys) stay in identity's own tables and never reach the
//! bus.

mod api;
pub mod bootstrap;
pub mod credentials;
mod http;
pub mod kek;
pub mod keyring;
pub mod oidc;
mod oidc_login;
pub mod orgs;
mod projection;
pub mod sshca;
mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8shell_bus::{BusConfig, BusMetrics, Projection};
use k8shell_proto::identity::v1::identity_service_server::IdentityServiceServer;
use k8shell_service::{AdminServer, Health, RunningService, Shutdown};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use credentials::LockoutConfig;
pub use projection::UserProjection;

/// Service name.
pub const NAME: &str = "identity";
/// Postgres schema owned by identity.
pub const SCHEMA: &str = "identity";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Identity configuration (env prefix `K8SHELL_IDENTITY_`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC API.
    pub grpc_addr: SocketAddr,
    /// Public HTTP: JWKS and discovery.
    pub http_addr: SocketAddr,
    /// Health and metrics.
    pub admin_addr: SocketAddr,
    /// The `iss` of tokens: the URL verifiers reach `http_addr` at;
    /// `http://<http_addr>` when empty.
    pub issuer: String,
    /// Event bus.
    pub bus: BusConfig,
    /// Postgres URL.
    pub database_url: String,
    /// Identity's files: the key-encryption key.
    pub state_dir: PathBuf,
    /// User token lifetime.
    #[serde(with = "humantime_serde")]
    pub user_token_ttl: Duration,
    /// Workspace token lifetime.
    #[serde(with = "humantime_serde")]
    pub workspace_token_ttl: Duration,
    /// How long after a login (password, key, OIDC) `RenewLogin` keeps
    /// issuing tokens for it; then the user logs in again.
    #[serde(with = "humantime_serde")]
    pub login_max_age: Duration,
    /// Signing key rotation period.
    #[serde(with = "humantime_serde")]
    pub key_rotation: Duration,
    /// Default SSH certificate lifetime.
    #[serde(with = "humantime_serde")]
    pub ssh_certificate_ttl: Duration,
    /// Longest SSH certificate lifetime a caller may ask for.
    #[serde(with = "humantime_serde")]
    pub ssh_certificate_max_ttl: Duration,
    /// Default PAT lifetime, days.
    pub pat_default_days: u32,
    /// Longest PAT lifetime, days.
    pub pat_max_days: u32,
    /// Login lockout.
    pub lockout: LockoutConfig,
    /// External OpenID Providers users may log in through.
    pub oidc_providers: Vec<oidc::OidcProviderConfig>,
    /// Timeout of each request to an OpenID Provider.
    #[serde(with = "humantime_serde")]
    pub oidc_timeout: Duration,
    /// Longest a stop waits for in-flight work.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7401)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7601)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 7501)),
            issuer: String::new(),
            bus: BusConfig::default(),
            database_url: "postgres://localhost/k8shell".to_owned(),
            state_dir: PathBuf::from("/var/lib/k8shell/identity"),
            user_token_ttl: Duration::from_secs(3600),
            workspace_token_ttl: Duration::from_secs(5 * 60),
            login_max_age: Duration::from_secs(12 * 3600),
            key_rotation: Duration::from_secs(24 * 3600),
            ssh_certificate_ttl: Duration::from_secs(16 * 3600),
            ssh_certificate_max_ttl: Duration::from_secs(7 * 24 * 3600),
            pat_default_days: 90,
            pat_max_days: 365,
            lockout: LockoutConfig::default(),
            oidc_providers: Vec::new(),
            oidc_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(3),
        }
    }
}

/// Applies identity's migrations to a pool scoped to [`SCHEMA`].
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Projections identity keeps, for `k8shell projections`.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(UserProjection)]
}

/// Starts identity and returns once it listens.
pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<RunningService> {
    let mut registry = Registry::default();
    let bus_metrics = BusMetrics::register(&mut registry);
    let health = Health::new();
    for component in ["bus", "postgres", "projection"] {
        health.register(component);
    }
    let (bus, pool) = k8shell_bus::components::connect_backbone(
        NAME,
        &config.bus,
        bus_metrics,
        &config.database_url,
        SCHEMA,
        10,
        &MIGRATOR,
    )
    .await?;
    let oidc = Arc::new(
        oidc::OidcProviders::from_config(&config.oidc_providers, config.oidc_timeout)
            .context("invalid OIDC provider configuration")?,
    );
    let kek = kek::Kek::load_or_create(&config.state_dir.join("kek"))
        .context("cannot load the key-encryption key")?;
    let ca = Arc::new(
        sshca::SshUserCa::load_or_create(&pool, &kek)
            .await
            .context("cannot load the SSH user CA")?,
    );

    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("failed to bind grpc on {}", config.grpc_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("failed to bind http on {}", config.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let issuer = if config.issuer.is_empty() {
        format!("http://{http_addr}")
    } else {
        config.issuer.clone()
    };
    let keys = Arc::new(
        keyring::KeyRing::open(
            pool.clone(),
            kek.clone(),
            issuer.clone(),
            config.key_rotation,
            config.user_token_ttl.max(config.workspace_token_ttl),
        )
        .await
        .context("cannot load the signing keys")?,
    );

    let admin = AdminServer::bind(config.admin_addr, NAME, health.clone(), Arc::new(registry))
        .await
        .with_context(|| format!("failed to bind admin on {}", config.admin_addr))?;
    let admin_addr = admin.local_addr()?;

    let components = shutdown.child();
    let mut tasks = JoinSet::new();
    {
        let shutdown = components.clone();
        tasks.spawn(async move { Ok(admin.serve(shutdown).await?) });
    }
    {
        let router = http::router(Arc::clone(&keys));
        let shutdown = components.clone();
        tasks.spawn(async move {
            axum::serve(http_listener, router)
                .with_graceful_shutdown(async move { shutdown.wait().await })
                .await
                .context("http server failed")
        });
    }
    {
        let api = api::IdentityApi {
            store: bus.event_store(),
            pool: pool.clone(),
            keys: Arc::clone(&keys),
            ca,
            policy: api::TokenPolicy {
                user_token_ttl: config.user_token_ttl,
                workspace_token_ttl: config.workspace_token_ttl,
                ssh_certificate_ttl: config.ssh_certificate_ttl,
                ssh_certificate_max_ttl: config.ssh_certificate_max_ttl,
                pat_default_days: config.pat_default_days,
                pat_max_days: config.pat_max_days,
                lockout: config.lockout.clone(),
                login_max_age: config.login_max_age,
            },
            oidc,
        };
        k8shell_service::spawn_grpc_server(
            &mut tasks,
            grpc_listener,
            tonic::service::Routes::new(IdentityServiceServer::new(api)),
            <IdentityServiceServer<api::IdentityApi> as tonic::server::NamedService>::NAME,
            components.clone(),
        );
    }
    {
        // Rotation and other replicas' new keys are picked up here.
        let keys = Arc::clone(&keys);
        let shutdown = components.clone();
        let period =
            (config.key_rotation / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return Ok(()),
                    _ = tokio::time::sleep(period) => {}
                }
                if let Err(error) = keys.refresh().await {
                    tracing::warn!(%error, "cannot refresh the signing keys");
                }
            }
        });
    }
    k8shell_bus::components::spawn_projection(
        &mut tasks,
        &health,
        &components,
        "projection",
        &bus,
        &pool,
        Arc::new(UserProjection),
    );
    k8shell_bus::components::spawn_backbone_probes(&mut tasks, &health, &components, &bus, &pool);
    let grace = config.shutdown_grace;
    let task = k8shell_bus::components::supervise(NAME, shutdown, components, tasks, grace, pool);
    tracing::info!(%grpc_addr, %http_addr, %admin_addr, "identity started");
    Ok(RunningService {
        name: NAME,
        listeners: vec![
            ("grpc", grpc_addr),
            ("http", http_addr),
            ("admin", admin_addr),
        ],
        task,
    })
}

/// Runs identity until shutdown.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    start(config, shutdown).await?.task.await?
}
