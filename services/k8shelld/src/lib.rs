//! k8shelld: the daemon inside every workspace and the only way into it.
//!
//! It serves gRPC on a unix socket (the local runtime bind-mounts its
//! directory) with a bearer-token check on every call. This first slice
//! provides Shell (PTY sessions that survive their clients, reattached with
//! the current screen), Exec, session listing and detaching, and activity.

mod activity;
mod api;
mod apps;
mod attach;

mod auth;
mod bootstrap;
mod chunks;
mod exec;
mod forward;
pub mod install;
pub mod kbox;

mod pid1;
mod ports;
mod rest;
mod session;
mod sftp;
mod shell;
mod signals;
mod system;
mod unix;
mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8shell_proto::k8shelld::v1::k8shelld_server::K8shelldServer;
use k8shell_service::{RunningService, Shutdown};
use serde::{Deserialize, Serialize};

pub use apps::{AppConfig, RestartPolicy, VersionProbe};
pub use auth::{Caller, JwksError, TokenVerifier};
pub use bootstrap::{InitScript, WorkspaceUser};
pub use sftp::serve_stdio as serve_sftp_stdio;

pub use session::snapshot;

/// TCP listener with mutual TLS: the server proves itself with `cert`/`key`,
/// and only clients with a certificate issued by `client_ca` may connect
/// (the bearer token is still required on every call).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    pub addr: SocketAddr,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub client_ca_path: PathBuf,
}

fn tls_config(tls: &TlsListener) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let identity =
        tonic::transport::Identity::from_pem(read(&tls.cert_path)?, read(&tls.key_path)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(
            &tls.client_ca_path,
        )?))
        .client_auth_optional(false))
}

/// Where gRPC is served.
enum GrpcListener {
    Unix(tokio::net::UnixListener),
    Tls(
        tokio::net::TcpListener,
        Box<tonic::transport::ServerTlsConfig>,
    ),
}

/// Service name, as reported by health endpoints.
pub const NAME: &str = "k8shelld";

/// Configuration (env prefix `K8SHELL_K8SHELLD_`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Health and metrics address inside the workspace.
    pub admin_addr: SocketAddr,
    /// gRPC unix socket (the local runtime bind-mounts its directory).
    pub socket_path: PathBuf,
    /// Serve gRPC on TCP with mutual TLS instead of the unix socket (the
    /// Kubernetes runtime, where the platform reaches the pod over the network).
    pub tls: Option<TlsListener>,
    /// This workspace's id: the audience every token must carry.
    pub workspace_id: String,
    /// JWKS document (inline JSON) with the keys tokens are signed with.
    pub jwks: Option<String>,
    /// File holding the JWKS, when not inline.
    pub jwks_path: Option<PathBuf>,
    /// Required token issuer, when set.
    pub issuer: Option<String>,
    /// Account processes run as by default; k8shelld's own when empty.
    pub user: String,
    /// How long a session without clients survives.
    #[serde(with = "humantime_serde")]
    pub detached_ttl: Duration,
    /// Adopt and reap orphaned descendants (always on as PID 1; elsewhere
    /// k8shelld becomes a child subreaper).
    pub reap_orphans: bool,
    /// Longest a stop waits for children after SIGTERM before SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// The workspace user to create at boot (needs root); it becomes the
    /// default account.
    pub bootstrap_user: Option<bootstrap::WorkspaceUser>,
    /// Scripts run once each, in order, after the daemon serves.
    pub init_scripts: Vec<bootstrap::InitScript>,
    /// Volume mount points the bootstrap user should own (a fresh volume
    /// is root's).
    pub user_volumes: Vec<PathBuf>,
    /// Where k8shelld keeps state across restarts (init script records, logs).
    pub state_dir: PathBuf,
    /// Local REST API socket (for `kbox`), open to the workspace user and root.
    pub local_api_path: PathBuf,
    /// The binary run as `<binary> sftp-server` for SFTP; k8shelld itself
    /// when unset.
    pub sftp_server: Option<PathBuf>,
    /// Where the daemon's own log lines are kept for `Logs` (set by `main`;
    /// an empty buffer otherwise).
    #[serde(skip)]
    pub log_buffer: Option<k8shell_telemetry::LogBuffer>,
    /// Apps the workspace runs.
    pub apps: Vec<apps::AppConfig>,
    /// First delay before restarting an exited app; doubles up to a minute.
    #[serde(with = "humantime_serde")]
    pub app_restart_backoff: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 7508)),
            socket_path: PathBuf::from("/run/k8shell/k8shelld.sock"),
            tls: None,

            workspace_id: String::new(),
            jwks: None,
            jwks_path: None,
            issuer: None,
            user: String::new(),
            detached_ttl: Duration::from_secs(30 * 60),
            reap_orphans: true,
            stop_grace: Duration::from_secs(2),
            bootstrap_user: None,
            init_scripts: Vec::new(),
            user_volumes: Vec::new(),
            state_dir: PathBuf::from("/var/lib/k8shelld"),
            local_api_path: PathBuf::from("/run/k8shelld.sock"),
            sftp_server: None,
            log_buffer: None,
            apps: Vec::new(),
            app_restart_backoff: Duration::from_secs(1),
        }
    }
}

/// Keys pushed by the platform after boot (see `UpdateJwks`), which
/// supersede the boot configuration's.
fn updated_jwks_file(config: &Config) -> PathBuf {
    config.state_dir.join("jwks.json")
}

fn verifier(config: &Config) -> anyhow::Result<TokenVerifier> {
    anyhow::ensure!(
        !config.workspace_id.is_empty(),
        "workspace_id is required (it is the token audience)"
    );
    let updated = std::fs::read_to_string(updated_jwks_file(config)).ok();
    let jwks = match (&updated, &config.jwks, &config.jwks_path) {
        (Some(updated), _, _) => updated.clone(),
        (None, Some(inline), _) => inline.clone(),
        (None, None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read jwks from {}", path.display()))?,
        (None, None, None) => {
            anyhow::bail!("a jwks (inline or jwks_path) is required to verify tokens")
        }
    };
    Ok(TokenVerifier::new(
        &jwks,
        &config.workspace_id,
        config.issuer.as_deref(),
    )?)
}

/// Starts k8shelld and returns once it listens.
pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<RunningService> {
    let verifier = verifier(&config)?;
    // The user exists before anyone can reach the workspace.
    if let Some(user) = &config.bootstrap_user {
        bootstrap::ensure_user(std::path::Path::new("/"), user)
            .with_context(|| format!("cannot create the workspace user {}", user.name))?;
        for path in &config.user_volumes {
            bootstrap::hand_over_mount_point(path, user)
                .with_context(|| format!("cannot give {} to {}", path.display(), user.name))?;
        }
    }
    let default_user = match (&config.bootstrap_user, config.user.is_empty()) {
        (_, false) => config.user.clone(),
        (Some(user), true) => user.name.clone(),
        (None, true) => users::current_user_name(),
    };
    let listener = match &config.tls {
        None => {
            if let Some(dir) = config.socket_path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // A socket left by a previous run would make bind fail.
            let _ = std::fs::remove_file(&config.socket_path);
            GrpcListener::Unix(
                tokio::net::UnixListener::bind(&config.socket_path).with_context(|| {
                    format!("cannot listen on {}", config.socket_path.display())
                })?,
            )
        }
        Some(tls) => GrpcListener::Tls(
            tokio::net::TcpListener::bind(tls.addr)
                .await
                .with_context(|| format!("cannot listen on {}", tls.addr))?,
            Box::new(tls_config(tls)?),
        ),
    };
    let grpc_addr = match &listener {
        GrpcListener::Tls(tcp, _) => Some(tcp.local_addr()?),
        GrpcListener::Unix(_) => None,
    };
    let admin =
        k8shell_service::start_admin_only(NAME, config.admin_addr, shutdown.child()).await?;

    let children = pid1::Children::default();
    if config.reap_orphans {
        pid1::become_subreaper().context("cannot become a child subreaper")?;
        tokio::spawn(pid1::reap_orphans(
            children.clone(),
            shutdown.clone().wait_owned(),
        ));
    }
    let sessions = session::Sessions::new(default_user.clone(), children.clone());
    let init_state = Arc::new(bootstrap::InitState::new(config.state_dir.clone()));
    let logs = config
        .log_buffer
        .clone()
        .unwrap_or_else(|| k8shell_telemetry::LogBuffer::new(1));
    let activity = activity::Activity::default();
    let account =
        users::resolve("", &default_user).map_err(|s| anyhow::anyhow!("{}", s.message()))?;

    let apps = apps::Apps::start(
        &config.apps,
        account.clone(),
        children.clone(),
        config.app_restart_backoff,
    );
    let api = api::Api {
        sessions: sessions.clone(),
        activity: activity.clone(),
        default_user: default_user.clone(),
        children: children.clone(),
        started: std::time::Instant::now(),
        pending_connections: unix::Pending::default(),
        init_state: init_state.clone(),
        init_scripts: config.init_scripts.clone(),
        apps: apps.clone(),
        account: account.clone(),
        logs: logs.clone(),
        verifier: verifier.clone(),
        jwks_file: updated_jwks_file(&config),
        sftp_server: match &config.sftp_server {
            Some(path) => path.clone(),
            None => std::env::current_exe().context("cannot find the k8shelld binary for sftp")?,
        },
    };

    let local_api = rest::serve(
        &config.local_api_path,
        rest::RestState {
            account: account.clone(),
            apps,
            logs,
            activity,
            sessions: sessions.clone(),
            started: std::time::Instant::now(),
            shutdown: shutdown.clone(),
        },
    )
    .with_context(|| format!("cannot listen on {}", config.local_api_path.display()))?;

    let intercept = {
        let verifier = Arc::new(verifier);
        move |request| verifier.intercept(request)
    };
    let server_shutdown = shutdown.clone();
    let grpc = tokio::spawn(async move {
        let service = K8shelldServer::with_interceptor(api, intercept);
        match listener {
            GrpcListener::Unix(unix) => tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(unix),
                    server_shutdown.wait(),
                )
                .await
                .context("grpc server failed"),
            GrpcListener::Tls(tcp, tls) => tonic::transport::Server::builder()
                .tls_config(*tls)
                .context("invalid tls configuration")?
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(tcp),
                    server_shutdown.wait(),
                )
                .await
                .context("grpc server failed"),
        }
    });
    // Init scripts run once the workspace is reachable, without blocking it.
    if !config.init_scripts.is_empty() {
        let scripts = config.init_scripts.clone();
        let state = init_state;
        tokio::spawn(async move { state.run(&scripts, &account).await });
    }
    let ttl = config.detached_ttl;
    let reaper_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let period = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = reaper_shutdown.wait() => return,
                _ = tokio::time::sleep(period) => sessions.expire(ttl).await,
            }
        }
    });
    let admin_addr = admin.listener("admin");
    let admin_task = admin.task;
    let socket = config.socket_path.clone();
    let stop_grace = config.stop_grace;
    let task = tokio::spawn(async move {
        shutdown.wait().await;
        // A stop never waits for a timeout longer than the grace: children
        // get SIGTERM, then SIGKILL; streams still open are cut.
        children.terminate_all(stop_grace).await;
        let result = match tokio::time::timeout(Duration::from_millis(500), grpc).await {
            Ok(joined) => joined?,
            Err(_) => Ok(()),
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), admin_task).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), local_api).await;
        let _ = std::fs::remove_file(&socket);
        result
    });
    match grpc_addr {
        Some(addr) => tracing::info!(%addr, "k8shelld serving over mutual TLS"),
        None => tracing::info!(socket = %config.socket_path.display(), "k8shelld serving"),
    }

    let mut listeners = Vec::new();
    if let Some(addr) = admin_addr {
        listeners.push(("admin", addr));
    }
    if let Some(addr) = grpc_addr {
        listeners.push(("grpc", addr));
    }

    Ok(RunningService {
        name: NAME,
        listeners,
        task,
    })
}

/// Runs k8shelld until shutdown.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    start(config, shutdown).await?.task.await?
}
