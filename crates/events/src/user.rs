//! Users and their credentials. Aggregate id: the username. Secrets never
//! travel in events: password and token hashes stay in identity's own
//! tables; events say that something changed.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Context, EventData};

/// Declares the `EventData` impl of one user event.
macro_rules! user_event {
    ($ty:ty, $name:literal, $description:literal) => {
        impl EventData for $ty {
            const TYPE: &'static str = concat!("k8shell.user.", $name, ".v1");
            const CONTEXT: Context = Context::User;
            const DESCRIPTION: &'static str = $description;
        }
    };
}

/// A user account was created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserCreated {
    /// Login name (the aggregate id).
    pub username: String,
    /// Contact address, may be empty.
    #[serde(default)]
    pub email: String,
    /// Human name, may be empty.
    #[serde(default)]
    pub display_name: String,
    /// Roles, e.g. `admin`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// `local`, `bootstrap` or `oidc:<provider>`.
    pub origin: String,
    /// The organisation the user belongs to; empty means `default`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub organization: String,
}
user_event!(UserCreated, "created", "A user account was created.");

/// A user's roles were replaced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserRolesSet {
    /// The new roles.
    pub roles: Vec<String>,
}
user_event!(UserRolesSet, "roles_set", "A user's roles were replaced.");

/// A user's password was set or changed (the hash stays in identity).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserPasswordSet {}
user_event!(
    UserPasswordSet,
    "password_set",
    "A user's password was set or changed."
);

/// A password login failed for an existing user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserLoginFailed {
    /// `password`, `public_key`, `pat`.
    pub method: String,
    /// Client address, when known.
    #[serde(default)]
    pub source: String,
    /// Failures in the current window, this one included.
    pub failures: u32,
}
user_event!(
    UserLoginFailed,
    "login_failed",
    "A login failed for an existing user."
);

/// Too many failures: the account is locked until `until`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserLocked {
    /// RFC 3339 time the lock ends.
    pub until: String,
    /// Failures that caused it.
    pub failures: u32,
}
user_event!(
    UserLocked,
    "locked",
    "Repeated login failures locked the account for a while."
);

/// An SSH public key was registered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserSshKeyAdded {
    /// `SHA256:…`.
    pub fingerprint: String,
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, ...
    pub algorithm: String,
    /// The public key line.
    pub public_key: String,
    /// The key's comment.
    #[serde(default)]
    pub comment: String,
}
user_event!(
    UserSshKeyAdded,
    "ssh_key_added",
    "An SSH public key was registered for the user."
);

/// An SSH public key was removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserSshKeyRemoved {
    /// `SHA256:…`.
    pub fingerprint: String,
}
user_event!(
    UserSshKeyRemoved,
    "ssh_key_removed",
    "An SSH public key was removed."
);

/// A personal access token was created (its hash stays in identity).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserPatCreated {
    /// Token id (not the secret).
    pub token_id: String,
    /// The owner's name for it.
    pub name: String,
    /// Action patterns it is limited to; empty for all of the user's rights.
    pub scopes: Vec<String>,
    /// RFC 3339 expiry.
    pub expires_at: String,
}
user_event!(
    UserPatCreated,
    "pat_created",
    "A personal access token was created."
);

/// A personal access token was revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserPatRevoked {
    /// Token id.
    pub token_id: String,
}
user_event!(
    UserPatRevoked,
    "pat_revoked",
    "A personal access token was revoked."
);

/// An SSH user certificate was issued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserSshCertificateIssued {
    /// Certificate serial.
    pub serial: u64,
    /// Fingerprint of the certified key.
    pub fingerprint: String,
    /// RFC 3339 end of validity.
    pub valid_before: String,
}
user_event!(
    UserSshCertificateIssued,
    "ssh_certificate_issued",
    "A short-lived SSH user certificate was issued."
);

/// A user was linked to an account at an external OpenID Provider; later
/// logins through that provider must present the same subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserIdentityLinked {
    /// Provider name from identity's configuration.
    pub provider: String,
    /// The provider's `sub` claim.
    pub subject: String,
}
user_event!(
    UserIdentityLinked,
    "identity_linked",
    "A user was linked to an account at an OpenID Provider."
);

/// An onboarding rule put a new user on the waitlist: the account exists
/// but cannot log in until an administrator approves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserWaitlisted {
    /// Provider the user came from.
    pub provider: String,
}
user_event!(
    UserWaitlisted,
    "waitlisted",
    "A new user waits for an administrator's approval."
);

/// A waitlisted user was approved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserApproved {
    /// Who approved (a username), empty when unknown.
    #[serde(default)]
    pub by: String,
}
user_event!(UserApproved, "approved", "A waitlisted user was approved.");

/// A user moved to another organisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UserOrganizationSet {
    /// The organisation's name.
    pub organization: String,
}
user_event!(
    UserOrganizationSet,
    "organization_set",
    "A user moved to another organisation."
);

/// An organisation was created. Organisations live in the user context
/// with aggregate ids `org_<name>`, which no username can take (usernames
/// have no `_`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OrgCreated {
    /// The organisation's name.
    pub name: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
}
user_event!(OrgCreated, "org_created", "An organisation was created.");

/// Every user event this build understands.
#[derive(Clone, Debug, PartialEq)]
pub enum UserEvent {
    /// See [`UserCreated`].
    Created(UserCreated),
    /// See [`UserRolesSet`].
    RolesSet(UserRolesSet),
    /// See [`UserPasswordSet`].
    PasswordSet(UserPasswordSet),
    /// See [`UserLoginFailed`].
    LoginFailed(UserLoginFailed),
    /// See [`UserLocked`].
    Locked(UserLocked),
    /// See [`UserSshKeyAdded`].
    SshKeyAdded(UserSshKeyAdded),
    /// See [`UserSshKeyRemoved`].
    SshKeyRemoved(UserSshKeyRemoved),
    /// See [`UserPatCreated`].
    PatCreated(UserPatCreated),
    /// See [`UserPatRevoked`].
    PatRevoked(UserPatRevoked),
    /// See [`UserSshCertificateIssued`].
    SshCertificateIssued(UserSshCertificateIssued),
    /// See [`UserIdentityLinked`].
    IdentityLinked(UserIdentityLinked),
    /// See [`UserWaitlisted`].
    Waitlisted(UserWaitlisted),
    /// See [`UserApproved`].
    Approved(UserApproved),
    /// See [`UserOrganizationSet`].
    OrganizationSet(UserOrganizationSet),
    /// See [`OrgCreated`].
    OrgCreated(OrgCreated),
}
