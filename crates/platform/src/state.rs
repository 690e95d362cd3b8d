use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use k8shell_service::RunningService;
use serde::{Deserialize, Serialize};

use crate::PlatformConfig;

pub(crate) const STATE_FILE: &str = "platform.json";

/// One service as recorded in the state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceState {
    /// Service name.
    pub name: String,
    /// Listeners by role.
    pub listeners: BTreeMap<String, SocketAddr>,
}

impl ServiceState {
    pub(crate) fn from_running(service: &RunningService) -> Self {
        Self {
            name: service.name.to_owned(),
            listeners: service
                .listeners
                .iter()
                .map(|(r, a)| ((*r).to_owned(), *a))
                .collect(),
        }
    }
}

/// What a running `k8shell up` records in `<data-dir>/platform.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformState {
    /// Process id of `k8shell up`.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// NATS URL in use.
    pub nats_url: String,
    /// PostgreSQL URL in use (no password is ever written).
    pub database_url: String,
    /// Whether NATS and PostgreSQL are the platform's private ones.
    pub embedded_nats: bool,
    /// See `embedded_nats`.
    pub embedded_postgres: bool,
    /// Services and their listeners.
    pub services: Vec<ServiceState>,
}

impl PlatformState {
    pub(crate) fn new(config: &PlatformConfig, nats_url: &str, database_url: &str) -> Self {
        Self {
            pid: std::process::id(),
            started_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            nats_url: nats_url.to_owned(),
            database_url: redact_password(database_url),
            embedded_nats: config.nats_url.is_none(),
            embedded_postgres: config.database_url.is_none(),
            services: Vec::new(),
        }
    }

    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Reads the state file of a data directory; `None` when no platform
    /// recorded itself there or its process is gone.
    pub fn read(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = data_dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let state: Self =
            serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
        let alive = Path::new(&format!("/proc/{}", state.pid)).exists();
        Ok(alive.then_some(state))
    }
}

fn redact_password(url: &str) -> String {
    // postgres://user:secret@host/db -> postgres://user:***@host/db
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_the_state_file() {
        assert_eq!(
            super::redact_password("postgres://u:p@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            super::redact_password("postgres://u@h/db?host=/x"),
            "postgres://u@h/db?host=/x"
        );
    }
}
