//! A provisioner on real NATS, PostgreSQL and podman, with the repository's
//! blueprints plus a test's own, for workspace tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8shell_provisioner::tokens::WorkspaceTokens;
use k8shell_service::Shutdown;

use crate::TestInfra;

/// The repository's root (for blueprints and containers.conf).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project-owned podman configuration.
pub fn containers_conf() -> PathBuf {
    repo_root().join("deploy/local/containers.conf")
}

/// A running provisioner.
pub struct TestProvisioner {
    /// gRPC URL.
    pub url: String,
    /// Tokens k8shelld in its workspaces accepts, from the test's identity.
    pub tokens: std::sync::Arc<WorkspaceTokens>,
    /// The identity the provisioner gets its tokens and keys from.
    pub identity_url: String,
    /// The watched blueprint directory (tests may add files).
    pub blueprints: PathBuf,
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
    infra: TestInfra,
}

/// The static k8shelld workspaces run (`K8SHELL_K8SHELLD_STATIC`, set by
/// `./scripts/test`).
pub fn k8shelld_static() -> anyhow::Result<PathBuf> {
    std::env::var_os("K8SHELL_K8SHELLD_STATIC")
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "K8SHELL_K8SHELLD_STATIC must name the static k8shelld; run ./scripts/test"
            )
        })
}

/// Removes the podman pods and volumes of `username`'s workspaces
/// (`<username>-…`), e.g. left by an earlier run that failed half-way: a
/// pod of the same name from another platform is not one this platform can
/// start.
pub fn remove_workspaces_of(username: &str) {
    let podman = |args: &[&str]| {
        std::process::Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", containers_conf())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let filter = format!("name=^{username}-");
    for pod in podman(&["pod", "ls", "-q", "--filter", &filter]).lines() {
        podman(&["pod", "rm", "-f", pod]);
    }
    for volume in podman(&["volume", "ls", "-q", "--filter", &filter]).lines() {
        podman(&["volume", "rm", "-f", volume]);
    }
}

/// Fails unless the Debian workspace image exists.
pub fn require_image() -> anyhow::Result<()> {
    let image = std::process::Command::new("podman")
        .args(["image", "exists", "localhost/k8shell-debian:bookworm"])
        .env("CONTAINERS_CONF", containers_conf())
        .status()?;
    anyhow::ensure!(
        image.success(),
        "the Debian workspace image is missing; run ./scripts/test (it builds it)"
    );
    Ok(())
}

impl TestProvisioner {
    /// Starts one; `extra_blueprints` is written beside the defaults.
    /// Workspaces get no network; loops run fast so tests see them act.
    pub async fn start(extra_blueprints: &str) -> anyhow::Result<Self> {
        let binary = k8shelld_static()?;
        require_image()?;
        let infra = TestInfra::start().await?;
        let dir = tempfile::Builder::new().prefix("k8shell-ws-").tempdir()?;
        let blueprints = dir.path().join("blueprints");
        std::fs::create_dir_all(&blueprints)?;
        for entry in std::fs::read_dir(repo_root().join("blueprints"))? {
            let entry = entry?;
            std::fs::copy(entry.path(), blueprints.join(entry.file_name()))?;
        }
        if !extra_blueprints.is_empty() {
            std::fs::write(blueprints.join("tests.yaml"), extra_blueprints)?;
        }
        let state_dir = dir.path().join("provisioner");
        let shutdown = Shutdown::new();
        // Identity signs workspace tokens; the provisioner hands its keys to
        // every workspace.
        let identity = k8shell_identity::start(
            k8shell_identity::Config {
                grpc_addr: "127.0.0.1:0".parse()?,
                http_addr: "127.0.0.1:0".parse()?,
                admin_addr: "127.0.0.1:0".parse()?,
                bus: infra.bus_config(),
                database_url: infra.postgres.url().to_owned(),
                state_dir: dir.path().join("identity"),
                // Rotations during the tests: running workspaces must be
                // given the new keys in time (the provisioner reconciles
                // every 2 s here; the next key is published 20 s ahead).
                key_rotation: Duration::from_secs(20),
                ..Default::default()
            },
            shutdown.child(),
        )
        .await?;
        let identity_url = format!(
            "http://{}",
            identity
                .listener("grpc")
                .ok_or_else(|| anyhow::anyhow!("identity has no grpc listener"))?
        );
        let config = k8shell_provisioner::Config {
            identity_url: identity_url.clone(),
            grpc_addr: "127.0.0.1:0".parse()?,
            admin_addr: "127.0.0.1:0".parse()?,
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            blueprints_dir: blueprints.clone(),
            blueprint_reload_interval: Duration::from_millis(200),
            state_dir: state_dir.clone(),
            podman: k8shell_provisioner::PodmanConfig {
                containers_conf: Some(containers_conf()),
                network: "none".to_owned(),
                state_dir: dir.path().join("workspaces"),
                k8shelld_binary: Some(binary),
                ..Default::default()
            },
            lifecycle: k8shell_provisioner::LifecycleConfig {
                start_timeout: Duration::from_secs(60),
                reconcile_interval: Duration::from_secs(2),
                idle_check_interval: Duration::from_millis(500),
                idle_warning: Duration::from_secs(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let running = k8shell_provisioner::start(config, shutdown.clone()).await?;
        let addr = running
            .listener("grpc")
            .ok_or_else(|| anyhow::anyhow!("no grpc listener"))?;
        let tokens = std::sync::Arc::new(
            WorkspaceTokens::connect(&identity_url, Duration::from_secs(10)).await?,
        );
        Ok(Self {
            url: format!("http://{addr}"),
            tokens,
            identity_url,
            blueprints,
            shutdown,
            task: Some(running.task),
            _dir: dir,
            infra,
        })
    }

    /// The event store of the provisioner's bus (to simulate what other
    /// writers or crashes leave behind).
    pub async fn event_store(&self) -> anyhow::Result<k8shell_bus::EventStore> {
        Ok(self.infra.bus().await?.event_store())
    }

    /// Stops the provisioner (workspaces keep running, as in production).
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}
