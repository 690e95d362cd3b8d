//! Organisations: a name and a description, as aggregates of the user
//! context with ids `org_<name>` (usernames never contain `_`, so the two
//! cannot collide). Every user belongs to one; `default` always exists.

use k8shell_bus::{Aggregate, StoredEvent};
use k8shell_events::user::{OrgCreated, UserEvent};
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent};

use crate::users::{EVENT_SOURCE, Refusal};

/// The organisation every user belongs to unless told otherwise.
pub const DEFAULT_ORG: &str = "default";

/// What identity knows of one organisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Org {
    pub name: String,
    pub description: String,
    pub created_at: time::OffsetDateTime,
}

/// Aggregate state: `None` until created.
#[derive(Debug, Default)]
pub struct OrgAggregate(pub Option<Org>);

impl Aggregate for OrgAggregate {
    const CONTEXT: Context = Context::User;

    fn apply(&mut self, stored: &StoredEvent) {
        if let Ok(DomainEvent::User(UserEvent::OrgCreated(created))) =
            DomainEvent::decode(&stored.envelope)
            && self.0.is_none()
        {
            self.0 = Some(Org {
                name: created.name,
                description: created.description,
                created_at: stored.envelope.time,
            });
        }
    }
}

/// Organisation names: as usernames (lowercase, digits, `-`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The aggregate id of an organisation.
pub fn org_id(name: &str) -> Option<AggregateId> {
    valid_name(name)
        .then(|| AggregateId::new(format!("org_{name}")).ok())
        .flatten()
}

/// Creates an organisation.
pub fn decide_create(
    state: &OrgAggregate,
    id: &AggregateId,
    created: OrgCreated,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    if state.0.is_some() {
        return Err(Refusal::Exists(format!(
            "organisation {} already exists",
            created.name
        )));
    }
    Ok((vec![CloudEvent::new(EVENT_SOURCE, id, &created)?], ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_ids_never_look_like_usernames() {
        assert_eq!(org_id("acme").unwrap().as_str(), "org_acme");
        assert!(org_id("Acme").is_none());
        assert!(org_id("").is_none());
        assert!(org_id("a_b").is_none());
        assert!(org_id("acme-").is_none());
    }
}
