//! Byte-stream channels: `direct-tcpip` (`ssh -L`, `ssh -W`, ProxyJump)
//! and `direct-streamlocal@openssh.com` (unix sockets), each spliced onto
//! a k8shelld stream; and the splice itself, which agent forwarding uses
//! too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use k8shell_proto::k8shelld::v1 as pb;
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure, ChannelStream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::handler::{ChannelSlot, Conn};

/// Where a forward goes, inside the workspace.
pub enum Destination {
    /// A TCP port on the workspace's loopback.
    Tcp {
        /// Host as the client named it.
        host: String,
        /// Port.
        port: u32,
    },
    /// A unix socket.
    Unix {
        /// Its path.
        path: String,
    },
}

impl Destination {
    fn action(&self) -> &'static str {
        match self {
            Self::Tcp { .. } => "ssh:direct-tcpip",
            Self::Unix { .. } => "ssh:direct-streamlocal",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Tcp { .. } => "direct-tcpip",
            Self::Unix { .. } => "direct-streamlocal",
        }
    }

    fn context(&self) -> HashMap<String, String> {
        match self {
            Self::Tcp { host, port } => HashMap::from([
                ("host".to_owned(), host.clone()),
                ("port".to_owned(), port.to_string()),
            ]),
            Self::Unix { path } => HashMap::from([("path".to_owned(), path.clone())]),
        }
    }
}

/// Decides, opens the k8shelld stream, then accepts the channel (or
/// refuses it with a reason) and splices the two until either side ends.
pub async fn run(
    conn: Arc<Conn>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    destination: Destination,
    _slot: ChannelSlot,
) {
    conn.count_channel(destination.kind());
    let decision = conn
        .decide(destination.action(), destination.context())
        .await;
    if !decision.allow {
        tracing::info!(session = %conn.id, action = destination.action(), reasons = ?decision.reasons, "forward refused by policy");
        reply
            .reject(ChannelOpenFailure::Other {
                code: 1,
                reason: format!("permission denied: {}", decision.reasons.join("; ")),
            })
            .await;
        return;
    }
    let Some(session) = conn.session() else {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    };
    let running = match session.gate.wait(|_| {}).await {
        Ok(running) => running,
        Err(reason) => {
            reply
                .reject(ChannelOpenFailure::Other { code: 2, reason })
                .await;
            return;
        }
    };
    let client = match conn.daemon(&running).await {
        Ok(client) => client,
        Err(reason) => {
            reply
                .reject(ChannelOpenFailure::Other { code: 2, reason })
                .await;
            return;
        }
    };
    let result = match &destination {
        Destination::Tcp { host, port } => {
            let first = pb::PortForwardRequest {
                msg: Some(pb::port_forward_request::Msg::Start(pb::PortForwardStart {
                    host: host.clone(),
                    port: *port,
                })),
            };
            let (requests, stream) = open_stream(first);
            match client
                .client
                .clone()
                .port_forward(client.request(stream))
                .await
            {
                Ok(responses) => {
                    reply.accept().await;
                    let responses = responses.into_inner();
                    splice(
                        &conn,
                        channel.into_stream(),
                        requests,
                        |data| pb::PortForwardRequest {
                            msg: Some(pb::port_forward_request::Msg::Data(data.to_vec())),
                        },
                        Some(pb::PortForwardRequest {
                            msg: Some(pb::port_forward_request::Msg::CloseWrite(true)),
                        }),
                        responses,
                        |r: pb::PortForwardResponse| r.data,
                    )
                    .await;
                    Ok(())
                }
                Err(status) => Err(status),
            }
        }
        Destination::Unix { path } => {
            let first = pb::UnixSocketDialRequest {
                msg: Some(pb::unix_socket_dial_request::Msg::Path(path.clone())),
            };
            let (requests, stream) = open_stream(first);
            match client
                .client
                .clone()
                .unix_socket_dial(client.request(stream))
                .await
            {
                Ok(responses) => {
                    reply.accept().await;
                    splice(
                        &conn,
                        channel.into_stream(),
                        requests,
                        |data| pb::UnixSocketDialRequest {
                            msg: Some(pb::unix_socket_dial_request::Msg::Data(data.to_vec())),
                        },
                        Some(pb::UnixSocketDialRequest {
                            msg: Some(pb::unix_socket_dial_request::Msg::CloseWrite(true)),
                        }),
                        responses.into_inner(),
                        |r: pb::UnixSocketData| r.data,
                    )
                    .await;
                    Ok(())
                }
                Err(status) => Err(status),
            }
        }
    };
    // The reply was not sent yet when the RPC failed (it owns the handle).
    if let Err(status) = result {
        tracing::info!(session = %conn.id, action = destination.action(), error = %status.message(), "forward failed");
    }
}

/// A request stream whose first message is `first`.
pub fn open_stream<T: Send + 'static>(first: T) -> (mpsc::Sender<T>, ReceiverStream<T>) {
    let (sender, receiver) = mpsc::channel(32);
    // A fresh channel has room for the first message.
    let _ = sender.try_send(first);
    (sender, ReceiverStream::new(receiver))
}

/// Copies bytes both ways between an SSH channel and a k8shelld stream
/// until both directions have ended. The client's EOF becomes
/// `close_write`; the end of the k8shelld stream becomes EOF and close.
pub async fn splice<Req, Resp>(
    conn: &Conn,
    channel: ChannelStream<Msg>,
    requests: mpsc::Sender<Req>,
    data: impl Fn(Bytes) -> Req,
    close_write: Option<Req>,
    mut responses: tonic::Streaming<Resp>,
    payload: impl Fn(Resp) -> Vec<u8>,
) where
    Req: Send + 'static,
{
    let (mut from_client, mut to_client) = tokio::io::split(channel);
    let upstream = async {
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    conn.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    if requests
                        .send(data(Bytes::copy_from_slice(&buffer[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        if let Some(close) = close_write {
            let _ = requests.send(close).await;
        }
        // Keep the request stream open: ending it would end the call.
        conn.closed.cancelled().await;
    };
    let downstream = async {
        loop {
            match responses.message().await {
                Ok(Some(message)) => {
                    let bytes = payload(message);
                    conn.bytes_out
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if to_client.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(session = %conn.id, error = %status.message(), "stream ended");
                    break;
                }
            }
        }
        let _ = to_client.shutdown().await;
    };
    // The forward is over when the workspace side ends; the client side
    // may still be open (it gets EOF, then the channel closes on drop).
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// Hands each connection k8shelld accepts on a listener (`-R`, agent
/// sockets) to `each`, until `stop` or the listener ends.
pub fn accept_each<T: Send + 'static>(
    mut accepted: tonic::Streaming<T>,
    stop: tokio_util::sync::CancellationToken,
    mut each: impl FnMut(T) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = accepted.message() => next,
            };
            let Ok(Some(connection)) = next else {
                return;
            };
            each(connection);
        }
    });
}

/// Claims connection `connection_id` (accepted by k8shelld's
/// `UnixSocketListen` or `TcpListen`) and splices it onto `channel`.
pub async fn splice_accepted(
    conn: &Conn,
    client: &crate::daemon::DaemonClient,
    channel: Channel<Msg>,
    connection_id: String,
) {
    let first = pb::UnixSocketAcceptRequest {
        msg: Some(pb::unix_socket_accept_request::Msg::ConnectionId(
            connection_id,
        )),
    };
    let (requests, stream) = open_stream(first);
    let responses = match client
        .client
        .clone()
        .unix_socket_accept(client.request(stream))
        .await
    {
        Ok(responses) => responses.into_inner(),
        Err(status) => {
            tracing::info!(session = %conn.id, error = %status.message(), "a forwarded connection was lost");
            return;
        }
    };
    splice(
        conn,
        channel.into_stream(),
        requests,
        |data| pb::UnixSocketAcceptRequest {
            msg: Some(pb::unix_socket_accept_request::Msg::Data(data.to_vec())),
        },
        Some(pb::UnixSocketAcceptRequest {
            msg: Some(pb::unix_socket_accept_request::Msg::CloseWrite(true)),
        }),
        responses,
        |r: pb::UnixSocketData| r.data,
    )
    .await;
}
