//! sshproxy: the SSH server that maps channels to k8shelld RPCs.
//!
//! So far the service serves its admin endpoint (`/healthz`, `/readyz`,
//! `/metrics`) so the platform can supervise it; its API arrives with its
//! own issue.

k8shell_service::admin_only_service!("sshproxy", 7505);
