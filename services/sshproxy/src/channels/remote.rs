//! Remote forwards (`ssh -R`): k8shelld listens on the workspace's
//! loopback (`TcpListen`); each connection to it becomes a
//! `forwarded-tcpip` channel to the client, which connects it on its side.

use std::collections::HashMap;
use std::sync::Arc;

use k8shell_proto::k8shelld::v1 as pb;

use crate::channels::forward::{accept_each, splice_accepted};
use crate::handler::Conn;

/// Starts listening for `-R address:port`; returns the bound port.
pub async fn start(conn: Arc<Conn>, address: String, port: u32) -> Result<u32, String> {
    let decision = conn
        .decide(
            "ssh:tcpip-forward",
            HashMap::from([
                ("host".to_owned(), address.clone()),
                ("port".to_owned(), port.to_string()),
            ]),
        )
        .await;
    if !decision.allow {
        return Err(format!(
            "permission denied: {}",
            decision.reasons.join("; ")
        ));
    }
    let session = conn.session().ok_or("not logged in")?;
    let running = session.gate.wait(|_| {}).await?;
    let client = conn.daemon(&running).await?;
    let mut accepted = client
        .client
        .clone()
        .tcp_listen(client.request(pb::TcpListenRequest {
            host: address.clone(),
            port,
        }))
        .await
        .map_err(|status| status.message().to_owned())?
        .into_inner();
    let bound = match accepted.message().await {
        Ok(Some(first)) => first.port,
        Ok(None) => return Err("k8shelld closed the listener".to_owned()),
        Err(status) => return Err(status.message().to_owned()),
    };
    let stop = conn.closed.child_token();
    conn.remote_forwards()
        .insert((address.clone(), bound), stop.clone());
    accept_each(accepted, stop, move |connection| {
        tokio::spawn(forward_one(
            Arc::clone(&conn),
            client.clone(),
            address.clone(),
            bound,
            connection,
        ));
    });
    Ok(bound)
}

/// Stops the listener of `-R address:port`; false when there is none.
pub fn cancel(conn: &Conn, address: &str, port: u32) -> bool {
    match conn.remote_forwards().remove(&(address.to_owned(), port)) {
        Some(stop) => {
            stop.cancel();
            true
        }
        None => false,
    }
}

async fn forward_one(
    conn: Arc<Conn>,
    client: crate::daemon::DaemonClient,
    address: String,
    port: u32,
    connection: pb::TcpAccepted,
) {
    let Some(handle) = conn.handle().cloned() else {
        return;
    };
    let (peer_host, peer_port) = match connection.peer.parse::<std::net::SocketAddr>() {
        Ok(peer) => (peer.ip().to_string(), u32::from(peer.port())),
        Err(_) => ("127.0.0.1".to_owned(), 0),
    };
    conn.count_channel("tcpip-forward");
    let channel = match handle
        .channel_open_forwarded_tcpip(address, port, peer_host, peer_port)
        .await
    {
        Ok(channel) => channel,
        Err(error) => {
            tracing::info!(session = %conn.id, %error, "the client refused a forwarded connection");
            return;
        }
    };
    splice_accepted(&conn, &client, channel, connection.connection_id).await;
}
