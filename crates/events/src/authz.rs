//! Authorization decisions. Aggregate id: the subject (username).
//! Identical decisions within the folding window are one event with a count.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Context, EventData};

/// One decision, or several identical ones folded together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuthzDecided {
    /// The subject (`sub` claim).
    pub subject: String,
    /// Its roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Its scopes, when narrowed.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `ssh:shell`, ...
    pub action: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    #[serde(default)]
    pub resource_id: String,
    /// The outcome.
    pub allow: bool,
    /// Why.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// What the caller must enforce.
    #[serde(default)]
    pub obligations: BTreeMap<String, String>,
    /// How many identical decisions this event stands for.
    pub count: u64,
    /// RFC 3339 time of the first.
    pub first_at: String,
    /// RFC 3339 time of the last.
    pub last_at: String,
    /// `rego` or `wasm`.
    pub engine: String,
}

impl EventData for AuthzDecided {
    const TYPE: &'static str = "k8shell.authz.decided.v1";
    const CONTEXT: Context = Context::Authz;
    const DESCRIPTION: &'static str = "Authorization decisions; identical ones within the folding window are one event with a count.";
}
