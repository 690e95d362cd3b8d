//! sshproxy: the SSH server in front of every workspace.
//!
//! Any OpenSSH client logs in with a user string (`alice~dev`, DESIGN §4);
//! the proxy authenticates through identity, asks authz for `session:start`
//! and for every channel, starts the workspace through the provisioner when
//! it is not running (progress lines stream to the client), and maps each
//! channel onto a k8shelld RPC: shells and commands, SFTP, port and socket
//! forwards, agent forwarding. One async task per connection; k8shelld
//! connections are pooled per workspace.

pub mod audit;
mod auth;
mod backends;
mod channels;
mod daemon;
mod handler;
pub mod hostkeys;
pub mod proxy_protocol;
pub mod recording;
mod server;
mod target;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8shell_bus::{Bus, BusConfig, BusMetrics};
use k8shell_service::daemon_channel::DaemonClientTls;
use k8shell_service::{AdminServer, Health, RunningService, Shutdown};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Service name.
pub const NAME: &str = "sshproxy";

/// sshproxy configuration (env prefix `K8SHELL_SSHPROXY_`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The SSH listener.
    pub ssh_addr: SocketAddr,
    /// Health and metrics.
    pub admin_addr: SocketAddr,
    /// Event bus (`ssh.auth_failed`, `session.*`).
    pub bus: BusConfig,
    /// identity's gRPC API.
    pub identity_url: String,
    /// authz's gRPC API.
    pub authz_url: String,
    /// The provisioner's gRPC API.
    pub provisioner_url: String,
    /// Where the host keys live (generated on first start: ed25519, ECDSA
    /// P-256, RSA 3072).
    pub host_key_dir: PathBuf,
    /// Every connection starts with a PROXY protocol header (v1 or v2), as
    /// behind a load balancer; the header's source address is the client's.
    /// Connections without one are refused.
    pub proxy_protocol: bool,
    /// From TCP accept to the end of the key exchange and the first
    /// authentication request.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// From TCP accept to a successful login.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Keepalive probes after this much silence from the client (three
    /// unanswered ones close the connection).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Failed authentication attempts before the connection is closed.
    pub max_auth_tries: usize,
    /// The blueprint of `alice`-style logins (no blueprint, no `ws=`).
    pub default_blueprint: String,
    /// Longest a connection waits for its workspace to start.
    #[serde(with = "humantime_serde")]
    pub cold_start_timeout: Duration,
    /// Channels open at once on one connection.
    pub max_channels: usize,
    /// Environment variables a client may set (`SendEnv`); `*` ends a
    /// prefix pattern.
    pub accept_env: Vec<String>,
    /// The OpenID provider (a name from identity's `oidc_providers`) whose
    /// device flow onboards unknown users over keyboard-interactive; empty:
    /// none.
    pub onboarding_provider: String,
    /// Shown before authentication (SSH banner); empty: none.
    pub banner: String,
    /// The client certificate for k8shelld's mutual TLS, needed when
    /// workspaces publish `https://` endpoints (the Kubernetes runtime);
    /// unset: `unix://` and `http://` endpoints only.
    pub daemon_tls: Option<DaemonTlsFiles>,
    /// Longest a stop waits for connections to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// PEM files for k8shelld's mutual TLS.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonTlsFiles {
    /// The workspace CA certificate (the provisioner's
    /// `workspace-ca/ca.crt`), which signed k8shelld's certificates.
    pub ca_path: PathBuf,
    /// A client certificate that CA issued for the proxy.
    pub cert_path: PathBuf,
    /// Its private key.
    pub key_path: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ssh_addr: SocketAddr::from(([127, 0, 0, 1], 2222)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 7505)),
            bus: BusConfig::default(),
            identity_url: "http://127.0.0.1:7401".to_owned(),
            authz_url: "http://127.0.0.1:7402".to_owned(),
            provisioner_url: "http://127.0.0.1:7404".to_owned(),
            host_key_dir: PathBuf::from("/var/lib/k8shell/sshproxy"),
            proxy_protocol: false,
            handshake_timeout: Duration::from_secs(15),
            auth_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(3600),
            keepalive_interval: Duration::from_secs(30),
            max_auth_tries: 6,
            default_blueprint: "dev".to_owned(),
            cold_start_timeout: Duration::from_secs(300),
            max_channels: 64,
            accept_env: vec![
                "LANG".to_owned(),
                "LC_*".to_owned(),
                "TZ".to_owned(),
                "COLORTERM".to_owned(),
                "GIT_*".to_owned(),
            ],
            onboarding_provider: String::new(),
            banner: String::new(),
            daemon_tls: None,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Starts sshproxy and returns once it listens.
pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<RunningService> {
    let mut registry = Registry::default();
    let bus_metrics = BusMetrics::register(&mut registry);
    let metrics = server::Metrics::register(&mut registry);
    let health = Health::new();
    health.register("bus");
    let host_keys = hostkeys::load_or_generate(&config.host_key_dir)
        .with_context(|| format!("host keys in {}", config.host_key_dir.display()))?;
    let daemon_tls = config
        .daemon_tls
        .as_ref()
        .map(|files| DaemonClientTls::from_files(&files.ca_path, &files.cert_path, &files.key_path))
        .transpose()
        .context("daemon_tls")?;
    let bus = Bus::connect(config.bus.clone(), bus_metrics)
        .await
        .context("cannot connect to the event bus")?;
    bus.ensure_streams()
        .await
        .context("failed to set up event streams")?;
    let backends = backends::Backends::connect(&config)?;
    let listener = TcpListener::bind(config.ssh_addr)
        .await
        .with_context(|| format!("failed to bind ssh on {}", config.ssh_addr))?;
    let ssh_addr = listener.local_addr()?;
    let admin = AdminServer::bind(config.admin_addr, NAME, health.clone(), Arc::new(registry))
        .await
        .with_context(|| format!("failed to bind admin on {}", config.admin_addr))?;
    let admin_addr = admin.local_addr()?;

    let components = shutdown.child();
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    {
        let shutdown = components.clone();
        tasks.spawn(async move { Ok(admin.serve(shutdown).await?) });
    }
    {
        let probe_bus = bus.clone();
        let probe = k8shell_service::spawn_probe(
            health.clone(),
            "bus",
            Duration::from_secs(1),
            components.clone(),
            move || {
                let state = probe_bus.connection_state();
                async move { state }
            },
        );
        tasks.spawn(async move { probe.await? });
    }
    let server = server::Server::new(
        Arc::new(config.clone()),
        host_keys,
        backends,
        audit::Audit::new(bus.event_store()),
        metrics,
        daemon::DaemonPool::new(daemon_tls),
    );
    {
        let shutdown = components.clone();
        let grace = config.shutdown_grace;
        tasks.spawn(async move { server.serve(listener, shutdown, grace).await });
    }
    let task = tokio::spawn(async move {
        let first = tokio::select! {
            _ = shutdown.wait() => None,
            exited = tasks.join_next() => exited,
        };
        components.trigger();
        let drained = k8shell_service::drain(tasks, config.shutdown_grace * 2).await;
        if let Some(Ok(Err(error))) = first {
            return Err(error.context("sshproxy component failed"));
        }
        drained
    });
    tracing::info!(%ssh_addr, %admin_addr, "sshproxy started");
    Ok(RunningService {
        name: NAME,
        listeners: vec![("ssh", ssh_addr), ("admin", admin_addr)],
        task,
    })
}

/// Runs sshproxy until shutdown.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    start(config, shutdown).await?.task.await?
}
