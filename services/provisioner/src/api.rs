//! The gRPC face of the provisioner.

use std::time::Duration;

use k8shell_bus::{EventStore, ExecuteError, execute};
use k8shell_events::AggregateId;
use k8shell_proto::provisioner::v1 as pb;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::id::{self, MAX_HEX, MIN_HEX};
use crate::read_model::{self, ListFilter};
use crate::workspace::{CreateDecision, State, Workspace, WorkspaceAggregate, decide_create};

/// Longest a `GetWorkspace` waits for `min_version` when the caller set no deadline.
const DEFAULT_READ_WAIT: Duration = Duration::from_secs(5);
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// Implements `k8shell.provisioner.v1.ProvisionerService`.
pub struct ProvisionerApi {
    pub(crate) store: EventStore,
    pub(crate) pool: PgPool,
}

fn internal(context: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> Status {
    move |error| {
        // The cause stays in our logs; the client gets a stable message.
        tracing::error!(error = %error, "{context}");
        Status::internal(context)
    }
}

fn to_proto_state(state: State) -> pb::WorkspaceState {
    match state {
        State::Requested => pb::WorkspaceState::Requested,
        State::Provisioning => pb::WorkspaceState::Provisioning,
        State::Running => pb::WorkspaceState::Running,
        State::Stopping => pb::WorkspaceState::Stopping,
        State::Stopped => pb::WorkspaceState::Stopped,
        State::Failed => pb::WorkspaceState::Failed,
        State::Deleted => pb::WorkspaceState::Deleted,
    }
}

fn from_proto_state(state: pb::WorkspaceState) -> Option<State> {
    match state {
        pb::WorkspaceState::Unspecified => None,
        pb::WorkspaceState::Requested => Some(State::Requested),
        pb::WorkspaceState::Provisioning => Some(State::Provisioning),
        pb::WorkspaceState::Running => Some(State::Running),
        pb::WorkspaceState::Stopping => Some(State::Stopping),
        pb::WorkspaceState::Stopped => Some(State::Stopped),
        pb::WorkspaceState::Failed => Some(State::Failed),
        pb::WorkspaceState::Deleted => Some(State::Deleted),
    }
}

fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

fn to_proto(workspace: &Workspace) -> pb::Workspace {
    pb::Workspace {
        id: workspace.id.clone(),
        username: workspace.username.clone(),
        blueprint: workspace.blueprint.clone(),
        state: to_proto_state(workspace.state) as i32,
        reason: workspace.reason.clone(),
        created_at: Some(timestamp(workspace.created_at)),
        updated_at: Some(timestamp(workspace.updated_at)),
        version: workspace.version,
    }
}

fn request_deadline<T>(request: &Request<T>) -> Duration {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(DEFAULT_READ_WAIT, |d| d.min(Duration::from_secs(60)))
}

/// Parses the `grpc-timeout` header (`<digits><unit>`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl pb::provisioner_service_server::ProvisionerService for ProvisionerApi {
    #[tracing::instrument(
        name = "provisioner.create_workspace",
        skip_all,
        fields(username, blueprint)
    )]
    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::CreateWorkspaceResponse>, Status> {
        let req = request.into_inner();
        tracing::Span::current().record("username", req.username.as_str());
        tracing::Span::current().record("blueprint", req.blueprint.as_str());
        id::validate_username(&req.username)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        id::validate_blueprint(&req.blueprint)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for hex_len in MIN_HEX..=MAX_HEX {
            let candidate = id::workspace_id(&req.username, &req.blueprint, hex_len);
            let aggregate_id =
                AggregateId::new(candidate).map_err(|e| internal("invalid workspace id")(&e))?;
            let executed =
                execute::<WorkspaceAggregate, _, _, _>(&self.store, &aggregate_id, |state| {
                    decide_create(state, &aggregate_id, &req.username, &req.blueprint)
                })
                .await;
            let executed = match executed {
                Ok(executed) => executed,
                Err(ExecuteError::Contended(..)) => {
                    return Err(Status::aborted(
                        "workspace is being changed concurrently; retry",
                    ));
                }
                Err(ExecuteError::Append(k8shell_bus::AppendError::Unavailable { .. }))
                | Err(ExecuteError::Load(_)) => {
                    return Err(Status::unavailable("event bus unavailable; retry"));
                }
                Err(error) => return Err(internal("cannot record workspace request")(&error)),
            };
            let created = match executed.outcome {
                CreateDecision::Collision => continue,
                CreateDecision::Create => true,
                CreateDecision::Exists => false,
            };
            let Some(workspace) = executed.state.0 else {
                return Err(Status::internal("workspace missing after create"));
            };
            if created {
                tracing::info!(workspace = %workspace.id, "workspace requested");
            }
            return Ok(Response::new(pb::CreateWorkspaceResponse {
                workspace: Some(to_proto(&workspace)),
                created,
            }));
        }
        Err(Status::resource_exhausted(
            "no free workspace id for this user and spec",
        ))
    }

    #[tracing::instrument(name = "provisioner.get_workspace", skip_all, fields(id))]
    async fn get_workspace(
        &self,
        request: Request<pb::GetWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let wait = request_deadline(&request);
        let req = request.into_inner();
        tracing::Span::current().record("id", req.id.as_str());
        if AggregateId::new(req.id.clone()).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid workspace id {:?}",
                req.id
            )));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = read_model::get(&self.pool, &req.id)
                .await
                .map_err(|e| internal("cannot read workspaces")(&e))?;
            let fresh_enough = found.as_ref().is_some_and(|w| w.version >= req.min_version);
            if fresh_enough || (req.min_version == 0) {
                return match found {
                    Some(workspace) => Ok(Response::new(to_proto(&workspace))),
                    None => Err(Status::not_found(format!("workspace {} not found", req.id))),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "the read model has not yet applied version {} of workspace {}",
                    req.min_version, req.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tracing::instrument(name = "provisioner.list_workspaces", skip_all)]
    async fn list_workspaces(
        &self,
        request: Request<pb::ListWorkspacesRequest>,
    ) -> Result<Response<pb::ListWorkspacesResponse>, Status> {
        let req = request.into_inner();
        let state = pb::WorkspaceState::try_from(req.state)
            .map_err(|_| Status::invalid_argument(format!("unknown state {}", req.state)))?;
        let before_seq = if req.page_token.is_empty() {
            None
        } else {
            Some(
                req.page_token
                    .parse::<i64>()
                    .map_err(|_| Status::invalid_argument("invalid page_token"))?,
            )
        };
        let page = match req.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let filter = ListFilter {
            username: req.username,
            blueprint: req.blueprint,
            state: from_proto_state(state),
            before_seq,
            limit: i64::from(page) + 1,
        };
        let mut rows = read_model::list(&self.pool, &filter)
            .await
            .map_err(|e| internal("cannot read workspaces")(&e))?;
        let next_page_token = if rows.len() > page as usize {
            rows.truncate(page as usize);
            rows.last()
                .map(|(_, seq)| seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: rows.iter().map(|(w, _)| to_proto(w)).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
