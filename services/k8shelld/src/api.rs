//! The gRPC service: auth is checked by the interceptor before any of this.

use k8shell_proto::k8shelld::v1::{self as pb, k8shelld_server::K8shelld};
use tonic::{Request, Response, Status, Streaming};

use crate::activity::Activity;
use crate::auth::Caller;
use crate::session::{Sessions, timestamp};
use crate::{exec, forward, ports, shell, system, unix};

pub struct Api {
    pub(crate) sessions: Sessions,
    pub(crate) activity: Activity,
    pub(crate) default_user: String,
    pub(crate) children: crate::pid1::Children,
    pub(crate) started: std::time::Instant,
    pub(crate) pending_connections: unix::Pending,
    pub(crate) init_state: std::sync::Arc<crate::bootstrap::InitState>,
    pub(crate) init_scripts: Vec<crate::bootstrap::InitScript>,
    pub(crate) apps: crate::apps::Apps,
    pub(crate) account: crate::users::Account,
    pub(crate) sftp_server: std::path::PathBuf,
    pub(crate) logs: k8shell_telemetry::LogBuffer,
    pub(crate) verifier: crate::auth::TokenVerifier,
    /// Where updated keys are kept across restarts.
    pub(crate) jwks_file: std::path::PathBuf,
}

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))
}

#[tonic::async_trait]
impl K8shelld for Api {
    type ShellStream = shell::ShellStream;
    type ExecStream = exec::ExecStream;
    type PortForwardStream = forward::ForwardStream;
    type LogsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::LogLine, Status>>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        caller(&request)?;
        let request = request.into_inner();
        let count = match request.tail_lines {
            0 => 200,
            n => n as usize,
        };
        let (tail, mut live) = self.logs.tail(count);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for line in tail {
                if tx.send(Ok(pb::LogLine { line })).await.is_err() {
                    return;
                }
            }
            if !request.follow {
                return;
            }
            loop {
                let line = tokio::select! {
                    _ = tx.closed() => return,
                    line = live.recv() => line,
                };
                match line {
                    Ok(line) => {
                        if tx.send(Ok(pb::LogLine { line })).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let line = format!("[{missed} log lines skipped: the reader was too slow]");
                        if tx.send(Ok(pb::LogLine { line })).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type SftpStream = crate::sftp::SftpStream;

    async fn sftp(
        &self,
        request: Request<Streaming<pb::SftpRequest>>,
    ) -> Result<Response<Self::SftpStream>, Status> {
        caller(&request)?;
        let stream =
            crate::sftp::sftp(request.into_inner(), &self.default_user, &self.sftp_server).await?;
        Ok(Response::new(stream))
    }

    type UnixSocketDialStream = unix::DataStream;

    type UnixSocketListenStream = unix::AcceptedStream;
    type UnixSocketAcceptStream = unix::DataStream;

    async fn unix_socket_dial(
        &self,
        request: Request<Streaming<pb::UnixSocketDialRequest>>,
    ) -> Result<Response<Self::UnixSocketDialStream>, Status> {
        caller(&request)?;
        Ok(Response::new(unix::dial(request.into_inner()).await?))
    }

    async fn unix_socket_listen(
        &self,
        request: Request<pb::UnixSocketListenRequest>,
    ) -> Result<Response<Self::UnixSocketListenStream>, Status> {
        caller(&request)?;
        let stream = unix::listen(
            request.into_inner(),
            &self.default_user,
            self.pending_connections.clone(),
        )?;
        Ok(Response::new(stream))
    }

    async fn unix_socket_accept(
        &self,
        request: Request<Streaming<pb::UnixSocketAcceptRequest>>,
    ) -> Result<Response<Self::UnixSocketAcceptStream>, Status> {
        caller(&request)?;
        let stream = unix::accept(request.into_inner(), self.pending_connections.clone()).await?;
        Ok(Response::new(stream))
    }

    type TcpListenStream = unix::TcpAcceptedStream;

    async fn tcp_listen(
        &self,
        request: Request<pb::TcpListenRequest>,
    ) -> Result<Response<Self::TcpListenStream>, Status> {
        caller(&request)?;
        let stream =
            unix::tcp_listen(request.into_inner(), self.pending_connections.clone()).await?;
        Ok(Response::new(stream))
    }

    type WatchPortsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::PortsChange, Status>>;

    async fn list_ports(
        &self,
        request: Request<pb::ListPortsRequest>,
    ) -> Result<Response<pb::ListPortsResponse>, Status> {
        caller(&request)?;
        let ports = tokio::task::spawn_blocking(ports::list)
            .await
            .map_err(|_| Status::internal("cannot read /proc"))?;
        Ok(Response::new(pb::ListPortsResponse { ports }))
    }

    async fn watch_ports(
        &self,
        request: Request<pb::WatchPortsRequest>,
    ) -> Result<Response<Self::WatchPortsStream>, Status> {
        caller(&request)?;
        let interval = match request.into_inner().interval_ms {
            0 => std::time::Duration::from_secs(1),
            ms => std::time::Duration::from_millis(u64::from(ms.max(100))),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut previous = Vec::new();
            let mut first = true;
            loop {
                let Ok(current) = tokio::task::spawn_blocking(ports::list).await else {
                    return;
                };
                let change = ports::diff(&previous, &current);
                if first || !change.opened.is_empty() || !change.closed.is_empty() {
                    first = false;
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
                previous = current;
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_system_info(
        &self,
        request: Request<pb::GetSystemInfoRequest>,
    ) -> Result<Response<pb::SystemInfo>, Status> {
        caller(&request)?;
        let started = self.started;
        let info = tokio::task::spawn_blocking(move || system::info(started))
            .await
            .map_err(|_| Status::internal("cannot read system information"))?;
        Ok(Response::new(info))
    }

    async fn port_forward(
        &self,
        request: Request<Streaming<pb::PortForwardRequest>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        caller(&request)?;
        Ok(Response::new(forward::forward(request.into_inner()).await?))
    }

    async fn shell(
        &self,
        request: Request<Streaming<pb::ShellRequest>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        let caller = caller(&request)?;
        let stream = shell::shell(
            request.into_inner(),
            caller,
            self.sessions.clone(),
            self.activity.clone(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        caller(&request)?;
        let stream = exec::exec(
            request.into_inner(),
            &self.default_user,
            self.activity.clone(),
            self.children.clone(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        caller(&request)?;
        let mut sessions: Vec<pb::SessionInfo> =
            self.sessions.list().iter().map(|s| s.info()).collect();
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn detach_session(
        &self,
        request: Request<pb::DetachSessionRequest>,
    ) -> Result<Response<pb::DetachSessionResponse>, Status> {
        let caller = caller(&request)?;
        let id = request.into_inner().session_id;
        let session = self
            .sessions
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no session {id}")))?;
        if session.owner != caller.subject {
            return Err(Status::permission_denied(
                "the session belongs to another user",
            ));
        }
        let detached_clients = session.detach_all("detached on request");
        Ok(Response::new(pb::DetachSessionResponse {
            detached_clients,
        }))
    }

    async fn list_apps(
        &self,
        request: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        caller(&request)?;
        Ok(Response::new(pb::ListAppsResponse {
            apps: self.apps.list(),
        }))
    }

    async fn start_app(
        &self,
        request: Request<pb::AppRequest>,
    ) -> Result<Response<pb::App>, Status> {
        caller(&request)?;
        Ok(Response::new(
            self.apps.start_app(&request.into_inner().name)?,
        ))
    }

    async fn stop_app(
        &self,
        request: Request<pb::AppRequest>,
    ) -> Result<Response<pb::App>, Status> {
        caller(&request)?;
        Ok(Response::new(
            self.apps.stop_app(&request.into_inner().name)?,
        ))
    }

    async fn install_app(
        &self,
        request: Request<pb::AppRequest>,
    ) -> Result<Response<pb::App>, Status> {
        caller(&request)?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.apps.install_app(&name, &self.account).await?,
        ))
    }

    async fn app_logs(
        &self,
        request: Request<pb::AppLogsRequest>,
    ) -> Result<Response<pb::AppLogsResponse>, Status> {
        caller(&request)?;
        let request = request.into_inner();
        let tail = match request.tail_bytes {
            0 => 64 * 1024,
            n => n as usize,
        };
        Ok(Response::new(pb::AppLogsResponse {
            data: self.apps.logs(&request.name, tail)?,
        }))
    }

    async fn list_init_scripts(
        &self,
        request: Request<pb::ListInitScriptsRequest>,
    ) -> Result<Response<pb::ListInitScriptsResponse>, Status> {
        use crate::bootstrap::ScriptRecord;
        caller(&request)?;
        let records = self.init_state.records();
        let scripts = self
            .init_scripts
            .iter()
            .map(|script| {
                let log = std::fs::read_to_string(self.init_state.log_path(&script.name))
                    .unwrap_or_default();
                let log_tail: String = log
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let (state, exit_code, detail) = match records.get(&script.name) {
                    None => ("pending", None, String::new()),
                    Some(ScriptRecord::Running { .. }) => ("running", None, String::new()),
                    Some(ScriptRecord::Succeeded { .. }) => ("succeeded", Some(0), String::new()),
                    Some(ScriptRecord::Failed {
                        exit_code, detail, ..
                    }) => ("failed", *exit_code, detail.clone()),
                };
                pb::InitScriptStatus {
                    name: script.name.clone(),
                    state: state.to_owned(),
                    exit_code,
                    detail,
                    log_tail,
                }
            })
            .collect();
        Ok(Response::new(pb::ListInitScriptsResponse { scripts }))
    }

    async fn get_activity(
        &self,
        request: Request<pb::GetActivityRequest>,
    ) -> Result<Response<pb::Activity>, Status> {
        caller(&request)?;
        let sessions = self.sessions.list();
        Ok(Response::new(pb::Activity {
            last_input_at: self.activity.last_input().map(timestamp),
            open_sessions: sessions.len() as u32,
            attached_clients: sessions.iter().map(|s| s.info().attached_clients).sum(),
        }))
    }

    async fn update_jwks(
        &self,
        request: Request<pb::UpdateJwksRequest>,
    ) -> Result<Response<pb::UpdateJwksResponse>, Status> {
        let caller = caller(&request)?;
        // A user holding a token for this workspace must not be able to
        // make it trust keys of their own.
        if !caller.subject.starts_with("system:") {
            return Err(Status::permission_denied(
                "only platform services may replace the trusted keys",
            ));
        }
        let jwks = &request.get_ref().jwks;
        let kids = self
            .verifier
            .replace(jwks)
            .map_err(|e| Status::invalid_argument(format!("invalid jwks: {e}")))?;
        if let Some(dir) = self.jwks_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(error) = std::fs::write(&self.jwks_file, jwks) {
            tracing::warn!(%error, path = %self.jwks_file.display(), "cannot keep the updated keys");
        }
        tracing::info!(by = %caller.subject, ?kids, "trusted keys updated");
        Ok(Response::new(pb::UpdateJwksResponse { kids }))
    }
}
