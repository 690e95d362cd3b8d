//! The user aggregate and the decisions identity takes on it.

use std::collections::BTreeMap;

use k8shell_bus::{Aggregate, StoredEvent};
use k8shell_events::user::{UserApproved, UserIdentityLinked, UserWaitlisted};
use k8shell_events::user::{
    UserCreated, UserEvent, UserLocked, UserLoginFailed, UserPasswordSet, UserPatCreated,
    UserPatRevoked, UserRolesSet, UserSshCertificateIssued, UserSshKeyAdded, UserSshKeyRemoved,
};
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent, EnvelopeError, EventData};

/// A personal access token, as the aggregate knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatState {
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: String,
    pub revoked: bool,
}

/// What identity knows of one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub email: String,
    pub display_name: String,
    pub roles: Vec<String>,
    pub origin: String,
    pub has_password: bool,
    /// RFC 3339, when locked.
    pub locked_until: Option<String>,
    /// fingerprint → public key line.
    pub keys: BTreeMap<String, String>,
    pub pats: BTreeMap<String, PatState>,
    /// provider → subject at that OpenID Provider.
    pub links: BTreeMap<String, String>,
    /// Waiting for an administrator's approval; cannot log in.
    pub waitlisted: bool,
    /// The organisation the user belongs to.
    pub organization: String,
    pub created_at: time::OffsetDateTime,
    pub version: u64,
}

/// Aggregate state: `None` until created.
#[derive(Debug, Default)]
pub struct UserAggregate(pub Option<User>);

impl Aggregate for UserAggregate {
    const CONTEXT: Context = Context::User;

    fn apply(&mut self, stored: &StoredEvent) {
        let Ok(DomainEvent::User(event)) = DomainEvent::decode(&stored.envelope) else {
            return;
        };
        if let UserEvent::Created(created) = &event {
            if self.0.is_none() {
                self.0 = Some(User {
                    username: created.username.clone(),
                    email: created.email.clone(),
                    display_name: created.display_name.clone(),
                    roles: created.roles.clone(),
                    origin: created.origin.clone(),
                    has_password: false,
                    locked_until: None,
                    keys: BTreeMap::new(),
                    pats: BTreeMap::new(),
                    links: BTreeMap::new(),
                    waitlisted: false,
                    organization: if created.organization.is_empty() {
                        crate::orgs::DEFAULT_ORG.to_owned()
                    } else {
                        created.organization.clone()
                    },
                    created_at: stored.envelope.time,
                    version: stored.sequence,
                });
            }
            return;
        }
        let Some(user) = self.0.as_mut() else {
            return;
        };
        match event {
            UserEvent::Created(_) => {}
            UserEvent::RolesSet(e) => user.roles = e.roles,
            UserEvent::PasswordSet(_) => {
                user.has_password = true;
                user.locked_until = None;
            }
            UserEvent::Locked(e) => user.locked_until = Some(e.until),
            UserEvent::SshKeyAdded(e) => {
                user.keys.insert(e.fingerprint, e.public_key);
            }
            UserEvent::SshKeyRemoved(e) => {
                user.keys.remove(&e.fingerprint);
            }
            UserEvent::PatCreated(e) => {
                user.pats.insert(
                    e.token_id,
                    PatState {
                        name: e.name,
                        scopes: e.scopes,
                        expires_at: e.expires_at,
                        revoked: false,
                    },
                );
            }
            UserEvent::PatRevoked(e) => {
                if let Some(pat) = user.pats.get_mut(&e.token_id) {
                    pat.revoked = true;
                }
            }
            UserEvent::IdentityLinked(e) => {
                user.links.insert(e.provider, e.subject);
            }
            UserEvent::Waitlisted(_) => user.waitlisted = true,
            UserEvent::Approved(_) => user.waitlisted = false,
            UserEvent::OrganizationSet(e) => user.organization = e.organization,
            UserEvent::OrgCreated(_) => return,
            UserEvent::LoginFailed(_) | UserEvent::SshCertificateIssued(_) => {}
        }
        user.version = stored.sequence;
    }
}

/// A command does not apply.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such user.
    #[error("user {0} not found")]
    NotFound(String),
    /// Already there.
    #[error("{0}")]
    Exists(String),
    /// Not there.
    #[error("{0}")]
    Missing(String),
    /// An event could not be built.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// Source of identity's events.
pub const EVENT_SOURCE: &str = "k8shell/identity";

fn event<E: EventData + serde::Serialize>(
    id: &AggregateId,
    data: &E,
) -> Result<CloudEvent, Refusal> {
    Ok(CloudEvent::new(EVENT_SOURCE, id, data)?)
}

fn existing<'a>(state: &'a UserAggregate, id: &AggregateId) -> Result<&'a User, Refusal> {
    state
        .0
        .as_ref()
        .ok_or_else(|| Refusal::NotFound(id.to_string()))
}

/// Creates a user.
pub fn decide_create(
    state: &UserAggregate,
    id: &AggregateId,
    created: UserCreated,
    with_password: bool,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    if state.0.is_some() {
        return Err(Refusal::Exists(format!("user {id} already exists")));
    }
    let mut events = vec![event(id, &created)?];
    if with_password {
        events.push(event(id, &UserPasswordSet {})?);
    }
    Ok((events, ()))
}

/// Replaces roles.
pub fn decide_roles(
    state: &UserAggregate,
    id: &AggregateId,
    roles: Vec<String>,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    existing(state, id)?;
    Ok((vec![event(id, &UserRolesSet { roles })?], ()))
}

/// Records a password change (the hash is stored by the caller first).
pub fn decide_password(
    state: &UserAggregate,
    id: &AggregateId,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    existing(state, id)?;
    Ok((vec![event(id, &UserPasswordSet {})?], ()))
}

/// Adds a key; a key registered twice is refused.
pub fn decide_add_key(
    state: &UserAggregate,
    id: &AggregateId,
    added: UserSshKeyAdded,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    let user = existing(state, id)?;
    if user.keys.contains_key(&added.fingerprint) {
        return Err(Refusal::Exists(format!(
            "key {} is already registered",
            added.fingerprint
        )));
    }
    Ok((vec![event(id, &added)?], ()))
}

/// Removes a key.
pub fn decide_remove_key(
    state: &UserAggregate,
    id: &AggregateId,
    fingerprint: &str,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    let user = existing(state, id)?;
    if !user.keys.contains_key(fingerprint) {
        return Err(Refusal::Missing(format!("no key {fingerprint}")));
    }
    Ok((
        vec![event(
            id,
            &UserSshKeyRemoved {
                fingerprint: fingerprint.to_owned(),
            },
        )?],
        (),
    ))
}

/// Records a PAT (its hash is stored by the caller first).
pub fn decide_pat(
    state: &UserAggregate,
    id: &AggregateId,
    created: UserPatCreated,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    existing(state, id)?;
    Ok((vec![event(id, &created)?], ()))
}

/// Revokes a PAT.
pub fn decide_revoke_pat(
    state: &UserAggregate,
    id: &AggregateId,
    token_id: &str,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    let user = existing(state, id)?;
    if !user.pats.contains_key(token_id) {
        return Err(Refusal::Missing(format!("no token {token_id}")));
    }
    Ok((
        vec![event(
            id,
            &UserPatRevoked {
                token_id: token_id.to_owned(),
            },
        )?],
        (),
    ))
}

/// Records a failed login, and a lock when the failures reach the limit.
pub fn decide_failure(
    state: &UserAggregate,
    id: &AggregateId,
    failed: UserLoginFailed,
    lock_until: Option<String>,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    existing(state, id)?;
    let failures = failed.failures;
    let mut events = vec![event(id, &failed)?];
    if let Some(until) = lock_until {
        events.push(event(id, &UserLocked { until, failures })?);
    }
    Ok((events, ()))
}

/// Records an issued certificate (an audit trail).
pub fn decide_certificate(
    state: &UserAggregate,
    id: &AggregateId,
    issued: UserSshCertificateIssued,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    existing(state, id)?;
    Ok((vec![event(id, &issued)?], ()))
}

/// How a new user arriving from an OpenID Provider is onboarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Active at once.
    Active,
    /// Exists, but waits for approval.
    Waitlisted,
}

/// Creates a user from an OpenID Provider's account, linked to its subject.
pub fn decide_create_linked(
    state: &UserAggregate,
    id: &AggregateId,
    created: UserCreated,
    link: UserIdentityLinked,
    admission: Admission,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    if state.0.is_some() {
        return Err(Refusal::Exists(format!("user {id} already exists")));
    }
    let provider = link.provider.clone();
    let mut events = vec![event(id, &created)?, event(id, &link)?];
    if admission == Admission::Waitlisted {
        events.push(event(id, &UserWaitlisted { provider })?);
    }
    Ok((events, ()))
}

/// Approves a waitlisted user.
pub fn decide_approve(
    state: &UserAggregate,
    id: &AggregateId,
    by: &str,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    let user = existing(state, id)?;
    if !user.waitlisted {
        return Err(Refusal::Missing(format!(
            "user {id} is not waiting for approval"
        )));
    }
    Ok((vec![event(id, &UserApproved { by: by.to_owned() })?], ()))
}

/// Moves a user to another organisation (whose existence the caller checked).
pub fn decide_organization(
    state: &UserAggregate,
    id: &AggregateId,
    organization: &str,
) -> Result<(Vec<CloudEvent>, ()), Refusal> {
    existing(state, id)?;
    Ok((
        vec![event(
            id,
            &k8shell_events::user::UserOrganizationSet {
                organization: organization.to_owned(),
            },
        )?],
        (),
    ))
}
