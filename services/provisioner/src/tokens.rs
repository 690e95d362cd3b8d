//! Workspace tokens and the keys that verify them, both from identity —
//! the only signer. The provisioner asks identity for a short-lived
//! service token (`sub` = `system:provisioner`) whenever it talks to a
//! k8shelld, hands each new workspace identity's JWKS (which publishes the
//! next signing key a rotation ahead), and pushes the JWKS to running
//! workspaces when it changes (see the controller's reconcile pass).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use k8shell_proto::identity::v1 as pb;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tonic::transport::{Channel, Endpoint};

/// The service name in the provisioner's tokens.
pub const SERVICE: &str = "provisioner";

/// Identity could not be reached or refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The identity URL is not a URL.
    #[error("invalid identity url {0:?}")]
    Url(String),
    /// Identity answered with an error, or not at all.
    #[error("identity: {0}")]
    Identity(#[from] tonic::Status),
}

/// Tokens are reused until this close to their expiry.
const REUSE_MARGIN: Duration = Duration::from_secs(60);

/// Identity's tokens and keys, cached.
pub struct WorkspaceTokens {
    client: IdentityServiceClient<Channel>,
    jwks: RwLock<String>,
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl WorkspaceTokens {
    /// Connects to identity (lazily) and fetches the JWKS, retrying for up
    /// to `wait` — identity may be starting alongside.
    pub async fn connect(url: &str, wait: Duration) -> Result<Self, TokenError> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|_| TokenError::Url(url.to_owned()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let tokens = Self {
            client: IdentityServiceClient::new(channel),
            jwks: RwLock::new(String::new()),
            cache: Mutex::new(HashMap::new()),
        };
        let deadline = Instant::now() + wait;
        loop {
            match tokens.refresh_jwks().await {
                Ok(_) => return Ok(tokens),
                Err(error) if Instant::now() < deadline => {
                    tracing::info!(%error, "waiting for identity");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The JWKS last fetched, for workspaces to verify with.
    pub fn jwks(&self) -> String {
        self.jwks.read().map(|j| j.clone()).unwrap_or_default()
    }

    /// Fetches the JWKS again; true when it changed.
    pub async fn refresh_jwks(&self) -> Result<bool, TokenError> {
        let jwks = self
            .client
            .clone()
            .get_jwks(pb::GetJwksRequest {})
            .await?
            .into_inner()
            .jwks;
        let mut current = self
            .jwks
            .write()
            .map_err(|_| tonic::Status::internal("jwks lock poisoned"))?;
        let changed = *current != jwks;
        *current = jwks;
        Ok(changed)
    }

    /// A token for `workspace_id` with at least a minute left.
    pub async fn token(&self, workspace_id: &str) -> Result<String, TokenError> {
        if let Some((token, expires)) = self
            .cache
            .lock()
            .ok()
            .and_then(|cache| cache.get(workspace_id).cloned())
            && expires > Instant::now() + REUSE_MARGIN
        {
            return Ok(token);
        }
        let issued = self
            .client
            .clone()
            .issue_service_token(pb::IssueServiceTokenRequest {
                service: SERVICE.to_owned(),
                workspace_id: workspace_id.to_owned(),
            })
            .await?
            .into_inner();
        let lifetime = issued
            .expires_at
            .and_then(|at| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                u64::try_from(at.seconds).ok()?.checked_sub(now)
            })
            .unwrap_or(0);
        if let Ok(mut cache) = self.cache.lock() {
            // Tokens of deleted workspaces do not pile up.
            cache.retain(|_, (_, expires)| *expires > Instant::now());
            cache.insert(
                workspace_id.to_owned(),
                (
                    issued.token.clone(),
                    Instant::now() + Duration::from_secs(lifetime),
                ),
            );
        }
        Ok(issued.token)
    }
}
