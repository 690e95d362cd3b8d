use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{Health, Shutdown};

/// The admin HTTP endpoint of a service: `/healthz` (the process serves),
/// `/readyz` (every component is ready; 503 with the reasons otherwise) and
/// `/metrics` (Prometheus text format).
pub struct AdminServer {
    listener: TcpListener,
    router: Router,
}

#[derive(Clone)]
struct AdminState {
    service: &'static str,
    health: Health,
    registry: Arc<Registry>,
}

impl AdminServer {
    /// Binds the listener now, so a busy port fails start-up rather than
    /// surfacing later.
    pub async fn bind(
        addr: SocketAddr,
        service: &'static str,
        health: Health,
        registry: Arc<Registry>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            router: router(AdminState {
                service,
                health,
                registry,
            }),
        })
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Adds routes of the service's own (used by services whose public HTTP
    /// port doubles as the admin port).
    pub fn merge(mut self, routes: Router) -> Self {
        self.router = self.router.merge(routes);
        self
    }

    /// Serves until shutdown is triggered.
    pub async fn serve(self, shutdown: Shutdown) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
    }
}

/// Binds and serves an admin server in one step; returns its address and task.
pub async fn serve_admin(
    addr: SocketAddr,
    service: &'static str,
    health: Health,
    registry: Arc<Registry>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let server = AdminServer::bind(addr, service, health, registry).await?;
    let local = server.local_addr()?;
    let task = tokio::spawn(async move { Ok(server.serve(shutdown).await?) });
    Ok((local, task))
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(state): State<AdminState>) -> Response {
    axum::Json(serde_json::json!({"service": state.service, "status": "ok"})).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let report = state.health.report(state.service);
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "failed to encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
