//! The listener: one task per TCP connection (PROXY header, SSH session,
//! timeouts, the events that close it), all sharing the backends and the
//! k8shelld pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8shell_events::session::SessionEnded;
use k8shell_events::shield::{SshAuthFailed, address_id};
use k8shell_service::Shutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use russh::keys::PrivateKey;
use russh::{MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::Config;
use crate::audit::Audit;
use crate::backends::Backends;
use crate::daemon::DaemonPool;
use crate::handler::{Conn, SshHandler};

/// sshproxy's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Connections accepted.
    pub connections: Counter,
    /// Connections open now.
    pub open_connections: Gauge,
    /// Sessions that logged in.
    pub logins: Counter,
    /// Failed authentication attempts (handshake failures included).
    pub auth_failures: Counter,
    /// Channels opened.
    pub channels: Counter,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            connections: Counter::default(),
            open_connections: Gauge::default(),
            logins: Counter::default(),
            auth_failures: Counter::default(),
            channels: Counter::default(),
        };
        let registry = registry.sub_registry_with_prefix("sshproxy");
        registry.register(
            "connections",
            "TCP connections accepted",
            metrics.connections.clone(),
        );
        registry.register(
            "open_connections",
            "SSH connections open now",
            metrics.open_connections.clone(),
        );
        registry.register("logins", "Successful logins", metrics.logins.clone());
        registry.register(
            "auth_failures",
            "Failed authentication attempts, handshake failures included",
            metrics.auth_failures.clone(),
        );
        registry.register("channels", "SSH channels opened", metrics.channels.clone());
        metrics
    }
}

/// What every connection shares.
pub struct Shared {
    /// Configuration.
    pub config: Arc<Config>,
    /// Platform services.
    pub backends: Backends,
    /// Event publishing.
    pub audit: Audit,
    /// k8shelld connections.
    pub daemons: DaemonPool,
    /// Metrics.
    pub metrics: Metrics,
}

/// The SSH server.
pub struct Server {
    shared: Arc<Shared>,
    ssh: Arc<russh::server::Config>,
}

impl Server {
    /// A server with `host_keys`.
    pub fn new(
        config: Arc<Config>,
        host_keys: Vec<PrivateKey>,
        backends: Backends,
        audit: Audit,
        metrics: Metrics,
        daemons: DaemonPool,
    ) -> Self {
        let ssh = russh::server::Config {
            server_id: russh::SshId::Standard(
                format!("SSH-2.0-k8shell_{}", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: MethodSet::from(
                &[
                    MethodKind::PublicKey,
                    MethodKind::Password,
                    MethodKind::KeyboardInteractive,
                ][..],
            ),
            // Every rejection takes as long, whether or not the user exists
            // (the first `none` probe of OpenSSH clients is answered at once).
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: host_keys,
            max_auth_attempts: config.max_auth_tries,
            inactivity_timeout: Some(config.idle_timeout),
            keepalive_interval: Some(config.keepalive_interval),
            keepalive_max: 3,
            // Keystrokes go out at once.
            nodelay: true,
            // Clients learn every host key (and later rotations) with
            // `UpdateHostKeys` (third_party/russh carries this).
            announce_host_keys: true,
            ..Default::default()
        };
        Self {
            shared: Arc::new(Shared {
                config,
                backends,
                audit,
                daemons,
                metrics,
            }),
            ssh: Arc::new(ssh),
        }
    }

    /// Accepts connections until `shutdown`, then disconnects the open
    /// ones (with a message) and waits up to `grace` for them.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: wait, go on.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    self.shared.metrics.connections.inc();
                    let shared = Arc::clone(&self.shared);
                    let ssh = Arc::clone(&self.ssh);
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        serve_connection(shared, ssh, stream, peer, shutdown).await;
                    });
                }
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.abort_all();
        Ok(())
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    ssh: Arc<russh::server::Config>,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    let handshake_timeout = shared.config.handshake_timeout;
    let client = if shared.config.proxy_protocol {
        match tokio::time::timeout(
            handshake_timeout,
            crate::proxy_protocol::read_header(&mut stream),
        )
        .await
        {
            Ok(Ok(Some(address))) => address,
            Ok(Ok(None)) => peer,
            Ok(Err(error)) => {
                tracing::warn!(%peer, %error, "connection refused");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "no PROXY protocol header in time; connection refused");
                return;
            }
        }
    } else {
        peer
    };
    let _open = OpenConnection::new(&shared.metrics);
    let conn = Conn::new(Arc::clone(&shared), client);
    let handler = SshHandler::new(Arc::clone(&conn));
    let session = match tokio::time::timeout(
        handshake_timeout,
        russh::server::run_stream(ssh, stream, handler),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(error)) => {
            handshake_failed(&conn, &error.to_string()).await;
            return;
        }
        Err(_) => {
            handshake_failed(&conn, "no SSH identification in time").await;
            return;
        }
    };
    let handle = session.handle();
    conn.set_handle(handle.clone());
    // The handshake and then the login must finish in time.
    let deadlines = {
        let conn = Arc::clone(&conn);
        let handle = handle.clone();
        let auth_timeout = shared.config.auth_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(handshake_timeout).await;
            if conn.auth_attempts.load(Ordering::SeqCst) == 0 && conn.login().is_none() {
                conn.note_timeout();
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "k8shell: the handshake took too long".to_owned(),
                        String::new(),
                    )
                    .await;
                return;
            }
            tokio::time::sleep(auth_timeout.saturating_sub(handshake_timeout)).await;
            if conn.login().is_none() {
                conn.note_timeout();
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "k8shell: login took too long".to_owned(),
                        String::new(),
                    )
                    .await;
            }
        })
    };
    let outcome = tokio::select! {
        outcome = session => outcome.map_err(|e| e.to_string()),
        _ = shutdown.wait() => {
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "k8shell: the proxy is shutting down".to_owned(),
                    String::new(),
                )
                .await;
            Err("shutdown".to_owned())
        }
    };
    deadlines.abort();
    conn.close_channels();
    match conn.login() {
        None => {
            if conn.auth_attempts.load(Ordering::SeqCst) == 0 {
                let reason = match &outcome {
                    Ok(()) if conn.timed_out() => "timeout".to_owned(),
                    Ok(()) => "closed before authenticating".to_owned(),
                    Err(error) => error.clone(),
                };
                handshake_failed(&conn, &reason).await;
            }
        }
        Some(login) => {
            let reason = match &outcome {
                Ok(()) if conn.timed_out() => "timeout".to_owned(),
                Ok(()) => "disconnect".to_owned(),
                Err(error) if error == "shutdown" => "shutdown".to_owned(),
                Err(error) => format!("error: {error}"),
            };
            let workspace_id = conn.workspace_id().unwrap_or_default();
            let ended = SessionEnded {
                session_id: conn.id.clone(),
                username: login.username.clone(),
                workspace_id,
                client_address: conn.client.ip().to_string(),
                channels: conn.channel_counts(),
                bytes_in: conn.bytes_in.load(Ordering::Relaxed),
                bytes_out: conn.bytes_out.load(Ordering::Relaxed),
                duration_seconds: conn.started.elapsed().as_secs_f64(),
                reason,
            };
            tracing::info!(session = %conn.id, user = %login.username, bytes_in = ended.bytes_in, bytes_out = ended.bytes_out, "session ended");
            shared.audit.publish(&conn.id, &ended).await;
        }
    }
}

/// A connection that ended before any authentication attempt: scanners,
/// broken clients, key-exchange failures. They count as failures too.
async fn handshake_failed(conn: &Conn, reason: &str) {
    tracing::info!(client = %conn.client, %reason, "handshake failed");
    conn.shared.metrics.auth_failures.inc();
    let source = conn.client.ip().to_string();
    conn.shared
        .audit
        .publish(
            &address_id(&source),
            &SshAuthFailed {
                source,
                username: String::new(),
                method: "handshake".to_owned(),
                reason: reason.to_owned(),
            },
        )
        .await;
}

/// Keeps the open-connections gauge right however a connection ends.
struct OpenConnection(Gauge);

impl OpenConnection {
    fn new(metrics: &Metrics) -> Self {
        metrics.open_connections.inc();
        Self(metrics.open_connections.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
