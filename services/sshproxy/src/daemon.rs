//! Connections to k8shelld, pooled per workspace: one HTTP/2 channel per
//! endpoint carries every RPC of every SSH connection to that workspace.
//! Each call carries a workspace token identity issued for the user (so
//! k8shelld sees who is acting); tokens are cached until shortly before
//! they expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8shell_proto::identity::v1 as identity;
use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_service::daemon_channel::{
    DaemonClientTls, DaemonEndpoint, DaemonEndpointError, bearer,
};
use tonic::transport::Channel;

use crate::backends::Backends;

/// A token is renewed when it has less than this left.
const RENEW_BEFORE: Duration = Duration::from_secs(30);

/// k8shelld could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The endpoint is not one the proxy can dial.
    #[error("{0}")]
    Endpoint(#[from] DaemonEndpointError),
    /// identity refused a workspace token.
    #[error("no workspace token: {0}")]
    Token(String),
}

#[derive(Clone)]
struct CachedToken {
    value: String,
    renew_at: SystemTime,
}

/// The pool.
#[derive(Clone, Default)]
pub struct DaemonPool {
    channels: Arc<Mutex<HashMap<String, (String, Channel)>>>,
    tokens: Arc<Mutex<HashMap<(String, String), CachedToken>>>,
    /// Presented to `https://` endpoints.
    tls: Option<Arc<DaemonClientTls>>,
}

/// A client of one workspace's k8shelld, with the user's token.
#[derive(Clone)]
pub struct DaemonClient {
    /// The gRPC client.
    pub client: K8shelldClient<Channel>,
    token: String,
}

impl DaemonClient {
    /// Wraps `message` with the token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        bearer(message, &self.token)
    }
}

/// A lazily connected channel: the first call connects, later ones
/// reconnect after failures.
fn channel(endpoint: &str, tls: Option<&DaemonClientTls>) -> Result<Channel, DaemonError> {
    Ok(DaemonEndpoint::new(endpoint, tls)?
        .configure(|e| {
            // Output arrives in 32 KiB messages: one HTTP/2 frame each
            // instead of two at the default 16 KiB.
            e.connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .max_frame_size(64 * 1024)
        })
        .lazy())
}

impl DaemonPool {
    /// An empty pool; `tls` is presented to `https://` endpoints.
    pub fn new(tls: Option<DaemonClientTls>) -> Self {
        Self {
            tls: tls.map(Arc::new),
            ..Self::default()
        }
    }

    /// A client of `workspace`'s k8shelld at `endpoint`, acting for the
    /// holder of `user_token`.
    pub async fn client(
        &self,
        backends: &Backends,
        workspace: &str,
        endpoint: &str,
        username: &str,
        user_token: &str,
    ) -> Result<DaemonClient, DaemonError> {
        let channel = {
            let mut channels = self
                .channels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match channels.get(workspace) {
                // A restarted workspace may have a new endpoint.
                Some((known, channel)) if known == endpoint => channel.clone(),
                _ => {
                    let fresh = channel(endpoint, self.tls.as_deref())?;
                    channels.insert(workspace.to_owned(), (endpoint.to_owned(), fresh.clone()));
                    fresh
                }
            }
        };
        let token = self
            .token(backends, workspace, username, user_token)
            .await?;
        Ok(DaemonClient {
            client: K8shelldClient::new(channel)
                .max_decoding_message_size(8 << 20)
                .max_encoding_message_size(8 << 20),
            token,
        })
    }

    async fn token(
        &self,
        backends: &Backends,
        workspace: &str,
        username: &str,
        user_token: &str,
    ) -> Result<String, DaemonError> {
        let key = (username.to_owned(), workspace.to_owned());
        let now = SystemTime::now();
        if let Some(cached) = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .filter(|t| t.renew_at > now)
            .cloned()
        {
            return Ok(cached.value);
        }
        let issued = backends
            .identity
            .clone()
            .issue_workspace_token(identity::IssueWorkspaceTokenRequest {
                token: user_token.to_owned(),
                workspace_id: workspace.to_owned(),
            })
            .await
            .map_err(|status| DaemonError::Token(status.message().to_owned()))?
            .into_inner();
        let expires_at = issued
            .expires_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(now + Duration::from_secs(60));
        let renew_at = expires_at.checked_sub(RENEW_BEFORE).unwrap_or(expires_at);
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Expired entries go whenever a new one comes.
        tokens.retain(|_, t| t.renew_at > now);
        tokens.insert(
            key,
            CachedToken {
                value: issued.token.clone(),
                renew_at,
            },
        );
        Ok(issued.token)
    }
}
