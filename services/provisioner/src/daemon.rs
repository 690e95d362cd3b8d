//! Talking to k8shelld in a workspace: is it answering, and how idle is it.

use std::time::{Duration, SystemTime};

use k8shell_proto::k8shelld::v1 as pb;
use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_service::daemon_channel::{DaemonClientTls, DaemonEndpoint};
use tonic::transport::Channel;

use crate::runtime::Runtime;
use crate::tokens::WorkspaceTokens;

/// k8shelld did not answer.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Connecting failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The call failed.
    #[error("k8shelld: {0}")]
    Call(#[from] tonic::Status),
    /// No token could be had.
    #[error("cannot get a workspace token: {0}")]
    Token(#[from] crate::tokens::TokenError),
}

/// What k8shelld reports for idle detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    /// Last user input, if any.
    pub last_input: Option<SystemTime>,
    /// PTY sessions alive (attached or not).
    pub open_sessions: u32,
    /// Clients attached to them.
    pub attached_clients: u32,
}

/// A channel to the k8shelld at `endpoint`, connected now, with `timeout`
/// for connecting and for each call; `tls` is presented to `https://` ones.
pub async fn connect(
    endpoint: &str,
    tls: Option<&DaemonClientTls>,
    timeout: Duration,
) -> Result<Channel, String> {
    DaemonEndpoint::new(endpoint, tls)
        .map_err(|e| e.to_string())?
        .configure(|e| e.connect_timeout(timeout).timeout(timeout))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// Asks k8shelld at `endpoint` for its activity, with a fresh token.
pub async fn activity(
    runtime: &dyn Runtime,
    endpoint: &str,
    workspace_id: &str,
    tokens: &WorkspaceTokens,
    timeout: Duration,
) -> Result<Activity, DaemonError> {
    let token = tokens.token(workspace_id).await?;
    let channel = runtime
        .daemon_channel(endpoint, timeout)
        .await
        .map_err(DaemonError::Connect)?;
    let mut client = K8shelldClient::new(channel);
    let mut request = tonic::Request::new(pb::GetActivityRequest {});
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    let reply = client.get_activity(request).await?.into_inner();
    Ok(Activity {
        last_input: reply.last_input_at.and_then(|t| {
            let seconds = u64::try_from(t.seconds).ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, t.nanos.max(0) as u32))
        }),
        open_sessions: reply.open_sessions,
        attached_clients: reply.attached_clients,
    })
}

/// Gives k8shelld at `endpoint` a new set of trusted keys.
pub async fn update_jwks(
    runtime: &dyn Runtime,
    endpoint: &str,
    workspace_id: &str,
    tokens: &WorkspaceTokens,
    jwks: &str,
    timeout: Duration,
) -> Result<(), DaemonError> {
    let token = tokens.token(workspace_id).await?;
    let channel = runtime
        .daemon_channel(endpoint, timeout)
        .await
        .map_err(DaemonError::Connect)?;
    let mut client = K8shelldClient::new(channel);
    let mut request = tonic::Request::new(pb::UpdateJwksRequest {
        jwks: jwks.to_owned(),
    });
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    client.update_jwks(request).await?;
    Ok(())
}
