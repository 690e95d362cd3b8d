//! apiserver: REST gateway, console assets, CloudShell WebSocket and the app reverse proxy.
//!
//! So far the service serves its admin endpoint (`/healthz`, `/readyz`,
//! `/metrics`) so the platform can supervise it; its API arrives with its
//! own issue.

k8shell_service::admin_only_service!("apiserver", 8080);
