//! The gRPC face of the provisioner.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8shell_addressing::UserString;
use k8shell_events::workspace::WorkspaceEvent;
use k8shell_events::{AggregateId, DomainEvent};
use k8shell_proto::provisioner::v1 as pb;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::controller::{ControlError, Controller};
use crate::read_model::{self, ListFilter};
use crate::workspace::{State, Workspace, WorkspaceAggregate};

/// Longest a `GetWorkspace` waits for `min_version` when the caller set no deadline.
const DEFAULT_READ_WAIT: Duration = Duration::from_secs(5);
/// Longest an `EnsureRunning` waits when the caller set no deadline.
const DEFAULT_ENSURE_WAIT: Duration = Duration::from_secs(180);
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// Implements `k8shell.provisioner.v1.ProvisionerService`.
pub struct ProvisionerApi {
    pub(crate) controller: Controller,
    pub(crate) pool: PgPool,
}

fn internal(context: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> Status {
    move |error| {
        // The cause stays in our logs; the client gets a stable message.
        tracing::error!(error = %error, "{context}");
        Status::internal(context)
    }
}

fn status(error: ControlError) -> Status {
    match error {
        ControlError::Invalid(m) => Status::invalid_argument(m),
        ControlError::NotFound(m) => Status::not_found(m),
        ControlError::WrongState(m) => Status::failed_precondition(m),
        ControlError::Contended => Status::aborted(error.to_string()),
        ControlError::Unavailable => Status::unavailable(error.to_string()),
        ControlError::Failed(m) => Status::unavailable(m),
        ControlError::Internal(m) => Status::internal(m),
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::WorkspaceProgress, Status>> + Send>>;

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
        endpoint: workspace.endpoint.clone(),
        stage: workspace.stage.clone(),
        progress_percent: u32::from(workspace.progress),
        splash: workspace.splash.clone(),
    }
}

fn request_deadline<T>(request: &Request<T>, default: Duration, max: Duration) -> Duration {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(default, |d| d.min(max))
}

/// The (username, blueprint) a create names, directly or as a user string.
fn create_target(
    username: &str,
    blueprint: &str,
    user_string: &str,
) -> Result<(String, String), Status> {
    if user_string.is_empty() {
        // Names are checked by the controller, which says which is wrong.
        return Ok((username.to_owned(), blueprint.to_owned()));
    }
    if !username.is_empty() || !blueprint.is_empty() {
        return Err(Status::invalid_argument(
            "give either username and blueprint, or a user string, not both",
        ));
    }
    let parsed =
        UserString::parse(user_string).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let blueprint = parsed.blueprint.ok_or_else(|| {
        Status::invalid_argument(format!(
            "user string {user_string:?} names no blueprint (use alice~dev or alice~bp=dev)"
        ))
    })?;
    Ok((parsed.username, blueprint))
}

fn event_name(event: &WorkspaceEvent) -> (&'static str, String) {
    match event {
        WorkspaceEvent::Requested(_) => ("requested", String::new()),
        WorkspaceEvent::Provisioning(e) => ("provisioning", e.detail.clone()),
        WorkspaceEvent::Running(e) => ("running", e.endpoint.clone()),
        WorkspaceEvent::Stopping(e) => ("stopping", e.reason.clone()),
        WorkspaceEvent::Stopped(e) => ("stopped", e.reason.clone()),
        WorkspaceEvent::Failed(e) => ("failed", e.reason.clone()),
        WorkspaceEvent::Deleted(_) => ("deleted", String::new()),
        WorkspaceEvent::StopScheduled(e) => ("stop_scheduled", format!("stop at {}", e.at)),
        WorkspaceEvent::IdleWarning(e) => (
            "idle_warning",
            format!(
                "idle for {}s; stopping in {}s",
                e.idle_seconds, e.stop_in_seconds
            ),
        ),
    }
}

fn settled(state: State) -> bool {
    matches!(
        state,
        State::Running | State::Stopped | State::Failed | State::Deleted
    )
}

/// Progress of one workspace from its current state on: a snapshot, then
/// one message per event, folded through the aggregate so each message
/// carries the whole workspace.
async fn progress_stream(
    controller: &Controller,
    id: &str,
    until: impl Fn(&Workspace) -> bool + Send + 'static,
) -> Result<ProgressStream, Status> {
    let aggregate = AggregateId::new(id.to_owned())
        .map_err(|_| Status::invalid_argument(format!("invalid workspace id {id:?}")))?;
    let loaded = controller
        .store()
        .load(k8shell_events::Context::Workspace, &aggregate)
        .await
        .map_err(|_| Status::unavailable("event bus unavailable; retry"))?;
    let mut state = WorkspaceAggregate::default();
    for event in &loaded.events {
        k8shell_bus::Aggregate::apply(&mut state, event);
    }
    let Some(snapshot) = state.0.clone().filter(|w| w.state != State::Deleted) else {
        return Err(Status::not_found(format!("workspace {id} not found")));
    };
    let events = controller
        .store()
        .watch(
            k8shell_events::Context::Workspace,
            &aggregate,
            loaded.version,
        )
        .await
        .map_err(|_| Status::unavailable("event bus unavailable; retry"))?;
    let first = pb::WorkspaceProgress {
        workspace: Some(to_proto(&snapshot)),
        event: "snapshot".to_owned(),
        detail: snapshot.reason.clone(),
    };
    let done_at_start = until(&snapshot);
    let stream = async_stream_progress(state, events, until);
    let head = futures::stream::once(async move { Ok(first) });
    if done_at_start {
        return Ok(Box::pin(head));
    }
    Ok(Box::pin(head.chain(stream)))
}

fn async_stream_progress(
    state: WorkspaceAggregate,
    events: impl Stream<Item = Result<k8shell_bus::StoredEvent, k8shell_bus::LoadError>>
    + Send
    + 'static,
    until: impl Fn(&Workspace) -> bool + Send + 'static,
) -> impl Stream<Item = Result<pb::WorkspaceProgress, Status>> + Send {
    futures::stream::unfold(
        (state, Box::pin(events), until, false),
        |(mut state, mut events, until, done)| async move {
            if done {
                return None;
            }
            loop {
                let stored = match events.next().await? {
                    Ok(stored) => stored,
                    Err(_) => {
                        let error = Status::unavailable("event bus unavailable; retry");
                        return Some((Err(error), (state, events, until, true)));
                    }
                };
                let Ok(DomainEvent::Workspace(event)) = DomainEvent::decode(&stored.envelope)
                else {
                    continue;
                };
                k8shell_bus::Aggregate::apply(&mut state, &stored);
                let Some(workspace) = state.0.clone() else {
                    continue;
                };
                let (name, detail) = event_name(&event);
                let finished = until(&workspace);
                let message = pb::WorkspaceProgress {
                    workspace: Some(to_proto(&workspace)),
                    event: name.to_owned(),
                    detail,
                };
                return Some((Ok(message), (state, events, until, finished)));
            }
        },
    )
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
        let (username, blueprint) = create_target(&req.username, &req.blueprint, &req.user_string)?;
        tracing::Span::current().record("username", username.as_str());
        tracing::Span::current().record("blueprint", blueprint.as_str());
        let metadata: BTreeMap<String, String> = req.metadata.into_iter().collect();
        let (workspace, created) = self
            .controller
            .create(&username, &blueprint, &metadata)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateWorkspaceResponse {
            workspace: Some(to_proto(&workspace)),
            created,
        }))
    }

    #[tracing::instrument(name = "provisioner.get_workspace", skip_all, fields(id))]
    async fn get_workspace(
        &self,
        request: Request<pb::GetWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let wait = request_deadline(&request, DEFAULT_READ_WAIT, Duration::from_secs(60));
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

    type WatchWorkspaceStream = ProgressStream;
    type EnsureRunningStream = ProgressStream;

    #[tracing::instrument(name = "provisioner.start_workspace", skip_all, fields(id = %request.get_ref().id))]
    async fn start_workspace(
        &self,
        request: Request<pb::StartWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let workspace = self
            .controller
            .start(&request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(to_proto(&workspace)))
    }

    #[tracing::instrument(name = "provisioner.stop_workspace", skip_all, fields(id = %request.get_ref().id))]
    async fn stop_workspace(
        &self,
        request: Request<pb::StopWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let req = request.into_inner();
        let reason = if req.reason.is_empty() {
            "user".to_owned()
        } else {
            req.reason
        };
        let workspace = self
            .controller
            .stop(
                &req.id,
                &reason,
                Duration::from_secs(u64::from(req.delay_seconds)),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(to_proto(&workspace)))
    }

    #[tracing::instrument(name = "provisioner.delete_workspace", skip_all, fields(id = %request.get_ref().id))]
    async fn delete_workspace(
        &self,
        request: Request<pb::DeleteWorkspaceRequest>,
    ) -> Result<Response<pb::Workspace>, Status> {
        let req = request.into_inner();
        let workspace = self
            .controller
            .delete(&req.id, req.keep_volumes)
            .await
            .map_err(status)?;
        Ok(Response::new(to_proto(&workspace)))
    }

    #[tracing::instrument(name = "provisioner.watch_workspace", skip_all, fields(id = %request.get_ref().id))]
    async fn watch_workspace(
        &self,
        request: Request<pb::WatchWorkspaceRequest>,
    ) -> Result<Response<Self::WatchWorkspaceStream>, Status> {
        let req = request.into_inner();
        let until_settled = req.until_settled;
        let stream = progress_stream(&self.controller, &req.id, move |w| {
            until_settled && settled(w.state)
        })
        .await?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(name = "provisioner.ensure_running", skip_all)]
    async fn ensure_running(
        &self,
        request: Request<pb::EnsureRunningRequest>,
    ) -> Result<Response<Self::EnsureRunningStream>, Status> {
        let wait = request_deadline(&request, DEFAULT_ENSURE_WAIT, Duration::from_secs(600));
        let req = request.into_inner();
        let id = if req.id.is_empty() {
            let (username, blueprint) =
                create_target(&req.username, &req.blueprint, &req.user_string)?;
            let metadata: BTreeMap<String, String> = req.metadata.into_iter().collect();
            let (workspace, _) = self
                .controller
                .create(&username, &blueprint, &metadata)
                .await
                .map_err(status)?;
            workspace.id
        } else {
            req.id
        };
        // Subscribe before starting, so no event between the two is missed.
        let stream = progress_stream(&self.controller, &id, |w| w.state == State::Running).await?;
        let current = self.controller.load(&id).await.map_err(status)?;
        if current.is_some_and(|w| w.state != State::Running) {
            self.controller.start(&id).await.map_err(status)?;
        }
        // End with the running workspace, or an error that says why not.
        let deadline = tokio::time::Instant::now() + wait;
        let stream =
            futures::stream::unfold((stream, false), move |(mut stream, done)| async move {
                if done {
                    return None;
                }
                let next = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => {
                        let error = Status::deadline_exceeded(format!(
                            "the workspace did not start within {wait:?}"
                        ));
                        return Some((Err(error), (stream, true)));
                    }
                    Ok(None) => return None,
                    Ok(Some(next)) => next,
                };
                let message = match next {
                    Ok(message) => message,
                    Err(error) => return Some((Err(error), (stream, true))),
                };
                let state = message
                    .workspace
                    .as_ref()
                    .map(|w| w.state())
                    .unwrap_or_default();
                match state {
                    pb::WorkspaceState::Running => Some((Ok(message), (stream, true))),
                    pb::WorkspaceState::Failed
                    | pb::WorkspaceState::Stopped
                    | pb::WorkspaceState::Deleted
                        if message.event != "snapshot" =>
                    {
                        let reason = message
                            .workspace
                            .as_ref()
                            .map(|w| w.reason.clone())
                            .unwrap_or_default();
                        let error = Status::unavailable(format!(
                            "the workspace is {}: {reason}",
                            state
                                .as_str_name()
                                .trim_start_matches("WORKSPACE_STATE_")
                                .to_lowercase()
                        ));
                        Some((Err(error), (stream, true)))
                    }
                    _ => Some((Ok(message), (stream, false))),
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_blueprints(
        &self,
        request: Request<pb::ListBlueprintsRequest>,
    ) -> Result<Response<pb::ListBlueprintsResponse>, Status> {
        let include_templates = request.get_ref().include_templates;
        let catalog = self.controller.catalog();
        let set = catalog.current();
        let blueprints = set
            .iter()
            .filter(|b| include_templates || !b.blueprint.is_template)
            .map(|loaded| pb::Blueprint {
                name: loaded.blueprint.name.clone(),
                description: loaded.blueprint.description.clone(),
                is_template: loaded.blueprint.is_template,
                file: loaded.file.display().to_string(),
                image: match &loaded.blueprint.image {
                    Some(crate::blueprint::Expr::Literal(image)) => image.clone(),
                    Some(crate::blueprint::Expr::Cel(cel)) => format!("!cel {:?}", cel.source()),
                    None => String::new(),
                },
                recording: loaded
                    .blueprint
                    .recording
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListBlueprintsResponse {
            blueprints,
            errors: catalog.errors().iter().map(ToString::to_string).collect(),
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
