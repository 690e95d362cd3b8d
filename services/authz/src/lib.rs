//! Authz: Rego policies evaluated in-process (regorus), with obligations,
//! hot reload and a folded decision log on the event stream.

mod api;
mod decision_log;
pub mod engine;
pub mod policy;
mod projection;
pub mod shield;
pub mod wasm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8shell_bus::{BusConfig, BusMetrics, Projection};
use k8shell_proto::authz::v1::authz_service_server::AuthzServiceServer;
use k8shell_service::{AdminServer, Health, RunningService, Shutdown};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use projection::DecisionProjection;

/// Service name.
pub const NAME: &str = "authz";
/// Postgres schema.
pub const SCHEMA: &str = "authz";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Authz configuration (env prefix `K8SHELL_AUTHZ_`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC API.
    pub grpc_addr: SocketAddr,
    /// Health and metrics.
    pub admin_addr: SocketAddr,
    /// Event bus.
    pub bus: BusConfig,
    /// Postgres URL.
    pub database_url: String,
    /// Directory of `.rego` policies (watched).
    pub policies_dir: PathBuf,
    /// How often the directory is checked.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Longest one evaluation may run before it is cut off (and denies).
    #[serde(with = "humantime_serde")]
    pub evaluation_limit: Duration,
    /// Identical decisions within this window are logged as one.
    #[serde(with = "humantime_serde")]
    pub fold_window: Duration,
    /// Run the SSH Shield (ban addresses after repeated SSH failures).
    pub shield: bool,
    /// Which engine decides: `rego` (regorus over `policies_dir`) or
    /// `wasm` (`wasm_policy`). The SSH Shield's policy is Rego either way.
    pub engine: engine::EngineKind,
    /// An OPA WebAssembly module (`.wasm`) or bundle (`.tar.gz`) from
    /// `opa build -t wasm`, for the `wasm` engine (watched).
    pub wasm_policy: PathBuf,
    /// Its entrypoint for decisions.
    pub wasm_entrypoint: String,
    /// Fuel (roughly, WebAssembly instructions) one wasm evaluation may
    /// burn before it is cut off and denies.
    pub wasm_fuel: u64,
    /// Longest a stop waits for in-flight work.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7402)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 7502)),
            bus: BusConfig::default(),
            database_url: "postgres://localhost/k8shell".to_owned(),
            policies_dir: PathBuf::from("/etc/k8shell/policies"),
            reload_interval: Duration::from_secs(2),
            evaluation_limit: Duration::from_millis(100),
            fold_window: Duration::from_secs(10),
            shield: true,
            engine: engine::EngineKind::Rego,
            wasm_policy: PathBuf::new(),
            wasm_entrypoint: wasm::DEFAULT_ENTRYPOINT.to_owned(),
            wasm_fuel: 20_000_000,
            shutdown_grace: Duration::from_secs(3),
        }
    }
}

/// Projections authz keeps.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(DecisionProjection)]
}

/// Applies authz's migrations.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Starts authz and returns once it listens.
pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<RunningService> {
    let mut registry = Registry::default();
    let bus_metrics = BusMetrics::register(&mut registry);
    let health = Health::new();
    for component in ["bus", "postgres", "projection"] {
        health.register(component);
    }
    let catalog = Arc::new(
        policy::PolicyCatalog::open(&config.policies_dir, config.evaluation_limit).map_err(
            |errors| {
                anyhow::anyhow!(
                    "cannot load the policies in {}: {}",
                    config.policies_dir.display(),
                    errors.join("; ")
                )
            },
        )?,
    );
    let decider = Arc::new(match config.engine {
        engine::EngineKind::Rego => engine::Decider::Rego(Arc::clone(&catalog)),
        engine::EngineKind::Wasm => {
            anyhow::ensure!(
                !config.wasm_policy.as_os_str().is_empty(),
                "engine = \"wasm\" needs wasm_policy (a module or bundle from `opa build -t wasm`)"
            );
            let wasm_engine = Arc::new(wasm::WasmEngine::new()?);
            engine::Decider::Wasm(Arc::new(
                wasm::WasmCatalog::open(
                    wasm_engine,
                    &config.wasm_policy,
                    &config.wasm_entrypoint,
                    config.wasm_fuel,
                )
                .await?,
            ))
        }
    });
    let (bus, pool) = k8shell_bus::components::connect_backbone(
        NAME,
        &config.bus,
        bus_metrics,
        &config.database_url,
        SCHEMA,
        5,
        &MIGRATOR,
    )
    .await?;
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("failed to bind grpc on {}", config.grpc_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin = AdminServer::bind(config.admin_addr, NAME, health.clone(), Arc::new(registry))
        .await
        .with_context(|| format!("failed to bind admin on {}", config.admin_addr))?;
    let admin_addr = admin.local_addr()?;

    let components = shutdown.child();
    let mut tasks = JoinSet::new();
    let (log, log_task) = decision_log::DecisionLog::start(
        bus.event_store(),
        config.fold_window,
        decider.name(),
        components.token(),
    );
    tasks.spawn(async move { Ok(log_task.await?) });
    {
        let shutdown = components.clone();
        tasks.spawn(async move { Ok(admin.serve(shutdown).await?) });
    }
    {
        let api = api::AuthzApi {
            decider: Arc::clone(&decider),
            wasm_policy: config.wasm_policy.clone(),
            log,
        };
        k8shell_service::spawn_grpc_server(
            &mut tasks,
            grpc_listener,
            tonic::service::Routes::new(AuthzServiceServer::new(api)),
            <AuthzServiceServer<api::AuthzApi> as tonic::server::NamedService>::NAME,
            components.clone(),
        );
    }
    {
        let catalog = Arc::clone(&catalog);
        let decider = Arc::clone(&decider);
        let shutdown = components.clone();
        let interval = config.reload_interval;
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return Ok(()),
                    _ = tokio::time::sleep(interval) => {}
                }
                let rego = Arc::clone(&catalog);
                tokio::task::spawn_blocking(move || rego.reload()).await?;
                if let engine::Decider::Wasm(_) = decider.as_ref() {
                    decider.reload().await?;
                }
            }
        });
    }
    if config.shield {
        let shield = shield::Shield::open(bus.clone(), Arc::clone(&catalog))
            .await
            .context("cannot start the SSH shield")?;
        let token = components.token();
        tasks.spawn(Box::pin(shield.run(token)));
    }
    k8shell_bus::components::spawn_projection(
        &mut tasks,
        &health,
        &components,
        "projection",
        &bus,
        &pool,
        Arc::new(DecisionProjection),
    );
    k8shell_bus::components::spawn_backbone_probes(&mut tasks, &health, &components, &bus, &pool);
    let grace = config.shutdown_grace;
    let task = k8shell_bus::components::supervise(NAME, shutdown, components, tasks, grace, pool);
    tracing::info!(%grpc_addr, %admin_addr, "authz started");
    Ok(RunningService {
        name: NAME,
        listeners: vec![("grpc", grpc_addr), ("admin", admin_addr)],
        task,
    })
}

/// Runs authz until shutdown.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    start(config, shutdown).await?.task.await?
}
