//! The workspace aggregate: its state folded from events, and the decisions
//! the provisioner takes on it. Every decision is pure (state in, events
//! out), so concurrent commands resolve through optimistic concurrency:
//! the loser reloads, decides again on the winner's state, and usually
//! finds nothing left to do.

use std::collections::BTreeMap;

use k8shell_bus::{Aggregate, StoredEvent};
use k8shell_events::workspace::{
    WorkspaceDeleted, WorkspaceEvent, WorkspaceFailed, WorkspaceIdleWarning, WorkspaceProvisioning,
    WorkspaceRequested, WorkspaceRunning, WorkspaceStopped, WorkspaceStopping,
};
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent, EnvelopeError, EventData};

/// Lifecycle states, as stored in the projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Requested,
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Failed,
    Deleted,
}

impl State {
    /// Name used in the projection and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Requested => "requested",
            State::Provisioning => "provisioning",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Deleted => "deleted",
        }
    }

    /// Parses a projection value.
    pub fn parse(value: &str) -> Option<Self> {
        [
            State::Requested,
            State::Provisioning,
            State::Running,
            State::Stopping,
            State::Stopped,
            State::Failed,
            State::Deleted,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }
}

/// What one event changes on a workspace row; `None` keeps the old value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub state: Option<State>,
    pub reason: Option<String>,
    pub endpoint: Option<String>,
    /// Follows the endpoint: set while running, cleared otherwise.
    pub splash: Option<String>,
    pub stage: Option<String>,
    pub progress: Option<u8>,
}

impl Change {
    /// The change an event (other than `requested`) makes.
    pub fn of(event: &WorkspaceEvent) -> Change {
        let cleared = || Some(String::new());
        match event {
            WorkspaceEvent::Requested(_) => Change {
                state: Some(State::Requested),
                reason: cleared(),
                endpoint: cleared(),
                splash: cleared(),
                stage: cleared(),
                progress: Some(0),
            },
            WorkspaceEvent::Provisioning(e) => Change {
                state: Some(State::Provisioning),
                reason: cleared(),
                endpoint: None,
                splash: None,
                stage: Some(e.stage.clone()),
                progress: Some(e.progress_percent.min(100)),
            },
            WorkspaceEvent::Running(e) => Change {
                state: Some(State::Running),
                reason: cleared(),
                endpoint: Some(e.endpoint.clone()),
                splash: Some(e.splash.clone()),
                stage: Some("Running".to_owned()),
                progress: Some(100),
            },
            WorkspaceEvent::Stopping(e) => Change {
                state: Some(State::Stopping),
                reason: Some(e.reason.clone()),
                endpoint: None,
                splash: None,
                stage: cleared(),
                progress: Some(0),
            },
            WorkspaceEvent::Stopped(e) => Change {
                state: Some(State::Stopped),
                reason: Some(e.reason.clone()),
                endpoint: cleared(),
                splash: cleared(),
                stage: cleared(),
                progress: Some(0),
            },
            WorkspaceEvent::Failed(e) => Change {
                state: Some(State::Failed),
                reason: Some(e.reason.clone()),
                endpoint: cleared(),
                splash: cleared(),
                stage: cleared(),
                progress: Some(0),
            },
            WorkspaceEvent::Deleted(_) => Change {
                state: Some(State::Deleted),
                reason: cleared(),
                endpoint: cleared(),
                splash: cleared(),
                stage: cleared(),
                progress: Some(0),
            },
            WorkspaceEvent::IdleWarning(_) | WorkspaceEvent::StopScheduled(_) => Change::default(),
        }
    }
}

/// What the provisioner knows of one workspace.
#[derive(Clone, Debug, PartialEq)]
pub struct Workspace {
    pub id: String,
    pub username: String,
    pub blueprint: String,
    pub state: State,
    pub reason: String,
    pub created_at: time::OffsetDateTime,
    pub updated_at: time::OffsetDateTime,
    pub version: u64,
    /// How k8shelld is reached while running.
    pub endpoint: String,
    /// The blueprint's splash while running.
    pub splash: String,
    /// Provisioning stage and progress.
    pub stage: String,
    pub progress: u8,
    /// From the request, for CEL.
    pub metadata: BTreeMap<String, String>,
    /// Whether the owner wants it running (a failure does not change it;
    /// the reconcile loop restarts what should run).
    pub desired_running: bool,
    /// A scheduled stop: (RFC 3339 time, reason); cleared by any change
    /// of state.
    pub stop_at: Option<(String, String)>,
}

/// Aggregate state: `None` until requested.
#[derive(Debug, Default)]
pub struct WorkspaceAggregate(pub Option<Workspace>);

impl Aggregate for WorkspaceAggregate {
    const CONTEXT: Context = Context::Workspace;

    fn apply(&mut self, stored: &StoredEvent) {
        let Ok(DomainEvent::Workspace(event)) = DomainEvent::decode(&stored.envelope) else {
            return;
        };
        match (&mut self.0, &event) {
            (Some(workspace), WorkspaceEvent::Requested(_))
                if workspace.state != State::Deleted =>
            {
                // A second request for a live workspace changes nothing.
            }
            (_, WorkspaceEvent::Requested(requested)) => {
                self.0 = Some(Workspace {
                    id: requested.workspace_id.clone(),
                    username: requested.username.clone(),
                    blueprint: requested.blueprint.clone(),
                    state: State::Requested,
                    reason: String::new(),
                    created_at: stored.envelope.time,
                    updated_at: stored.envelope.time,
                    version: stored.sequence,
                    endpoint: String::new(),
                    splash: String::new(),
                    stage: String::new(),
                    progress: 0,
                    metadata: requested.metadata.clone(),
                    desired_running: true,
                    stop_at: None,
                });
            }
            (Some(workspace), event) => {
                let change = Change::of(event);
                if let Some(state) = change.state {
                    workspace.state = state;
                }
                if let Some(reason) = change.reason {
                    workspace.reason = reason;
                }
                if let Some(endpoint) = change.endpoint {
                    workspace.endpoint = endpoint;
                }
                if let Some(splash) = change.splash {
                    workspace.splash = splash;
                }
                if let Some(stage) = change.stage {
                    workspace.stage = stage;
                }
                if let Some(progress) = change.progress {
                    workspace.progress = progress;
                }
                if change.state.is_some() {
                    workspace.stop_at = None;
                }
                if let WorkspaceEvent::StopScheduled(e) = event {
                    workspace.stop_at = Some((e.at.clone(), e.reason.clone()));
                }
                match event {
                    WorkspaceEvent::Provisioning(_) | WorkspaceEvent::Running(_) => {
                        workspace.desired_running = true;
                    }
                    WorkspaceEvent::Stopping(_)
                    | WorkspaceEvent::Stopped(_)
                    | WorkspaceEvent::Deleted(_) => workspace.desired_running = false,
                    _ => {}
                }
                workspace.updated_at = stored.envelope.time;
                workspace.version = stored.sequence;
            }
            (None, _) => {
                // Lifecycle events before a request cannot be attributed; ignore.
            }
        }
    }
}

/// Outcome of deciding on a create command.
#[derive(Debug, PartialEq, Eq)]
pub enum CreateDecision {
    /// The workspace is new: append `requested`.
    Create,
    /// The same user and spec already have it.
    Exists,
    /// Another spec hashed to this id: try a longer one.
    Collision,
}

fn event<E: EventData + serde::Serialize>(
    id: &AggregateId,
    data: &E,
) -> Result<CloudEvent, EnvelopeError> {
    CloudEvent::new(crate::EVENT_SOURCE, id, data)
}

/// Decides a create: idempotent for the same user and blueprint.
pub fn decide_create(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    username: &str,
    blueprint: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<CloudEvent>, CreateDecision), EnvelopeError> {
    let same_spec = |w: &Workspace| w.username == username && w.blueprint == blueprint;
    let create = || {
        Ok((
            vec![event(
                id,
                &WorkspaceRequested {
                    workspace_id: id.to_string(),
                    username: username.to_owned(),
                    blueprint: blueprint.to_owned(),
                    metadata: metadata.clone(),
                },
            )?],
            CreateDecision::Create,
        ))
    };
    match &state.0 {
        None => create(),
        // A deleted workspace's id may be requested again by its owner.
        Some(existing) if same_spec(existing) && existing.state == State::Deleted => create(),
        Some(existing) if same_spec(existing) => Ok((Vec::new(), CreateDecision::Exists)),
        Some(_) => Ok((Vec::new(), CreateDecision::Collision)),
    }
}

/// A command does not apply to the workspace's state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// No such workspace (or deleted).
    #[error("workspace {0} not found")]
    NotFound(String),
    /// The state forbids the command.
    #[error("workspace {id} is {state}: {why}")]
    WrongState {
        id: String,
        state: &'static str,
        why: &'static str,
    },
}

/// What a start decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StartDecision {
    /// This caller starts it (the events claim the start).
    Start,
    /// Already starting or running: someone else's start is in progress or done.
    AlreadyUnderway,
}

fn live(state: &WorkspaceAggregate, id: &AggregateId) -> Result<Workspace, Refusal> {
    match &state.0 {
        Some(w) if w.state != State::Deleted => Ok(w.clone()),
        _ => Err(Refusal::NotFound(id.to_string())),
    }
}

/// Decides a start. The `provisioning` event is the claim: of two racing
/// starts, the one whose append wins starts the runtime; the other reloads,
/// sees `provisioning` and does nothing.
pub fn decide_start(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    stage: &str,
) -> Result<(Vec<CloudEvent>, StartDecision), DecideError> {
    let workspace = live(state, id)?;
    match workspace.state {
        State::Provisioning | State::Running => Ok((Vec::new(), StartDecision::AlreadyUnderway)),
        State::Stopping => Err(Refusal::WrongState {
            id: id.to_string(),
            state: workspace.state.as_str(),
            why: "wait until it has stopped",
        }
        .into()),
        State::Requested | State::Stopped | State::Failed => Ok((
            vec![event(
                id,
                &WorkspaceProvisioning {
                    stage: stage.to_owned(),
                    progress_percent: 5,
                    detail: String::new(),
                },
            )?],
            StartDecision::Start,
        )),
        State::Deleted => Err(Refusal::NotFound(id.to_string()).into()),
    }
}

/// What a stop decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StopDecision {
    /// This caller stops it.
    Stop,
    /// Already stopping or stopped.
    AlreadyUnderway,
}

/// Decides a stop.
pub fn decide_stop(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    reason: &str,
) -> Result<(Vec<CloudEvent>, StopDecision), DecideError> {
    let workspace = live(state, id)?;
    match workspace.state {
        State::Stopping | State::Stopped => Ok((Vec::new(), StopDecision::AlreadyUnderway)),
        _ => Ok((
            vec![event(
                id,
                &WorkspaceStopping {
                    reason: reason.to_owned(),
                },
            )?],
            StopDecision::Stop,
        )),
    }
}

/// Schedules a stop at `at` (RFC 3339) unless it is stopping or stopped.
pub fn decide_schedule_stop(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    at: &str,
    reason: &str,
) -> Result<(Vec<CloudEvent>, bool), DecideError> {
    let workspace = live(state, id)?;
    if matches!(workspace.state, State::Stopping | State::Stopped) {
        return Ok((Vec::new(), false));
    }
    Ok((
        vec![event(
            id,
            &k8shell_events::workspace::WorkspaceStopScheduled {
                at: at.to_owned(),
                reason: reason.to_owned(),
            },
        )?],
        true,
    ))
}

/// Decides a delete: always possible on a live workspace.
pub fn decide_delete(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    volumes_retained: bool,
) -> Result<(Vec<CloudEvent>, Workspace), DecideError> {
    let workspace = live(state, id)?;
    Ok((
        vec![event(id, &WorkspaceDeleted { volumes_retained })?],
        workspace,
    ))
}

/// Records an outcome of runtime work, but only if the workspace is still
/// in the state the work started from (`expected`); a stop or delete that
/// came in meanwhile wins over a late `running`.
pub fn decide_outcome(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    expected: &[State],
    outcome: Outcome,
) -> Result<(Vec<CloudEvent>, bool), DecideError> {
    let workspace = live(state, id)?;
    if !expected.contains(&workspace.state) {
        return Ok((Vec::new(), false));
    }
    let event = match outcome {
        Outcome::Progress {
            stage,
            percent,
            detail,
        } => event(
            id,
            &WorkspaceProvisioning {
                stage,
                progress_percent: percent,
                detail,
            },
        )?,
        Outcome::Running { endpoint, splash } => event(id, &WorkspaceRunning { endpoint, splash })?,
        Outcome::Stopped { reason } => event(id, &WorkspaceStopped { reason })?,
        Outcome::Failed { reason } => event(id, &WorkspaceFailed { reason })?,
        Outcome::IdleWarning {
            idle_seconds,
            stop_in_seconds,
        } => event(
            id,
            &WorkspaceIdleWarning {
                idle_seconds,
                stop_in_seconds,
            },
        )?,
    };
    Ok((vec![event], true))
}

/// A fact about runtime work to record.
#[derive(Clone, Debug)]
pub enum Outcome {
    Progress {
        stage: String,
        percent: u8,
        detail: String,
    },
    Running {
        endpoint: String,
        splash: String,
    },
    Stopped {
        reason: String,
    },
    Failed {
        reason: String,
    },
    IdleWarning {
        idle_seconds: u64,
        stop_in_seconds: u64,
    },
}

/// A decision failed.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The command does not apply.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// An event could not be built.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(sequence: u64, envelope: CloudEvent) -> StoredEvent {
        StoredEvent {
            sequence,
            subject: String::new(),
            envelope,
        }
    }

    fn apply_all(state: &mut WorkspaceAggregate, events: Vec<CloudEvent>) {
        for envelope in events {
            let next = state.0.as_ref().map_or(1, |w| w.version + 1);
            state.apply(&stored(next, envelope));
        }
    }

    #[test]
    fn create_is_idempotent_collides_and_reopens_after_delete() {
        let id = AggregateId::new("alice-1234567").unwrap();
        let none = BTreeMap::new();
        let mut state = WorkspaceAggregate::default();
        let (events, decision) = decide_create(&state, &id, "alice", "dev", &none).unwrap();
        assert_eq!(decision, CreateDecision::Create);
        apply_all(&mut state, events);
        assert_eq!(state.0.as_ref().unwrap().state, State::Requested);

        let (events, decision) = decide_create(&state, &id, "alice", "dev", &none).unwrap();
        assert_eq!((events.len(), decision), (0, CreateDecision::Exists));
        let (_, decision) = decide_create(&state, &id, "alice", "ops", &none).unwrap();
        assert_eq!(decision, CreateDecision::Collision);

        let (events, _) = decide_delete(&state, &id, false).unwrap();
        apply_all(&mut state, events);
        assert_eq!(state.0.as_ref().unwrap().state, State::Deleted);
        let (events, decision) = decide_create(&state, &id, "alice", "dev", &none).unwrap();
        assert_eq!(decision, CreateDecision::Create);
        apply_all(&mut state, events);
        let workspace = state.0.unwrap();
        assert_eq!((workspace.state, workspace.version), (State::Requested, 3));
    }

    #[test]
    fn lifecycle_decisions() {
        let id = AggregateId::new("alice-1234567").unwrap();
        let mut state = WorkspaceAggregate::default();
        assert!(matches!(
            decide_start(&state, &id, "Starting"),
            Err(DecideError::Refused(Refusal::NotFound(_)))
        ));
        let (events, _) = decide_create(&state, &id, "alice", "dev", &BTreeMap::new()).unwrap();
        apply_all(&mut state, events);

        // The first start claims it; a second one sees it underway.
        let (events, decision) = decide_start(&state, &id, "Starting").unwrap();
        assert_eq!(decision, StartDecision::Start);
        apply_all(&mut state, events);
        let (events, decision) = decide_start(&state, &id, "Starting").unwrap();
        assert_eq!(
            (events.len(), decision),
            (0, StartDecision::AlreadyUnderway)
        );

        let running = Outcome::Running {
            endpoint: "unix:///x".into(),
            splash: String::new(),
        };
        let (events, recorded) =
            decide_outcome(&state, &id, &[State::Provisioning], running.clone()).unwrap();
        assert!(recorded);
        apply_all(&mut state, events);
        let workspace = state.0.as_ref().unwrap();
        assert_eq!(
            (
                workspace.state,
                workspace.endpoint.as_str(),
                workspace.progress
            ),
            (State::Running, "unix:///x", 100)
        );

        // Idle warnings change nothing but the version.
        let (events, _) = decide_outcome(
            &state,
            &id,
            &[State::Running],
            Outcome::IdleWarning {
                idle_seconds: 600,
                stop_in_seconds: 60,
            },
        )
        .unwrap();
        apply_all(&mut state, events);
        assert_eq!(state.0.as_ref().unwrap().state, State::Running);

        let (events, decision) = decide_stop(&state, &id, "user").unwrap();
        assert_eq!(decision, StopDecision::Stop);
        apply_all(&mut state, events);
        assert!(!state.0.as_ref().unwrap().desired_running);
        // A late `running` from a start that raced the stop is not recorded.
        let (events, recorded) =
            decide_outcome(&state, &id, &[State::Provisioning], running).unwrap();
        assert!(!recorded && events.is_empty());
        assert!(matches!(
            decide_start(&state, &id, "Starting"),
            Err(DecideError::Refused(Refusal::WrongState { .. }))
        ));
        let (events, _) = decide_outcome(
            &state,
            &id,
            &[State::Stopping],
            Outcome::Stopped {
                reason: "user".into(),
            },
        )
        .unwrap();
        apply_all(&mut state, events);
        let (_, decision) = decide_stop(&state, &id, "user").unwrap();
        assert_eq!(decision, StopDecision::AlreadyUnderway);

        // A failure keeps what the owner wants.
        let (events, _) = decide_start(&state, &id, "Starting").unwrap();
        apply_all(&mut state, events);
        let (events, _) = decide_outcome(
            &state,
            &id,
            &[State::Provisioning],
            Outcome::Failed {
                reason: "boom".into(),
            },
        )
        .unwrap();
        apply_all(&mut state, events);
        let workspace = state.0.as_ref().unwrap();
        assert_eq!(
            (workspace.state, workspace.desired_running),
            (State::Failed, true)
        );
        assert_eq!(workspace.reason, "boom");

        // A scheduled stop is remembered, and a start clears it.
        let (events, scheduled) =
            decide_schedule_stop(&state, &id, "2030-01-01T00:00:00Z", "user").unwrap();
        assert!(scheduled);
        apply_all(&mut state, events);
        assert_eq!(
            state.0.as_ref().unwrap().stop_at,
            Some(("2030-01-01T00:00:00Z".to_owned(), "user".to_owned()))
        );
        let (events, _) = decide_start(&state, &id, "Starting").unwrap();
        apply_all(&mut state, events);
        assert_eq!(
            state.0.as_ref().unwrap().stop_at,
            None,
            "a start cancels it"
        );
    }
}
