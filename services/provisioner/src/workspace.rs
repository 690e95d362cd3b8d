//! The workspace aggregate: its state folded from events, and the decisions
//! the provisioner takes on it.

use k8shell_bus::{Aggregate, StoredEvent};
use k8shell_events::workspace::{WorkspaceEvent, WorkspaceRequested};
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent, EnvelopeError};

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

    /// The state an event moves a workspace to, with the reason it carries.
    pub fn after(event: &WorkspaceEvent) -> (State, String) {
        match event {
            WorkspaceEvent::Requested(_) => (State::Requested, String::new()),
            WorkspaceEvent::Provisioning(e) => (State::Provisioning, e.stage.clone()),
            WorkspaceEvent::Running(_) => (State::Running, String::new()),
            WorkspaceEvent::Stopping(e) => (State::Stopping, e.reason.clone()),
            WorkspaceEvent::Stopped(e) => (State::Stopped, e.reason.clone()),
            WorkspaceEvent::Failed(e) => (State::Failed, e.reason.clone()),
            WorkspaceEvent::Deleted(_) => (State::Deleted, String::new()),
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
        let (state, reason) = State::after(&event);
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
                    state,
                    reason,
                    created_at: stored.envelope.time,
                    updated_at: stored.envelope.time,
                    version: stored.sequence,
                });
            }
            (Some(workspace), _) => {
                workspace.state = state;
                workspace.reason = reason;
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

/// Decides a create: idempotent for the same user and blueprint.
pub fn decide_create(
    state: &WorkspaceAggregate,
    id: &AggregateId,
    username: &str,
    blueprint: &str,
) -> Result<(Vec<CloudEvent>, CreateDecision), EnvelopeError> {
    let same_spec = |w: &Workspace| w.username == username && w.blueprint == blueprint;
    match &state.0 {
        None => create(id, username, blueprint),
        // A deleted workspace's id may be requested again by its owner.
        Some(existing) if same_spec(existing) && existing.state == State::Deleted => {
            create(id, username, blueprint)
        }
        Some(existing) if same_spec(existing) => Ok((Vec::new(), CreateDecision::Exists)),
        Some(_) => Ok((Vec::new(), CreateDecision::Collision)),
    }
}

fn create(
    id: &AggregateId,
    username: &str,
    blueprint: &str,
) -> Result<(Vec<CloudEvent>, CreateDecision), EnvelopeError> {
    let event = CloudEvent::new(
        crate::EVENT_SOURCE,
        id,
        &WorkspaceRequested {
            workspace_id: id.to_string(),
            username: username.to_owned(),
            blueprint: blueprint.to_owned(),
        },
    )?;
    Ok((vec![event], CreateDecision::Create))
}

#[cfg(test)]
mod tests {
    use k8shell_events::workspace::WorkspaceDeleted;

    use super::*;

    fn stored(sequence: u64, envelope: CloudEvent) -> StoredEvent {
        StoredEvent {
            sequence,
            subject: String::new(),
            envelope,
        }
    }

    #[test]
    fn create_is_idempotent_collides_and_reopens_after_delete() {
        let id = AggregateId::new("alice-1234567").unwrap();
        let mut state = WorkspaceAggregate::default();
        let (events, decision) = decide_create(&state, &id, "alice", "dev").unwrap();
        assert_eq!(decision, CreateDecision::Create);
        state.apply(&stored(1, events[0].clone()));
        assert_eq!(state.0.as_ref().unwrap().state, State::Requested);

        let (events, decision) = decide_create(&state, &id, "alice", "dev").unwrap();
        assert_eq!((events.len(), decision), (0, CreateDecision::Exists));
        let (_, decision) = decide_create(&state, &id, "alice", "ops").unwrap();
        assert_eq!(decision, CreateDecision::Collision);

        let deleted = CloudEvent::new(
            "t",
            &id,
            &WorkspaceDeleted {
                volumes_retained: false,
            },
        )
        .unwrap();
        state.apply(&stored(2, deleted));
        assert_eq!(state.0.as_ref().unwrap().state, State::Deleted);
        let (events, decision) = decide_create(&state, &id, "alice", "dev").unwrap();
        assert_eq!(decision, CreateDecision::Create);
        state.apply(&stored(3, events[0].clone()));
        let workspace = state.0.unwrap();
        assert_eq!((workspace.state, workspace.version), (State::Requested, 3));
    }
}
