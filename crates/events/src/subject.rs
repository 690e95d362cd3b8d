use std::fmt;

use serde::{Deserialize, Serialize};

/// Prefix of every event subject.
pub const SUBJECT_PREFIX: &str = "k8shell.evt";

/// A bounded context: one JetStream stream and one subject namespace each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Context {
    /// Users, organisations, roles, keys and tokens.
    User,
    /// Workspace lifecycle.
    Workspace,
    /// Interactive sessions and recordings.
    Session,
    /// SSH connection facts such as authentication failures.
    Ssh,
    /// Authorization decisions.
    Authz,
    /// Brute-force bans.
    Shield,
}

impl Context {
    /// Every context, in catalogue order.
    pub const ALL: [Context; 6] = [
        Context::User,
        Context::Workspace,
        Context::Session,
        Context::Ssh,
        Context::Authz,
        Context::Shield,
    ];

    /// The lowercase token used in subjects and type names.
    pub fn as_str(self) -> &'static str {
        match self {
            Context::User => "user",
            Context::Workspace => "workspace",
            Context::Session => "session",
            Context::Ssh => "ssh",
            Context::Authz => "authz",
            Context::Shield => "shield",
        }
    }

    /// Subject filter matching every aggregate of the context.
    pub fn wildcard_subject(self) -> String {
        format!("{SUBJECT_PREFIX}.{}.>", self.as_str())
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifier of one aggregate; the last token of its subject.
///
/// Restricted to `[A-Za-z0-9_-]`, 1 to 128 characters, so it is a single
/// NATS subject token, DNS-friendly, and cannot smuggle wildcards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AggregateId(String);

/// Why a string is not a valid [`AggregateId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid aggregate id {value:?}: {reason}")]
pub struct InvalidAggregateId {
    /// The rejected input.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl AggregateId {
    /// Longest accepted id.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps an id.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidAggregateId> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("must not be empty")
        } else if value.len() > Self::MAX_LEN {
            Some("must be at most 128 characters")
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Some("only letters, digits, '-' and '_' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidAggregateId { value, reason }),
            None => Ok(Self(value)),
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AggregateId {
    type Error = InvalidAggregateId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<AggregateId> for String {
    fn from(id: AggregateId) -> Self {
        id.0
    }
}

impl fmt::Display for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Returns the subject of an aggregate: `k8shell.evt.<context>.<id>`.
pub fn subject(context: Context, id: &AggregateId) -> String {
    format!("{SUBJECT_PREFIX}.{}.{}", context.as_str(), id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_has_prefix_context_and_id() {
        let id = AggregateId::new("alice-1a7fd88").unwrap();
        assert_eq!(
            subject(Context::Workspace, &id),
            "k8shell.evt.workspace.alice-1a7fd88"
        );
    }

    #[test]
    fn rejects_wildcards_dots_and_empty() {
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(129)] {
            assert!(AggregateId::new(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
