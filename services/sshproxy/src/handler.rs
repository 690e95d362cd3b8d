//! One SSH connection: its state ([`Conn`]) and the russh handler that
//! authenticates it and hands each channel to its own task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use k8shell_addressing::UserString;
use k8shell_events::session::SessionStarted;
use k8shell_events::shield::{SshAuthFailed, address_id};
use k8shell_proto::authz::v1 as authz;
use russh::keys::ssh_key;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, DeviceLogin, Login, LoginFailure};
use crate::server::Shared;
use crate::target::{self, WorkspaceGate};
use crate::token::{self, UserToken};

/// A handler failure ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The SSH layer.
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

/// What a logged-in connection knows about its workspace.
pub struct Admitted {
    /// The workspace's owner.
    pub owner: String,
    /// Getting it running.
    pub gate: WorkspaceGate,
    /// `session:start` obligations.
    pub obligations: std::collections::HashMap<String, String>,
}

/// The state of one connection, shared by its handler and channel tasks.
pub struct Conn {
    /// Session id (`ses_…`), the aggregate of its events.
    pub id: String,
    /// Everything connections share.
    pub shared: Arc<Shared>,
    /// The client (after the PROXY header).
    pub client: SocketAddr,
    /// When the TCP connection was accepted.
    pub started: Instant,
    /// Authentication attempts (failures and successes).
    pub auth_attempts: AtomicUsize,
    /// Bytes from the client into the workspace.
    pub bytes_in: AtomicU64,
    /// Bytes from the workspace to the client.
    pub bytes_out: AtomicU64,
    open_channels: AtomicUsize,
    target: OnceLock<(String, UserString)>,
    login: OnceLock<Login>,
    /// The current user token (renewed in long sessions).
    token: Arc<UserToken>,
    session: OnceLock<Admitted>,
    handle: OnceLock<russh::server::Handle>,
    client_version: OnceLock<String>,
    channel_counts: Mutex<BTreeMap<String, u64>>,
    agent_channels: Mutex<HashSet<ChannelId>>,
    remote_forwards: Mutex<HashMap<(String, u32), CancellationToken>>,
    timed_out: AtomicBool,
    /// Cancelled when the connection ends: channel tasks stop.
    pub closed: CancellationToken,
}

impl Conn {
    /// A new connection from `client`.
    pub fn new(shared: Arc<Shared>, client: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            id: format!("ses_{}", uuid::Uuid::now_v7().simple()),
            shared,
            client,
            started: Instant::now(),
            auth_attempts: AtomicUsize::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            open_channels: AtomicUsize::new(0),
            target: OnceLock::new(),
            login: OnceLock::new(),
            token: Arc::new(UserToken::default()),
            session: OnceLock::new(),
            handle: OnceLock::new(),
            client_version: OnceLock::new(),
            channel_counts: Mutex::new(BTreeMap::new()),
            agent_channels: Mutex::new(HashSet::new()),
            remote_forwards: Mutex::new(HashMap::new()),
            timed_out: AtomicBool::new(false),
            closed: CancellationToken::new(),
        })
    }

    /// Records the session's handle (once the SSH session runs).
    pub fn set_handle(&self, handle: russh::server::Handle) {
        let _ = self.handle.set(handle);
    }

    /// The session's handle.
    pub fn handle(&self) -> Option<&russh::server::Handle> {
        self.handle.get()
    }

    /// The login, once authenticated.
    pub fn login(&self) -> Option<&Login> {
        self.login.get()
    }

    /// The logged-in session's workspace state.
    pub fn session(&self) -> Option<&Admitted> {
        self.session.get()
    }

    /// The workspace id, once known.
    pub fn workspace_id(&self) -> Option<String> {
        self.session()
            .and_then(|s| s.gate.running())
            .map(|r| r.id)
            .or_else(|| {
                self.target
                    .get()
                    .and_then(|(_, target)| target.workspace.clone())
            })
    }

    /// A user token valid for at least another minute: the login's, or,
    /// once that runs out in a long session, a fresh one from logging in
    /// again with the key or certificate the client proved to hold. Other
    /// logins' tokens are renewed in the background ([`token::keep_renewed`]).
    pub async fn user_token(&self) -> Result<String, String> {
        let login = self.login().ok_or("not logged in")?;
        let fresh_until = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        let (current, expires_at) = self.token.get();
        if expires_at.is_none_or(|expiry| expiry > fresh_until) {
            return Ok(current);
        }
        let Some(line) = &login.proven_key else {
            return Ok(current);
        };
        let renewed = auth::public_key(
            &self.shared.backends,
            &login.username,
            line.clone(),
            &self.client.ip().to_string(),
            login.method,
        )
        .await
        .map_err(|e| format!("cannot renew the login: {e}"))?;
        tracing::info!(session = %self.id, user = %login.username, "user token renewed");
        self.token.set(renewed.token.clone(), renewed.expires_at);
        Ok(renewed.token)
    }

    /// A client of the workspace's k8shelld acting for the user.
    pub async fn daemon(
        &self,
        running: &crate::target::Running,
    ) -> Result<crate::daemon::DaemonClient, String> {
        let username = self.login().ok_or("not logged in")?.username.clone();
        let token = self.user_token().await?;
        self.shared
            .daemons
            .client(
                &self.shared.backends,
                &running.id,
                &running.endpoint,
                &username,
                &token,
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// The parsed user string.
    pub fn target(&self) -> Option<&UserString> {
        self.target.get().map(|(_, target)| target)
    }

    /// The account inside the workspace (`user=`), empty for the default.
    pub fn account(&self) -> String {
        self.target()
            .and_then(|t| t.login.clone())
            .unwrap_or_default()
    }

    /// Active `-R` listeners by (address, bound port).
    pub fn remote_forwards(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, u32), CancellationToken>> {
        self.remote_forwards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A timeout closed the connection.
    pub fn note_timeout(&self) {
        self.timed_out.store(true, Ordering::SeqCst);
    }

    /// Whether a timeout closed it.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// Stops every channel task.
    pub fn close_channels(&self) {
        self.closed.cancel();
    }

    /// Channels opened, by kind.
    pub fn channel_counts(&self) -> BTreeMap<String, u64> {
        self.channel_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a channel of `kind`.
    pub fn count_channel(&self, kind: &str) {
        self.shared.metrics.channels.inc();
        *self
            .channel_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    /// Whether `channel` asked for agent forwarding (and policy allowed it).
    pub fn wants_agent(&self, channel: ChannelId) -> bool {
        self.agent_channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&channel)
    }

    /// Takes a channel slot; `None` at the limit. The slot is given back
    /// when the returned guard drops.
    pub fn channel_slot(self: &Arc<Self>) -> Option<ChannelSlot> {
        let limit = self.shared.config.max_channels;
        let taken = self.open_channels.fetch_add(1, Ordering::SeqCst);
        if taken >= limit {
            self.open_channels.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ChannelSlot(Arc::clone(self)))
    }

    /// Asks authz about `action` on this connection's workspace.
    pub async fn decide(
        &self,
        action: &str,
        context: std::collections::HashMap<String, String>,
    ) -> authz::Decision {
        let (Some(login), Some(session)) = (self.login(), self.session()) else {
            return authz::Decision {
                allow: false,
                reasons: vec!["not logged in".to_owned()],
                ..Default::default()
            };
        };
        let workspace = self.workspace_id().unwrap_or_default();
        self.shared
            .backends
            .decide(authz::EvaluateRequest {
                subject: Some(login.subject()),
                action: action.to_owned(),
                resource: Some(target::resource(&session.owner, &workspace)),
                context,
                capability_check: false,
            })
            .await
    }

    async fn auth_failed(&self, username: &str, method: &str, reason: &str) {
        tracing::info!(client = %self.client, user = %username, %method, %reason, "authentication failed");
        self.shared.metrics.auth_failures.inc();
        let source = self.client.ip().to_string();
        self.shared
            .audit
            .publish(
                &address_id(&source),
                &SshAuthFailed {
                    source,
                    username: username.to_owned(),
                    method: method.to_owned(),
                    reason: reason.to_owned(),
                },
            )
            .await;
    }

    /// Disconnects with `message` shown by the client.
    pub async fn disconnect(&self, reason: russh::Disconnect, message: String) {
        if let Some(handle) = self.handle() {
            let _ = handle.disconnect(reason, message, String::new()).await;
        }
    }
}

/// One open channel; dropping it frees the slot.
pub struct ChannelSlot(Arc<Conn>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.open_channels.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Interactive {
    Idle,
    Password,
    Device(Box<DeviceLogin>),
}

/// The russh handler of one connection.
pub struct SshHandler {
    conn: Arc<Conn>,
    interactive: Interactive,
}

impl SshHandler {
    /// A handler for `conn`.
    pub fn new(conn: Arc<Conn>) -> Self {
        Self {
            conn,
            interactive: Interactive::Idle,
        }
    }

    fn methods() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(
                &[
                    MethodKind::PublicKey,
                    MethodKind::Password,
                    MethodKind::KeyboardInteractive,
                ][..],
            )),
            partial_success: false,
        }
    }

    /// Parses the user string once; a bad one ends the connection with a
    /// message that says what is wrong.
    async fn target(&self, user: &str) -> Option<UserString> {
        if let Some((raw, parsed)) = self.conn.target.get() {
            if raw == user {
                return Some(parsed.clone());
            }
            // OpenSSH never changes the user mid-connection; others may.
            self.conn
                .disconnect(
                    russh::Disconnect::IllegalUserName,
                    "k8shell: the user string changed during login".to_owned(),
                )
                .await;
            return None;
        }
        match UserString::parse(user) {
            Ok(parsed) => {
                let _ = self.conn.target.set((user.to_owned(), parsed.clone()));
                Some(parsed)
            }
            Err(error) => {
                self.conn
                    .auth_failed(user, "none", &format!("bad user string: {error}"))
                    .await;
                self.conn
                    .disconnect(
                        russh::Disconnect::IllegalUserName,
                        format!("k8shell: bad user string {user:?}: {error}"),
                    )
                    .await;
                None
            }
        }
    }

    async fn finish(
        &mut self,
        user: &str,
        method: &'static str,
        result: Result<Login, LoginFailure>,
    ) -> Auth {
        self.conn.auth_attempts.fetch_add(1, Ordering::SeqCst);
        match result {
            Ok(login) => {
                self.conn.token.set(login.token.clone(), login.expires_at);
                let _ = self.conn.login.set(login);
                Auth::Accept
            }
            Err(failure) => {
                self.conn
                    .auth_failed(user, method, &failure.to_string())
                    .await;
                Self::methods()
            }
        }
    }

    /// A public key or certificate login: `line` is its OpenSSH form (the
    /// client proved it holds the private key).
    async fn key_login(
        &mut self,
        user: &str,
        line: Result<String, String>,
        method: &'static str,
    ) -> Auth {
        let Some(target) = self.target(user).await else {
            return Auth::reject();
        };
        let result = match line {
            Ok(line) => {
                auth::public_key(
                    &self.conn.shared.backends,
                    &target.username,
                    line,
                    &self.source(),
                    method,
                )
                .await
            }
            Err(reason) => Err(LoginFailure::Refused(reason)),
        };
        self.finish(user, "publickey", result).await
    }

    /// A forward channel (`direct-tcpip`, `direct-streamlocal`) gets its
    /// own task, which decides and accepts or refuses it.
    async fn open_forward(
        &self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        destination: crate::channels::forward::Destination,
    ) {
        let Some(slot) = self.conn.channel_slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        };
        tokio::spawn(crate::channels::forward::run(
            Arc::clone(&self.conn),
            channel,
            reply,
            destination,
            slot,
        ));
    }

    fn source(&self) -> String {
        self.conn.client.ip().to_string()
    }
}

impl russh::server::Handler for SshHandler {
    type Error = HandlerError;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        let _ = self.target(user).await;
        Ok(Self::methods())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        let Some(target) = self.target(user).await else {
            return Ok(Auth::reject());
        };
        let result = auth::password(
            &self.conn.shared.backends,
            &target.username,
            password,
            &self.source(),
            "password",
        )
        .await;
        Ok(self.finish(user, "password", result).await)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let line = key
            .public_key
            .to_openssh()
            .map_err(|e| format!("unusable key: {e}"));
        Ok(self.key_login(user, line, "publickey").await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &ssh_key::Certificate,
    ) -> Result<Auth, Self::Error> {
        let line = certificate
            .to_openssh()
            .map_err(|e| format!("unusable certificate: {e}"));
        Ok(self.key_login(user, line, "certificate").await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(target) = self.target(user).await else {
            return Ok(Auth::reject());
        };
        let backends = self.conn.shared.backends.clone();
        let Some(mut response) = response else {
            // The start: a device login for unknown users who may onboard,
            // a password prompt for everyone else.
            let provider = self.conn.shared.config.onboarding_provider.clone();
            if !provider.is_empty()
                && matches!(
                    auth::user_exists(&backends, &target.username).await,
                    Ok(false)
                )
            {
                match auth::begin_device_login(&backends, &provider, &self.source()).await {
                    Ok(device) => {
                        let instructions = device.instructions.clone();
                        self.interactive = Interactive::Device(Box::new(device));
                        return Ok(Auth::Partial {
                            name: "k8shell login".into(),
                            instructions: instructions.into(),
                            prompts: vec![("Press Enter once you have logged in: ".into(), true)]
                                .into(),
                        });
                    }
                    Err(failure) => {
                        return Ok(self
                            .finish(user, "keyboard-interactive", Err(failure))
                            .await);
                    }
                }
            }
            self.interactive = Interactive::Password;
            return Ok(Auth::Partial {
                name: "".into(),
                instructions: "".into(),
                prompts: vec![("Password: ".into(), false)].into(),
            });
        };
        match std::mem::replace(&mut self.interactive, Interactive::Idle) {
            Interactive::Password => {
                let password = response
                    .next()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let result = auth::password(
                    &backends,
                    &target.username,
                    &password,
                    &self.source(),
                    "keyboard-interactive",
                )
                .await;
                Ok(self.finish(user, "keyboard-interactive", result).await)
            }
            Interactive::Device(device) => {
                let wait = self.conn.shared.config.auth_timeout;
                let result = device.finish(wait).await.and_then(|login| {
                    if login.username == target.username {
                        Ok(login)
                    } else {
                        Err(LoginFailure::Refused(format!(
                            "the provider's account is {}, not {}",
                            login.username, target.username
                        )))
                    }
                });
                Ok(self.finish(user, "keyboard-interactive", result).await)
            }
            Interactive::Idle => Ok(self
                .finish(
                    user,
                    "keyboard-interactive",
                    Err(LoginFailure::Refused("unexpected response".to_owned())),
                )
                .await),
        }
    }

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        let banner = &self.conn.shared.config.banner;
        Ok((!banner.is_empty()).then(|| format!("{}\n", banner.trim_end())))
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let conn = Arc::clone(&self.conn);
        let _ = conn
            .client_version
            .set(String::from_utf8_lossy(session.remote_sshid()).into_owned());
        let (Some(login), Some(target)) = (conn.login().cloned(), conn.target().cloned()) else {
            return Ok(());
        };
        conn.shared.metrics.logins.inc();
        let client_address = conn.client.ip().to_string();
        let admission = match target::admit(
            &conn.shared.backends,
            &login,
            &target,
            &conn.shared.config.default_blueprint,
            &client_address,
        )
        .await
        {
            Ok(admission) => admission,
            Err(message) => {
                tracing::info!(session = %conn.id, user = %login.username, %message, "session refused");
                session.disconnect(
                    russh::Disconnect::ByApplication,
                    &format!("k8shell: {message}"),
                    "",
                )?;
                return Ok(());
            }
        };
        if login.proven_key.is_none() {
            tokio::spawn(token::keep_renewed(
                conn.shared.backends.clone(),
                Arc::clone(&conn.token),
                conn.closed.clone(),
                client_address.clone(),
                conn.id.clone(),
            ));
        }
        let config = &conn.shared.config;
        let gate = target::start(
            conn.shared.backends.clone(),
            &target,
            admission.workspace_id.clone(),
            &config.default_blueprint,
            config.cold_start_timeout,
        );
        let record = admission
            .obligations
            .get("record")
            .cloned()
            .unwrap_or_else(|| "none".to_owned());
        let _ = conn.session.set(Admitted {
            owner: admission.owner,
            gate: gate.clone(),
            obligations: admission.obligations,
        });
        // `session.started` once the workspace is known to run.
        let started = Arc::clone(&conn);
        tokio::spawn(async move {
            let Ok(running) = gate.wait(|_| {}).await else {
                return;
            };
            let event = SessionStarted {
                session_id: started.id.clone(),
                username: login.username.clone(),
                workspace_id: running.id,
                transport: "ssh".to_owned(),
                client_address,
                client_version: started.client_version.get().cloned().unwrap_or_default(),
                auth_method: login.method.to_owned(),
                record,
            };
            tracing::info!(session = %started.id, user = %login.username, workspace = %event.workspace_id, "session started");
            started.shared.audit.publish(&started.id, &event).await;
        });
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.conn.channel_slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        reply.accept().await;
        let conn = Arc::clone(&self.conn);
        tokio::spawn(crate::channels::session::run(conn, channel, slot));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.open_forward(
            channel,
            reply,
            crate::channels::forward::Destination::Tcp {
                host: host_to_connect.to_owned(),
                port: port_to_connect,
            },
        )
        .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.open_forward(
            channel,
            reply,
            crate::channels::forward::Destination::Unix {
                path: socket_path.to_owned(),
            },
        )
        .await;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let decision = self
            .conn
            .decide("ssh:agent-forward", Default::default())
            .await;
        if !decision.allow {
            tracing::info!(session = %self.conn.id, reasons = ?decision.reasons, "agent forwarding refused");
            return Ok(false);
        }
        self.conn
            .agent_channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(channel);
        Ok(true)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let started = tokio::time::timeout(
            self.conn.shared.config.cold_start_timeout,
            crate::channels::remote::start(Arc::clone(&self.conn), address.to_owned(), *port),
        )
        .await
        .unwrap_or_else(|_| Err("the workspace did not start in time".to_owned()));
        match started {
            Ok(bound) => {
                *port = bound;
                Ok(true)
            }
            Err(reason) => {
                tracing::info!(session = %self.conn.id, %address, port = *port, %reason, "remote forward refused");
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(crate::channels::remote::cancel(&self.conn, address, port))
    }
}
