//! SSH login protection. `ssh.auth_failed` comes from the SSH proxy (one per
//! failed attempt, handshake failures included); authz's shield counts them
//! per source address and bans with escalating durations; nfgate turns bans
//! into nftables set elements with timeouts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Context, EventData};

/// An SSH authentication attempt failed. Aggregate id: the source address
/// (`.`/`:` replaced by `-`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SshAuthFailed {
    /// Client address (IPv4 or IPv6).
    pub source: String,
    /// The user string tried, when there was one.
    #[serde(default)]
    pub username: String,
    /// `publickey`, `password`, `keyboard-interactive`, `handshake`.
    pub method: String,
    /// Why, for the audit trail.
    #[serde(default)]
    pub reason: String,
}

impl EventData for SshAuthFailed {
    const TYPE: &'static str = "k8shell.ssh.auth_failed.v1";
    const CONTEXT: Context = Context::Ssh;
    const DESCRIPTION: &'static str =
        "An SSH authentication attempt failed (handshake failures included).";
}

/// An address is banned until `until`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShieldIpBanned {
    /// The address.
    pub ip: String,
    /// RFC 3339 end of the ban.
    pub until: String,
    /// Ban length in seconds.
    pub duration_seconds: u64,
    /// How many bans this address has had, this one included.
    pub offence: u32,
    /// Failures in the window that triggered it.
    pub failures: u32,
}

impl EventData for ShieldIpBanned {
    const TYPE: &'static str = "k8shell.shield.ip_banned.v1";
    const CONTEXT: Context = Context::Shield;
    const DESCRIPTION: &'static str = "Too many SSH failures: the address is banned for a while.";
}

/// A ban ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShieldIpUnbanned {
    /// The address.
    pub ip: String,
    /// `expired` or `admin`.
    pub reason: String,
}

impl EventData for ShieldIpUnbanned {
    const TYPE: &'static str = "k8shell.shield.ip_unbanned.v1";
    const CONTEXT: Context = Context::Shield;
    const DESCRIPTION: &'static str = "A ban ended.";
}

/// The aggregate id of an address: `.` and `:` are not allowed in ids.
pub fn address_id(ip: &str) -> String {
    ip.replace(['.', ':'], "-")
}
