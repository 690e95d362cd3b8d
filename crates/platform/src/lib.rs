//! The whole platform in one process: private NATS and PostgreSQL when no
//! URLs are configured, then every service, in dependency order, with their
//! addresses written to a state file for `k8shell status`.
//!
//! `k8shell up` and `k8shell-testkit` both start platforms through
//! [`Platform::start`].

mod config;
mod state;
mod status;

use std::time::Duration;

use anyhow::Context as _;
use k8shell_bus::BusConfig;
use k8shell_embedded::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions};
use k8shell_service::{RunningService, Shutdown};

pub use config::{
    PlatformConfig, Ports, SignIn, TokenTtls, WorkspaceOptions, default_data_dir,
    default_policies_dir,
};
pub use k8shell_sshproxy::hostkeys::Fingerprint;
pub use state::{PlatformState, ServiceState};

/// Where the SSH proxy of the platform in `data_dir` keeps its host keys.
fn ssh_host_key_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("sshproxy")
}

/// The SSH proxy's host key fingerprints (none before its first start).
pub fn ssh_host_keys(data_dir: &std::path::Path) -> anyhow::Result<Vec<Fingerprint>> {
    Ok(k8shell_sshproxy::hostkeys::fingerprints(
        &ssh_host_key_dir(data_dir),
    )?)
}
pub use status::{ServiceHealth, probe_services};

/// Every projection of every service, with the schema it lives in.
pub fn projections() -> Vec<(&'static str, std::sync::Arc<dyn k8shell_bus::Projection>)> {
    let identity = k8shell_identity::projections()
        .into_iter()
        .map(|p| (k8shell_identity::SCHEMA, p));
    let provisioner = k8shell_provisioner::projections()
        .into_iter()
        .map(|p| (k8shell_provisioner::SCHEMA, p));
    let authz = k8shell_authz::projections()
        .into_iter()
        .map(|p| (k8shell_authz::SCHEMA, p));
    identity.chain(authz).chain(provisioner).collect()
}

/// A running platform.
pub struct Platform {
    services: Vec<RunningService>,
    shutdown: Shutdown,
    nats: Option<NatsServer>,
    postgres: Option<PostgresCluster>,
    state: PlatformState,
    state_file: std::path::PathBuf,
}

impl Platform {
    /// Starts infrastructure (unless URLs are given) and every service.
    /// Services stop when `shutdown` triggers; call [`Platform::stop`] to
    /// wait for them and stop the infrastructure.
    pub async fn start(config: PlatformConfig, shutdown: Shutdown) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let (nats, nats_url) = match &config.nats_url {
            Some(url) => (None, url.clone()),
            None => {
                let server = NatsServer::start(NatsOptions {
                    dir: config.data_dir.join("nats"),
                    port: None,
                })
                .await
                .context("cannot start the private nats-server")?;
                let url = server.url();
                (Some(server), url)
            }
        };
        let (postgres, database_url) = match &config.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let cluster = PostgresCluster::start(PostgresOptions {
                    dir: config.data_dir.join("postgres"),
                    durability: config.durability,
                })
                .await
                .context("cannot start the private postgres cluster")?;
                let url = cluster.url().to_owned();
                (Some(cluster), url)
            }
        };
        let bus = BusConfig {
            url: nats_url.clone(),
            client_name: "k8shell-platform".into(),
            ..BusConfig::default()
        };
        let mut platform = Self {
            services: Vec::new(),
            shutdown: shutdown.clone(),
            nats,
            postgres,
            state: PlatformState::new(&config, &nats_url, &database_url),
            state_file: config.data_dir.join(state::STATE_FILE),
        };
        if let Err(error) = platform.start_services(&config, bus, &database_url).await {
            shutdown.trigger();
            if let Err(stop_error) = platform.stop().await {
                tracing::warn!(
                    error = format!("{stop_error:#}"),
                    "error while stopping after a failed start"
                );
            }
            return Err(error);
        }
        platform.state.services = platform
            .services
            .iter()
            .map(ServiceState::from_running)
            .collect();
        platform.state.write(&platform.state_file)?;
        Ok(platform)
    }

    async fn start_services(
        &mut self,
        config: &PlatformConfig,
        bus: BusConfig,
        database_url: &str,
    ) -> anyhow::Result<()> {
        let ports = &config.ports;
        let at = |port: u16| std::net::SocketAddr::new(config.bind, port);
        let child = || self.shutdown.child();
        let identity = k8shell_identity::start(
            k8shell_identity::Config {
                grpc_addr: at(ports.identity_grpc),
                http_addr: at(ports.identity_http),
                admin_addr: at(ports.identity_admin),
                // Derived from the bound address (ports may be ephemeral).
                issuer: String::new(),
                bus: bus.clone(),
                database_url: database_url.to_owned(),
                state_dir: config.data_dir.join("identity"),
                user_token_ttl: config.token_ttls.user,
                workspace_token_ttl: config.token_ttls.workspace,
                oidc_providers: config.sign_in.oidc_providers.clone(),
                ..Default::default()
            },
            child(),
        )
        .await?;
        let identity_grpc = identity
            .listener("grpc")
            .ok_or_else(|| anyhow::anyhow!("identity has no grpc listener"))?;
        self.services.push(identity);
        let authz = k8shell_authz::start(
            k8shell_authz::Config {
                grpc_addr: at(ports.authz_grpc),
                admin_addr: at(ports.authz_admin),
                bus: bus.clone(),
                database_url: database_url.to_owned(),
                policies_dir: config.policies_dir.clone(),
                ..Default::default()
            },
            child(),
        )
        .await?;
        let authz_grpc = authz
            .listener("grpc")
            .ok_or_else(|| anyhow::anyhow!("authz has no grpc listener"))?;
        self.services.push(authz);
        let provisioner = k8shell_provisioner::start(
            k8shell_provisioner::Config {
                grpc_addr: at(ports.provisioner_grpc),
                identity_url: format!("http://{identity_grpc}"),
                admin_addr: at(ports.provisioner_admin),
                bus: bus.clone(),
                database_url: database_url.to_owned(),
                shutdown_grace: Duration::from_secs(3),
                blueprints_dir: config.workspaces.blueprints_dir.clone(),
                blueprint_reload_interval: config.workspaces.blueprint_reload_interval,
                state_dir: config.data_dir.join("provisioner"),
                podman: k8shell_provisioner::PodmanConfig {
                    containers_conf: config.workspaces.containers_conf.clone(),
                    network: config.workspaces.network.clone(),
                    state_dir: config.data_dir.join("workspaces"),
                    k8shelld_binary: config.workspaces.k8shelld_binary.clone(),
                    ..Default::default()
                },
                lifecycle: config.workspaces.lifecycle.clone(),
                ..Default::default()
            },
            child(),
        )
        .await?;
        let provisioner_grpc = provisioner
            .listener("grpc")
            .ok_or_else(|| anyhow::anyhow!("provisioner has no grpc listener"))?;
        self.services.push(provisioner);
        let session = k8shell_session::start(
            k8shell_session::Config {
                admin_addr: at(ports.session_admin),
            },
            child(),
        )
        .await?;
        self.services.push(session);
        let nfgate = k8shell_nfgate::start(
            k8shell_nfgate::Config {
                admin_addr: at(ports.nfgate_admin),
            },
            child(),
        )
        .await?;
        self.services.push(nfgate);
        let sshproxy = k8shell_sshproxy::start(
            k8shell_sshproxy::Config {
                ssh_addr: at(ports.ssh),
                admin_addr: at(ports.sshproxy_admin),
                bus: bus.clone(),
                identity_url: format!("http://{identity_grpc}"),
                authz_url: format!("http://{authz_grpc}"),
                provisioner_url: format!("http://{provisioner_grpc}"),
                host_key_dir: ssh_host_key_dir(&config.data_dir),
                onboarding_provider: config.sign_in.ssh_onboarding_provider.clone(),
                ..Default::default()
            },
            child(),
        )
        .await?;
        self.services.push(sshproxy);
        let apiserver = k8shell_apiserver::start(
            k8shell_apiserver::Config {
                admin_addr: at(ports.http),
            },
            child(),
        )
        .await?;
        self.services.push(apiserver);
        Ok(())
    }

    /// The started services.
    pub fn services(&self) -> &[RunningService] {
        &self.services
    }

    /// The address of a service's listener, e.g. `("provisioner", "grpc")`.
    pub fn listener(&self, service: &str, role: &str) -> Option<std::net::SocketAddr> {
        self.services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.listener(role))
    }

    /// What `k8shell status` reads.
    pub fn state(&self) -> &PlatformState {
        &self.state
    }

    /// Resolves when any service exits (a failure or a shutdown), and
    /// removes it from the platform so [`Platform::stop`] does not wait on it.
    pub async fn wait_any_exit(&mut self) -> (&'static str, anyhow::Result<()>) {
        if self.services.is_empty() {
            std::future::pending::<()>().await;
        }
        let futures = self.services.iter_mut().map(|s| Box::pin(&mut s.task));
        let (joined, index, _) = futures::future::select_all(futures).await;
        let service = self.services.remove(index);
        let result = match joined {
            Ok(result) => result,
            Err(join) => Err(anyhow::anyhow!("task failed: {join}")),
        };
        (service.name, result)
    }

    /// Stops every service (bounded drain), then PostgreSQL, then NATS.
    /// Returns the first service error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        // One deadline for all services together, so Ctrl-C stays under 5 s
        // even if several are slow.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let waits = self.services.drain(..).map(|service| async move {
            let name = service.name;
            match tokio::time::timeout_at(deadline, service.task).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(error))) => Some(error.context(format!("{name} failed"))),
                Ok(Err(join)) if join.is_cancelled() => None,
                Ok(Err(join)) => Some(anyhow::anyhow!("{name} panicked: {join}")),
                Err(_) => {
                    tracing::warn!(service = name, "service did not stop in time");
                    None
                }
            }
        });
        let first_error = futures::future::join_all(waits)
            .await
            .into_iter()
            .flatten()
            .next();
        if let Some(mut postgres) = self.postgres.take() {
            postgres.stop().await;
        }
        if let Some(mut nats) = self.nats.take() {
            nats.stop().await;
        }
        let _ = std::fs::remove_file(&self.state_file);
        first_error.map_or(Ok(()), Err)
    }
}
