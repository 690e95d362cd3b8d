//! Serving a service's gRPC API: one listener, the API's routes plus the
//! standard `grpc.health.v1` service (NOT_SERVING once shutdown begins), and
//! a graceful stop with the rest of the service.

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::Shutdown;

/// Serves `routes` on `listener` until `shutdown`; `service_name` is what
/// the health service reports on (the API's `NamedService::NAME`).
pub fn spawn_grpc_server(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    listener: TcpListener,
    routes: Routes,
    service_name: &'static str,
    shutdown: Shutdown,
) {
    tasks.spawn(async move {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(service_name, ServingStatus::Serving)
            .await;
        tonic::transport::Server::builder()
            .add_routes(routes.add_service(health_service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    shutdown.wait().await;
                    reporter
                        .set_service_status(service_name, ServingStatus::NotServing)
                        .await;
                },
            )
            .await
            .context("grpc server failed")
    });
}
