use serde::de::DeserializeOwned;

use crate::session::SessionEvent;
use crate::user::{
    OrgCreated, UserApproved, UserIdentityLinked, UserOrganizationSet, UserWaitlisted,
};
use crate::user::{
    UserCreated, UserEvent, UserLocked, UserLoginFailed, UserPasswordSet, UserPatCreated,
    UserPatRevoked, UserRolesSet, UserSshCertificateIssued, UserSshKeyAdded, UserSshKeyRemoved,
};
use crate::workspace::{
    WorkspaceDeleted, WorkspaceEvent, WorkspaceFailed, WorkspaceIdleWarning, WorkspaceProvisioning,
    WorkspaceRequested, WorkspaceRunning, WorkspaceStopped, WorkspaceStopping,
};
use crate::{CloudEvent, EventData};

/// A decoded event of any context.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum DomainEvent {
    /// A workspace lifecycle event.
    Workspace(WorkspaceEvent),
    /// A user or credential event.
    User(UserEvent),
    /// An authorization decision (possibly folded).
    AuthzDecided(crate::authz::AuthzDecided),
    /// A session or recording event.
    Session(SessionEvent),
    /// A failed SSH authentication.
    SshAuthFailed(crate::shield::SshAuthFailed),
    /// A ban.
    ShieldIpBanned(crate::shield::ShieldIpBanned),
    /// A ban's end.
    ShieldIpUnbanned(crate::shield::ShieldIpUnbanned),
    /// A type this build does not know (newer producer, or another tool's
    /// event on our stream). Consumers log it and move on.
    Unknown {
        /// The envelope's `type`.
        event_type: String,
    },
}

/// A known event type whose `data` does not match its schema.
#[derive(Debug, thiserror::Error)]
#[error("event {event_id} of type {event_type} has invalid data")]
pub struct DecodeError {
    /// Envelope id.
    pub event_id: String,
    /// Envelope type.
    pub event_type: String,
    /// Cause.
    #[source]
    pub source: serde_json::Error,
}

fn data<E: EventData + DeserializeOwned>(event: &CloudEvent) -> Result<E, DecodeError> {
    E::deserialize(&event.data).map_err(|source| DecodeError {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        source,
    })
}

impl DomainEvent {
    /// Decodes an envelope's payload according to its `type`.
    ///
    /// An unknown type is not an error: it yields [`DomainEvent::Unknown`].
    pub fn decode(event: &CloudEvent) -> Result<Self, DecodeError> {
        use UserEvent as U;
        use WorkspaceEvent as W;
        let decoded = match event.event_type.as_str() {
            WorkspaceRequested::TYPE => DomainEvent::Workspace(W::Requested(data(event)?)),
            WorkspaceProvisioning::TYPE => DomainEvent::Workspace(W::Provisioning(data(event)?)),
            WorkspaceRunning::TYPE => DomainEvent::Workspace(W::Running(data(event)?)),
            WorkspaceStopping::TYPE => DomainEvent::Workspace(W::Stopping(data(event)?)),
            WorkspaceStopped::TYPE => DomainEvent::Workspace(W::Stopped(data(event)?)),
            WorkspaceFailed::TYPE => DomainEvent::Workspace(W::Failed(data(event)?)),
            WorkspaceDeleted::TYPE => DomainEvent::Workspace(W::Deleted(data(event)?)),
            WorkspaceIdleWarning::TYPE => DomainEvent::Workspace(W::IdleWarning(data(event)?)),
            crate::workspace::WorkspaceStopScheduled::TYPE => {
                DomainEvent::Workspace(W::StopScheduled(data(event)?))
            }
            crate::session::SessionStarted::TYPE => {
                DomainEvent::Session(SessionEvent::Started(data(event)?))
            }
            crate::session::SessionEnded::TYPE => {
                DomainEvent::Session(SessionEvent::Ended(data(event)?))
            }
            crate::session::SessionRecordingStarted::TYPE => {
                DomainEvent::Session(SessionEvent::RecordingStarted(data(event)?))
            }
            crate::session::SessionRecordingChunk::TYPE => {
                DomainEvent::Session(SessionEvent::RecordingChunk(data(event)?))
            }
            crate::session::SessionRecordingEnded::TYPE => {
                DomainEvent::Session(SessionEvent::RecordingEnded(data(event)?))
            }
            crate::authz::AuthzDecided::TYPE => DomainEvent::AuthzDecided(data(event)?),
            crate::shield::SshAuthFailed::TYPE => DomainEvent::SshAuthFailed(data(event)?),
            crate::shield::ShieldIpBanned::TYPE => DomainEvent::ShieldIpBanned(data(event)?),
            crate::shield::ShieldIpUnbanned::TYPE => DomainEvent::ShieldIpUnbanned(data(event)?),
            UserCreated::TYPE => DomainEvent::User(U::Created(data(event)?)),
            UserRolesSet::TYPE => DomainEvent::User(U::RolesSet(data(event)?)),
            UserPasswordSet::TYPE => DomainEvent::User(U::PasswordSet(data(event)?)),
            UserLoginFailed::TYPE => DomainEvent::User(U::LoginFailed(data(event)?)),
            UserLocked::TYPE => DomainEvent::User(U::Locked(data(event)?)),
            UserSshKeyAdded::TYPE => DomainEvent::User(U::SshKeyAdded(data(event)?)),
            UserSshKeyRemoved::TYPE => DomainEvent::User(U::SshKeyRemoved(data(event)?)),
            UserPatCreated::TYPE => DomainEvent::User(U::PatCreated(data(event)?)),
            UserPatRevoked::TYPE => DomainEvent::User(U::PatRevoked(data(event)?)),
            UserSshCertificateIssued::TYPE => {
                DomainEvent::User(U::SshCertificateIssued(data(event)?))
            }
            UserIdentityLinked::TYPE => DomainEvent::User(U::IdentityLinked(data(event)?)),
            UserWaitlisted::TYPE => DomainEvent::User(U::Waitlisted(data(event)?)),
            UserApproved::TYPE => DomainEvent::User(U::Approved(data(event)?)),
            UserOrganizationSet::TYPE => DomainEvent::User(U::OrganizationSet(data(event)?)),
            OrgCreated::TYPE => DomainEvent::User(U::OrgCreated(data(event)?)),
            other => DomainEvent::Unknown {
                event_type: other.to_owned(),
            },
        };
        Ok(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AggregateId;

    fn envelope(event_type: &str, data: serde_json::Value) -> CloudEvent {
        let id = AggregateId::new("a").unwrap();
        let mut event = CloudEvent::new(
            "k8shell/test",
            &id,
            &WorkspaceStopped { reason: "x".into() },
        )
        .unwrap();
        event.event_type = event_type.into();
        event.data = data;
        event
    }

    #[test]
    fn unknown_type_is_a_value_not_an_error() {
        let event = envelope(
            "k8shell.workspace.teleported.v9",
            serde_json::json!({"x": 1}),
        );
        assert_eq!(
            DomainEvent::decode(&event).unwrap(),
            DomainEvent::Unknown {
                event_type: "k8shell.workspace.teleported.v9".into()
            }
        );
    }

    #[test]
    fn known_type_with_wrong_shape_is_an_error() {
        let event = envelope(WorkspaceRequested::TYPE, serde_json::json!({"username": 3}));
        let err = DomainEvent::decode(&event).unwrap_err();
        assert_eq!(err.event_type, WorkspaceRequested::TYPE);
    }

    #[test]
    fn known_type_decodes() {
        let event = envelope(WorkspaceFailed::TYPE, serde_json::json!({"reason": "oom"}));
        assert_eq!(
            DomainEvent::decode(&event).unwrap(),
            DomainEvent::Workspace(WorkspaceEvent::Failed(WorkspaceFailed {
                reason: "oom".into()
            }))
        );
    }
}
