//! A connection's user token, kept valid for as long as the connection
//! lives. identity's tokens are short-lived (1 h); SSH connections are not
//! (VS Code keeps one open for days). Key and certificate logins renew on
//! demand by logging in again with the key the client proved to hold (see
//! `Conn::user_token`). Password, keyboard-interactive and OIDC logins
//! cannot be repeated without the user, so [`keep_renewed`] asks identity's
//! `RenewLogin` for a fresh token shortly before the current one expires —
//! identity stops renewing once the login is older than its
//! `login_max_age`, and new channels then fail with that reason.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::auth::{self, LoginFailure};
use crate::backends::Backends;

/// The current token, its expiry and when it was received.
#[derive(Default)]
pub struct UserToken {
    current: Mutex<Current>,
}

#[derive(Clone, Default)]
struct Current {
    token: String,
    expires_at: Option<SystemTime>,
    received_at: Option<SystemTime>,
}

impl UserToken {
    /// Replaces the token.
    pub fn set(&self, token: String, expires_at: Option<SystemTime>) {
        *self.lock() = Current {
            token,
            expires_at,
            received_at: Some(SystemTime::now()),
        };
    }

    /// The token and its expiry.
    pub fn get(&self) -> (String, Option<SystemTime>) {
        let current = self.lock();
        (current.token.clone(), current.expires_at)
    }

    /// When the token should be renewed: a minute before it expires, or
    /// half-way through its life when it lives less than two minutes.
    fn renew_at(&self) -> Option<SystemTime> {
        let current = self.lock().clone();
        let expires_at = current.expires_at?;
        let lifetime = current
            .received_at
            .and_then(|received| expires_at.duration_since(received).ok())
            .unwrap_or_default();
        Some(expires_at - margin(lifetime))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn margin(lifetime: Duration) -> Duration {
    (lifetime / 2).min(Duration::from_secs(60))
}

/// How long to wait before asking again when identity is unreachable.
const RETRY: Duration = Duration::from_secs(5);

/// Renews `token` before each expiry until `closed` is cancelled or
/// identity refuses (logged; the connection's open channels go on).
pub async fn keep_renewed(
    backends: Backends,
    token: std::sync::Arc<UserToken>,
    closed: CancellationToken,
    source: String,
    session: String,
) {
    loop {
        let Some(renew_at) = token.renew_at() else {
            return;
        };
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let (current, expires_at) = token.get();
        match auth::renew(&backends, &current, &source).await {
            Ok((renewed, expires_at)) => {
                tracing::debug!(%session, "user token renewed");
                token.set(renewed, expires_at);
            }
            Err(LoginFailure::Unavailable(reason))
                if expires_at.is_some_and(|at| at > SystemTime::now() + RETRY) =>
            {
                tracing::warn!(%session, %reason, "cannot renew the user token yet; retrying");
                tokio::select! {
                    () = closed.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
            Err(failure) => {
                tracing::info!(%session, reason = %failure, "the user token is not renewed; new channels will be refused");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tokens_are_renewed_a_minute_early_or_half_way() {
        assert_eq!(margin(Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(margin(Duration::from_secs(4)), Duration::from_secs(2));
        let token = UserToken::default();
        assert!(
            token.renew_at().is_none(),
            "nothing to renew before a login"
        );
        let expires_at = SystemTime::now() + Duration::from_secs(3600);
        token.set("t".into(), Some(expires_at));
        assert_eq!(
            token.renew_at().unwrap(),
            expires_at - Duration::from_secs(60)
        );
        assert_eq!(token.get(), ("t".to_owned(), Some(expires_at)));
    }
}
