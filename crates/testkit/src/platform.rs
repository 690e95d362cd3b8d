use k8shell_embedded::Durability;
use k8shell_platform::{Platform, PlatformConfig, Ports};
use k8shell_service::Shutdown;
use tempfile::TempDir;

/// A whole platform on free loopback ports with private, throw-away NATS
/// and PostgreSQL; started through the same code as `k8shell up`.
pub struct TestPlatform {
    platform: Option<Platform>,
    dir: TempDir,
}

impl TestPlatform {
    /// Starts the platform with private servers.
    pub async fn start() -> anyhow::Result<Self> {
        Box::pin(Self::start_with_urls(None, None)).await
    }

    /// Starts the platform on the given NATS and PostgreSQL (as `k8shell up`
    /// does with `NATS_URL` / `DATABASE_URL`); private ones where `None`.
    pub async fn start_with_urls(
        nats_url: Option<String>,
        database_url: Option<String>,
    ) -> anyhow::Result<Self> {
        Box::pin(Self::start_inner(nats_url, database_url, false, |_| {})).await
    }

    /// Starts the platform with private servers and podman workspaces
    /// that really run (the static k8shelld and the Debian image that
    /// `./scripts/test` builds; no network).
    pub async fn start_with_workspaces() -> anyhow::Result<Self> {
        Box::pin(Self::start_inner(None, None, true, |_| {})).await
    }

    /// As [`TestPlatform::start_with_workspaces`], with `configure`
    /// changing the configuration last (e.g. short token lifetimes).
    pub async fn start_with_workspaces_and(
        configure: impl FnOnce(&mut PlatformConfig),
    ) -> anyhow::Result<Self> {
        Box::pin(Self::start_inner(None, None, true, configure)).await
    }

    async fn start_inner(
        nats_url: Option<String>,
        database_url: Option<String>,
        workspaces: bool,
        configure: impl FnOnce(&mut PlatformConfig),
    ) -> anyhow::Result<Self> {
        crate::init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("k8shell-platform-")
            .tempdir()?;
        let mut config = PlatformConfig::embedded(dir.path().to_path_buf());
        // The repository's blueprints, in a directory the test may add to.
        let blueprints = dir.path().join("blueprints");
        std::fs::create_dir_all(&blueprints)?;
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../blueprints");
        for entry in std::fs::read_dir(&source)? {
            let entry = entry?;
            std::fs::copy(entry.path(), blueprints.join(entry.file_name()))?;
        }
        config.workspaces.blueprints_dir = blueprints;
        config.policies_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        config.workspaces.blueprint_reload_interval = std::time::Duration::from_millis(100);
        // Workspaces of platform tests never reach a network.
        config.workspaces.network = "none".to_owned();
        if workspaces {
            config.workspaces.k8shelld_binary = Some(crate::provisioner::k8shelld_static()?);
            crate::provisioner::require_image()?;
            config.workspaces.containers_conf = Some(crate::provisioner::containers_conf());
        }
        config.ports = Ports::ephemeral();
        config.durability = Durability::Ephemeral;
        config.nats_url = nats_url;
        config.database_url = database_url;
        configure(&mut config);
        let platform = Platform::start(config, Shutdown::new()).await?;
        Ok(Self {
            platform: Some(platform),
            dir,
        })
    }

    /// The running platform.
    pub fn platform(&self) -> &Platform {
        // Only `stop` takes the platform, and it consumes `self`.
        self.platform
            .as_ref()
            .unwrap_or_else(|| unreachable!("platform taken before stop"))
    }

    /// `http://<addr>` of a service's listener, e.g. `("provisioner", "grpc")`.
    pub fn url(&self, service: &str, role: &str) -> String {
        match self.platform().listener(service, role) {
            Some(addr) => format!("http://{addr}"),
            None => panic!("{service} has no {role} listener"),
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stops everything and reports the first service error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match self.platform.take() {
            Some(platform) => platform.stop().await,
            None => Ok(()),
        }
    }
}
