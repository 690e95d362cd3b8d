//! Authz: Rego policies, their evaluation, the decision log and the SSH Shield.
//!
//! So far the service serves its admin endpoint (`/healthz`, `/readyz`,
//! `/metrics`) so the platform can supervise it; its API arrives with its
//! own issue.

k8shell_service::admin_only_service!("authz", 7502);
