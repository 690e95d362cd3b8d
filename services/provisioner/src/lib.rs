//! The provisioner: blueprints and the workspace lifecycle.
//!
//! Commands arrive over gRPC, are decided on the workspace aggregate loaded
//! from `k8shell.evt.workspace.<id>`, and are appended as events; reads come
//! from the `provisioner-workspaces` projection in the `provisioner` schema.

mod api;
pub mod blueprint;
pub mod controller;
mod daemon;
mod id;
mod projection;
mod read_model;
pub mod runtime;
pub mod tokens;
mod workspace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8shell_bus::{BusConfig, BusMetrics, Projection};
use k8shell_proto::provisioner::v1::provisioner_service_server::ProvisionerServiceServer;
use k8shell_service::{AdminServer, Health, RunningService, Shutdown};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use controller::LifecycleConfig;
pub use projection::WorkspaceProjection;
pub use runtime::kubernetes::KubernetesConfig;
pub use runtime::podman::PodmanConfig;

use crate::blueprint::BlueprintCatalog;
use crate::controller::Controller;
use crate::runtime::Runtime;
use crate::runtime::kubernetes::KubernetesRuntime;
use crate::runtime::podman::PodmanRuntime;
use crate::tokens::WorkspaceTokens;

/// Service name, as reported by health endpoints.
pub const NAME: &str = "provisioner";
/// Postgres schema owned by the provisioner.
pub const SCHEMA: &str = "provisioner";
/// CloudEvents `source` of events the provisioner appends.
pub const EVENT_SOURCE: &str = "k8shell/provisioner";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Provisioner configuration (env prefix `K8SHELL_PROVISIONER_`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC API address.
    pub grpc_addr: SocketAddr,
    /// Identity's gRPC URL: workspace tokens and the keys that verify them.
    pub identity_url: String,
    /// Health and metrics address.
    pub admin_addr: SocketAddr,
    /// Event bus.
    pub bus: BusConfig,
    /// Postgres URL (the service uses its own schema in that database).
    pub database_url: String,
    /// Longest a stop waits for in-flight work.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Directory of blueprint YAML files, watched.
    pub blueprints_dir: PathBuf,
    /// How often the blueprint directory is checked for changes.
    #[serde(with = "humantime_serde")]
    pub blueprint_reload_interval: Duration,
    /// The provisioner's own state (its workspace-token signing key).
    pub state_dir: PathBuf,
    /// Where workspaces run: `podman` (the default) or `kubernetes`.
    pub runtime: RuntimeKind,
    /// Podman runtime settings.
    pub podman: PodmanConfig,
    /// Kubernetes runtime settings.
    pub kubernetes: KubernetesConfig,
    /// Lifecycle timings, idle stop, restarts.
    pub lifecycle: LifecycleConfig,
}

/// Which runtime runs workspaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Pods on the local podman.
    #[default]
    Podman,
    /// Pods in a cluster (in-cluster account or `KUBECONFIG`).
    Kubernetes,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7404)),
            identity_url: "http://127.0.0.1:7401".to_owned(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 7504)),
            bus: BusConfig::default(),
            database_url: "postgres://localhost/k8shell".to_owned(),
            shutdown_grace: Duration::from_secs(3),
            blueprints_dir: PathBuf::from("/etc/k8shell/blueprints"),
            blueprint_reload_interval: Duration::from_secs(2),
            state_dir: PathBuf::from("/var/lib/k8shell/provisioner"),
            runtime: RuntimeKind::Podman,
            podman: PodmanConfig::default(),
            kubernetes: KubernetesConfig::default(),
            lifecycle: LifecycleConfig::default(),
        }
    }
}

/// Applies the provisioner's schema migrations to a pool scoped to [`SCHEMA`].
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Projections the provisioner keeps, for `k8shell projections`.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(WorkspaceProjection)]
}

/// Starts the provisioner and returns once it listens.
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

    let tokens = Arc::new(
        WorkspaceTokens::connect(&config.identity_url, Duration::from_secs(30))
            .await
            .with_context(|| {
                format!(
                    "cannot get identity's keys from {} (identity signs workspace tokens)",
                    config.identity_url
                )
            })?,
    );
    let catalog = Arc::new(BlueprintCatalog::open(&config.blueprints_dir));
    let runtime: Arc<dyn Runtime> = match config.runtime {
        RuntimeKind::Podman => Arc::new(PodmanRuntime::new(config.podman.clone())),
        RuntimeKind::Kubernetes => Arc::new(
            KubernetesRuntime::connect(config.kubernetes.clone(), &config.state_dir)
                .await
                .context("cannot set up the kubernetes runtime")?,
        ),
    };

    // Bind before spawning anything, so a busy port fails the start.
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
    let controller = Controller::new(
        bus.event_store(),
        pool.clone(),
        Arc::clone(&catalog),
        runtime,
        tokens,
        config.lifecycle.clone(),
        components.token(),
    );
    {
        let watcher = catalog.spawn_watcher(config.blueprint_reload_interval, components.clone());
        tasks.spawn(async move { Ok(watcher.await?) });
        for handle in controller.spawn_loops() {
            tasks.spawn(async move { Ok(handle.await?) });
        }
        let draining = controller.clone();
        let shutdown = components.clone();
        tasks.spawn(async move {
            shutdown.wait().await;
            draining.drain().await;
            Ok(())
        });
    }
    {
        let shutdown = components.clone();
        tasks.spawn(async move { Ok(admin.serve(shutdown).await?) });
    }
    {
        let api = api::ProvisionerApi {
            controller,
            pool: pool.clone(),
        };
        k8shell_service::spawn_grpc_server(
            &mut tasks,
            grpc_listener,
            tonic::service::Routes::new(ProvisionerServiceServer::new(api)),
            <ProvisionerServiceServer<api::ProvisionerApi> as tonic::server::NamedService>::NAME,
            components.clone(),
        );
    }
    k8shell_bus::components::spawn_projection(
        &mut tasks,
        &health,
        &components,
        "projection",
        &bus,
        &pool,
        Arc::new(WorkspaceProjection),
    );
    k8shell_bus::components::spawn_backbone_probes(&mut tasks, &health, &components, &bus, &pool);

    let grace = config.shutdown_grace;
    let task = k8shell_bus::components::supervise(NAME, shutdown, components, tasks, grace, pool);
    tracing::info!(%grpc_addr, %admin_addr, "provisioner started");
    Ok(RunningService {
        name: NAME,
        listeners: vec![("grpc", grpc_addr), ("admin", admin_addr)],
        task,
    })
}

/// Runs the provisioner until shutdown.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    start(config, shutdown).await?.task.await?
}
