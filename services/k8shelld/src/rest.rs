//! The local REST API on a unix socket inside the workspace, for `kbox` and
//! scripts. Only the workspace user and root may talk to it: the peer's uid
//! comes from SO_PEERCRED, not from anything the client says.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::apps::Apps;
use crate::session::Sessions;
use crate::{ports, system};

/// The connecting process's uid.
#[derive(Clone, Debug)]
pub struct Peer {
    uid: Option<u32>,
}

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// What the local API serves from.
#[derive(Clone)]
pub(crate) struct RestState {
    pub(crate) account: crate::users::Account,
    pub(crate) apps: Apps,
    pub(crate) logs: k8shell_telemetry::LogBuffer,
    pub(crate) activity: crate::activity::Activity,
    pub(crate) sessions: Sessions,
    pub(crate) started: std::time::Instant,
    pub(crate) shutdown: k8shell_service::Shutdown,
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn from_status(status: tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem(code, status.message())
}

async fn only_workspace_user(
    State(state): State<Arc<RestState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    match peer.uid {
        Some(uid) if uid == 0 || uid == state.account.uid.as_raw() => next.run(request).await,
        other => {
            tracing::warn!(uid = ?other, path = %request.uri().path(), "refused a local API client");
            problem(
                StatusCode::FORBIDDEN,
                "only the workspace user and root may use this socket",
            )
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

async fn info(State(state): State<Arc<RestState>>) -> Response {
    let started = state.started;
    match tokio::task::spawn_blocking(move || system::info(started)).await {
        Ok(info) => json(&info),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read system information",
        ),
    }
}

async fn uptime(State(state): State<Arc<RestState>>) -> Response {
    let started = state.started;
    match tokio::task::spawn_blocking(move || system::info(started)).await {
        Ok(info) => json(&serde_json::json!({
            "system_uptime_seconds": info.system_uptime_seconds,
            "daemon_uptime_seconds": info.daemon_uptime_seconds,
            "load_average": info.load_average,
        })),
        Err(_) => problem(StatusCode::INTERNAL_SERVER_ERROR, "cannot read uptime"),
    }
}

async fn list_ports() -> Response {
    match tokio::task::spawn_blocking(ports::list).await {
        Ok(ports) => json(&ports),
        Err(_) => problem(StatusCode::INTERNAL_SERVER_ERROR, "cannot read /proc"),
    }
}

async fn list_apps(State(state): State<Arc<RestState>>) -> Response {
    json(&state.apps.list())
}

async fn app_action(
    State(state): State<Arc<RestState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> Response {
    let result = match action.as_str() {
        "start" => state.apps.start_app(&name),
        "stop" => state.apps.stop_app(&name),
        "install" => state.apps.install_app(&name, &state.account).await,
        other => {
            return problem(
                StatusCode::NOT_FOUND,
                format!("unknown app action {other:?}"),
            );
        }
    };
    match result {
        Ok(app) => json(&app),
        Err(status) => from_status(status),
    }
}

#[derive(Deserialize)]
struct Tail {
    tail: Option<usize>,
}

async fn app_logs(
    State(state): State<Arc<RestState>>,
    UrlPath(name): UrlPath<String>,
    Query(tail): Query<Tail>,
) -> Response {
    match state.apps.logs(&name, tail.tail.unwrap_or(64 * 1024)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response(),
        Err(status) => from_status(status),
    }
}

async fn list_sessions(State(state): State<Arc<RestState>>) -> Response {
    let sessions: Vec<serde_json::Value> = state
        .sessions
        .list()
        .iter()
        .map(|session| {
            let info = session.info();
            serde_json::json!({
                "id": info.id,
                "owner": info.owner,
                "argv": info.argv,
                "started_at": info.started_at.map(|t| t.seconds),
                "detached_since": info.detached_since.map(|t| t.seconds),
                "attached_clients": info.attached_clients,
            })
        })
        .collect();
    json(&sessions)
}

async fn detach_session(
    State(state): State<Arc<RestState>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match state.sessions.get(&id) {
        Some(session) => {
            json(&serde_json::json!({"detached_clients": session.detach_all("detached with kbox")}))
        }
        None => problem(StatusCode::NOT_FOUND, format!("no session {id}")),
    }
}

#[derive(Deserialize)]
struct AttachQuery {
    #[serde(default)]
    read_only: bool,
    rows: Option<u16>,
    cols: Option<u16>,
}

/// Upgrades to the attach protocol (see `attach`).
async fn attach_session(
    State(state): State<Arc<RestState>>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<AttachQuery>,
    mut request: Request,
) -> Response {
    let Some(session) = state.sessions.get(&id) else {
        return problem(StatusCode::NOT_FOUND, format!("no session {id}"));
    };
    let wants_attach = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(crate::attach::PROTOCOL));
    if !wants_attach {
        return problem(
            StatusCode::UPGRADE_REQUIRED,
            format!(
                "attach needs `Upgrade: {}` (use kbox attach)",
                crate::attach::PROTOCOL
            ),
        );
    }
    if let (Some(rows), Some(cols), false) = (query.rows, query.cols, query.read_only) {
        let size = k8shell_proto::k8shelld::v1::TerminalSize {
            rows: rows.into(),
            cols: cols.into(),
        };
        if let Err(status) = session.resize(&size).await {
            return from_status(status);
        }
    }
    let upgrade = hyper::upgrade::on(&mut request);
    let activity = state.activity.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let io = hyper_util::rt::TokioIo::new(upgraded);
                crate::attach::pump(session, query.read_only, io, activity).await;
            }
            Err(error) => tracing::info!(%error, "attach upgrade failed"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, crate::attach::PROTOCOL),
        ],
    )
        .into_response()
}

async fn request_shutdown(State(state): State<Arc<RestState>>) -> Response {
    tracing::info!("shutdown requested through the local API");
    state.shutdown.trigger();
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"status": "stopping"})),
    )
        .into_response()
}

async fn daemon_logs(State(state): State<Arc<RestState>>, Query(tail): Query<Tail>) -> Response {
    let (lines, _) = state.logs.tail(tail.tail.unwrap_or(200));
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "no such endpoint")
}

/// Serves the API on `path` until shutdown.
pub(crate) fn serve(path: &Path, state: RestState) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Reachable by everyone at the file level; the peer check decides.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let shutdown = state.shutdown.clone();
    let state = Arc::new(state);
    let router = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/uptime", get(uptime))
        .route("/v1/ports", get(list_ports))
        .route("/v1/apps", get(list_apps))
        .route("/v1/apps/{name}/logs", get(app_logs))
        .route("/v1/apps/{name}/{action}", post(app_action))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}/detach", post(detach_session))
        .route("/v1/sessions/{id}/attach", get(attach_session))
        .route("/v1/shutdown", post(request_shutdown))
        .route("/v1/logs", get(daemon_logs))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            only_workspace_user,
        ))
        .with_state(state);
    let socket = path.to_path_buf();
    Ok(tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<Peer>();
        let served = axum::serve(listener, service)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "local api failed");
        }
        let _ = std::fs::remove_file(socket);
    }))
}
