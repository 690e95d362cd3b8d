//! ssh-agent forwarding (`ssh -A`): k8shelld listens on a unix socket in
//! the workspace for as long as the session channel lives; each connection
//! to it becomes an `auth-agent@openssh.com` channel to the client, whose
//! agent answers. The session gets `SSH_AUTH_SOCK`.

use std::sync::Arc;

use k8shell_proto::k8shelld::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::channels::forward::{accept_each, splice_accepted};
use crate::daemon::DaemonClient;
use crate::handler::Conn;

/// The socket path for `channel` of `conn` (in the workspace's /tmp, in a
/// directory only the workspace user can enter).
pub fn socket_path(conn: &Conn, channel: russh::ChannelId) -> String {
    let short = conn.id.trim_start_matches("ses_");
    let short = &short[short.len().saturating_sub(12)..];
    format!("/tmp/k8shell-ssh-{short}/agent.{channel}")
}

/// Listens at `path` until `stop`; forwards each connection to the
/// client's agent. Returns once the listener is up (or failed).
pub async fn listen(
    conn: Arc<Conn>,
    client: DaemonClient,
    path: String,
    user: String,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut accepted = client
        .client
        .clone()
        .unix_socket_listen(client.request(pb::UnixSocketListenRequest {
            path: path.clone(),
            user,
        }))
        .await
        .map_err(|status| status.message().to_owned())?
        .into_inner();
    // The first message says the socket listens.
    match accepted.message().await {
        Ok(Some(_)) => {}
        Ok(None) => return Err("k8shelld closed the agent listener".to_owned()),
        Err(status) => return Err(status.message().to_owned()),
    }
    accept_each(accepted, stop, move |connection| {
        let conn = Arc::clone(&conn);
        let client = client.clone();
        tokio::spawn(async move {
            let Some(handle) = conn.handle().cloned() else {
                return;
            };
            let channel = match handle.channel_open_agent().await {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::info!(session = %conn.id, %error, "the client refused an agent channel");
                    return;
                }
            };
            splice_accepted(&conn, &client, channel, connection.connection_id).await;
        });
    });
    Ok(())
}
