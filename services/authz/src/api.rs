//! The gRPC face of authz.

use std::sync::Arc;
use std::time::Instant;

use k8shell_proto::authz::v1 as pb;
use tonic::{Request, Response, Status};

use crate::decision_log::{DecisionLog, Entry};

/// Largest request authz evaluates (the encoded input, bytes).
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Most decisions in one BatchEvaluate.
pub const MAX_BATCH: usize = 256;

/// Implements `k8shell.authz.v1.AuthzService`.
pub struct AuthzApi {
    pub(crate) decider: Arc<crate::engine::Decider>,
    pub(crate) wasm_policy: std::path::PathBuf,
    pub(crate) log: DecisionLog,
}

/// `<domain>:<verb>[:<more>]` with `[a-z0-9_-]` parts.
fn valid_action(action: &str) -> bool {
    let mut parts = action.split(':');
    let domain = parts.next().unwrap_or("");
    let verb = parts.next();
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    part_ok(domain) && verb.is_some_and(part_ok) && parts.all(part_ok)
}

fn input(request: &pb::EvaluateRequest) -> Result<serde_json::Value, Status> {
    if !valid_action(&request.action) {
        return Err(Status::invalid_argument(format!(
            "invalid action {:?}: use <domain>:<verb>, e.g. ssh:shell",
            request.action
        )));
    }
    let subject = request.subject.clone().unwrap_or_default();
    let resource = request.resource.clone().unwrap_or_default();
    let value = serde_json::json!({
        "subject": {
            "sub": subject.sub,
            "roles": subject.roles,
            "scopes": subject.scopes,
            "kind": subject.kind,
            "amr": subject.amr,
        },
        "action": request.action,
        "resource": {
            "type": resource.r#type,
            "id": resource.id,
            "attributes": resource.attributes,
        },
        "context": request.context,
    });
    let size = value.to_string().len();
    if size > MAX_INPUT_BYTES {
        return Err(Status::invalid_argument(format!(
            "the request is {size} bytes; the limit is {MAX_INPUT_BYTES}"
        )));
    }
    Ok(value)
}

impl AuthzApi {
    async fn decide(&self, request: &pb::EvaluateRequest) -> Result<pb::Decision, Status> {
        let input = input(request)?;
        let started = Instant::now();
        let outcome = match self.decider.decide(&input).await {
            Ok(outcome) => outcome,
            Err(error) => {
                // A failing policy denies; the reason says why.
                tracing::error!(action = %request.action, %error, "policy evaluation failed; denying");
                crate::policy::Outcome {
                    allow: false,
                    reasons: vec![format!("policy error: {error}")],
                    obligations: Default::default(),
                }
            }
        };
        let duration_us = started.elapsed().as_micros() as u64;
        if !request.capability_check {
            let subject = request.subject.clone().unwrap_or_default();
            let resource = request.resource.clone().unwrap_or_default();
            self.log.record(Entry {
                subject: subject.sub,
                roles: subject.roles,
                scopes: subject.scopes,
                action: request.action.clone(),
                resource_type: resource.r#type,
                resource_id: resource.id,
                allow: outcome.allow,
                reasons: outcome.reasons.clone(),
                obligations: outcome.obligations.clone(),
                at: time::OffsetDateTime::now_utc(),
            });
        }
        Ok(pb::Decision {
            allow: outcome.allow,
            reasons: outcome.reasons,
            obligations: outcome.obligations.into_iter().collect(),
            duration_us,
        })
    }
}

#[tonic::async_trait]
impl pb::authz_service_server::AuthzService for AuthzApi {
    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::Decision>, Status> {
        Ok(Response::new(self.decide(request.get_ref()).await?))
    }

    async fn batch_evaluate(
        &self,
        request: Request<pb::BatchEvaluateRequest>,
    ) -> Result<Response<pb::BatchEvaluateResponse>, Status> {
        let requests = &request.get_ref().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} requests; at most {MAX_BATCH} per batch",
                requests.len()
            )));
        }
        let mut decisions = Vec::with_capacity(requests.len());
        for request in requests {
            decisions.push(self.decide(request).await?);
        }
        Ok(Response::new(pb::BatchEvaluateResponse { decisions }))
    }

    async fn policy_status(
        &self,
        _request: Request<pb::PolicyStatusRequest>,
    ) -> Result<Response<pb::PolicyStatusResponse>, Status> {
        Ok(Response::new(pb::PolicyStatusResponse {
            files: self.decider.sources(&self.wasm_policy),
            errors: self.decider.errors(),
            engine: self.decider.name().to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_checked() {
        for ok in [
            "ssh:shell",
            "workspace:read",
            "user:read:profile",
            "ssh:direct-tcpip",
        ] {
            assert!(valid_action(ok), "{ok}");
        }
        for bad in [
            "",
            "ssh",
            "ssh:",
            ":shell",
            "SSH:shell",
            "ssh:she ll",
            "a:b:",
        ] {
            assert!(!valid_action(bad), "{bad}");
        }
    }
}
