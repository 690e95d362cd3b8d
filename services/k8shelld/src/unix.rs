//! Unix socket forwarding in both directions, and loopback TCP listeners
//! (`ssh -R`).
//!
//! Dialing is a plain byte stream. Listening needs two RPCs because gRPC has
//! no server-initiated streams: `UnixSocketListen` / `TcpListen` report each
//! accepted connection by id, and the caller opens `UnixSocketAccept` to
//! carry it. Unclaimed connections are dropped after 10 s.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8shell_proto::k8shelld::v1::{
    self as pb, unix_socket_accept_request, unix_socket_dial_request,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::chunks;
use crate::session::lock;
use crate::users;

const CLAIM_WITHIN: Duration = Duration::from_secs(10);

pub type DataStream = tokio_stream::wrappers::ReceiverStream<Result<pb::UnixSocketData, Status>>;
pub type AcceptedStream =
    tokio_stream::wrappers::ReceiverStream<Result<pb::UnixSocketAccepted, Status>>;

/// A connection accepted by a listener.
pub enum Accepted {
    /// On a unix socket (`UnixSocketListen`).
    Unix(UnixStream),
    /// On a loopback TCP port (`TcpListen`).
    Tcp(tokio::net::TcpStream),
}

/// Accepted connections waiting to be claimed.
#[derive(Clone, Default)]
pub struct Pending {
    connections: Arc<Mutex<HashMap<String, Accepted>>>,
}

impl Pending {
    /// Parks `connection` for [`CLAIM_WITHIN`]; returns its id.
    fn park(&self, connection: Accepted) -> String {
        let id = uuid::Uuid::now_v7().simple().to_string();
        lock(&self.connections).insert(id.clone(), connection);
        let expire = self.clone();
        let expiring = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLAIM_WITHIN).await;
            if lock(&expire.connections).remove(&expiring).is_some() {
                tracing::info!(connection = %expiring, "unclaimed connection dropped");
            }
        });
        id
    }
}

fn absolute(path: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(path);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Status::invalid_argument(
            "the socket path must be absolute, without `..`",
        ));
    }
    Ok(path)
}

/// Pumps bytes between a gRPC request stream and a socket until both ends close.
fn pump<R, W, Q>(
    mut requests: Streaming<Q>,
    reader: R,
    mut writer: W,
    classify: fn(Q) -> Option<Result<Vec<u8>, ()>>,
) -> DataStream
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    Q: Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            match classify(request) {
                Some(Ok(bytes)) => {
                    if let Err(error) = writer.write_all(&bytes).await {
                        tracing::debug!(%error, "unix socket closed by the workspace side");
                        return;
                    }
                }
                Some(Err(())) => {
                    let _ = writer.shutdown().await;
                }
                None => {}
            }
        }
        let _ = writer.shutdown().await;
    });
    tokio::spawn(async move {
        let _ = chunks::relay(reader, &tx, |data| pb::UnixSocketData { data }).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn dial_message(request: pb::UnixSocketDialRequest) -> Option<Result<Vec<u8>, ()>> {
    match request.msg {
        Some(unix_socket_dial_request::Msg::Data(bytes)) => Some(Ok(bytes)),
        Some(unix_socket_dial_request::Msg::CloseWrite(true)) => Some(Err(())),
        _ => None,
    }
}

fn accept_message(request: pb::UnixSocketAcceptRequest) -> Option<Result<Vec<u8>, ()>> {
    match request.msg {
        Some(unix_socket_accept_request::Msg::Data(bytes)) => Some(Ok(bytes)),
        Some(unix_socket_accept_request::Msg::CloseWrite(true)) => Some(Err(())),
        _ => None,
    }
}

/// `UnixSocketDial`.
pub async fn dial(
    mut requests: Streaming<pb::UnixSocketDialRequest>,
) -> Result<DataStream, Status> {
    let Some(unix_socket_dial_request::Msg::Path(path)) =
        requests.message().await?.and_then(|r| r.msg)
    else {
        return Err(Status::invalid_argument(
            "the first UnixSocketDialRequest must be `path`",
        ));
    };
    let path = absolute(&path)?;
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {}: {e}", path.display())))?;
    let (reader, writer) = stream.into_split();
    Ok(pump(requests, reader, writer, dial_message))
}

fn prepare_socket_path(path: &Path, account: &users::Account) -> Result<(), Status> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| Status::internal(format!("{what}: {e}"))
    };
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(io("cannot create the socket directory"))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
            .map_err(io("cannot restrict the socket directory"))?;
        let _ = nix::unistd::chown(parent, Some(account.uid), Some(account.gid));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(io("cannot replace the old socket"))?;
        }
        Ok(_) => {
            return Err(Status::already_exists(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        Err(_) => {}
    }
    Ok(())
}

/// `UnixSocketListen`.
pub fn listen(
    request: pb::UnixSocketListenRequest,
    default_user: &str,
    pending: Pending,
) -> Result<AcceptedStream, Status> {
    let path = absolute(&request.path)?;
    let account = users::resolve(&request.user, default_user)?;
    prepare_socket_path(&path, &account)?;
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| Status::internal(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Status::internal(format!("cannot restrict {}: {e}", path.display())))?;
    let _ = nix::unistd::chown(&path, Some(account.uid), Some(account.gid));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        if tx
            .send(Ok(pb::UnixSocketAccepted::default()))
            .await
            .is_err()
        {
            let _ = std::fs::remove_file(&path);
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let id = pending.park(Accepted::Unix(stream));
                    if tx.send(Ok(pb::UnixSocketAccepted { connection_id: id })).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The listener lives exactly as long as the stream.
        let _ = std::fs::remove_file(&path);
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `UnixSocketAccept`.
pub async fn accept(
    mut requests: Streaming<pb::UnixSocketAcceptRequest>,
    pending: Pending,
) -> Result<DataStream, Status> {
    let Some(unix_socket_accept_request::Msg::ConnectionId(id)) =
        requests.message().await?.and_then(|r| r.msg)
    else {
        return Err(Status::invalid_argument(
            "the first UnixSocketAcceptRequest must be `connection_id`",
        ));
    };
    let connection = lock(&pending.connections)
        .remove(&id)
        .ok_or_else(|| Status::not_found(format!("no pending connection {id}")))?;
    Ok(match connection {
        Accepted::Unix(stream) => {
            let (reader, writer) = stream.into_split();
            pump(requests, reader, writer, accept_message)
        }
        Accepted::Tcp(stream) => {
            let (reader, writer) = stream.into_split();
            pump(requests, reader, writer, accept_message)
        }
    })
}

pub type TcpAcceptedStream =
    tokio_stream::wrappers::ReceiverStream<Result<pb::TcpAccepted, Status>>;

/// The loopback address `host` names; anything else is refused (a
/// workspace's listeners stay inside it).
fn loopback(host: &str) -> Result<std::net::IpAddr, Status> {
    match host {
        "" | "localhost" | "127.0.0.1" => Ok(std::net::Ipv4Addr::LOCALHOST.into()),
        "::1" | "[::1]" => Ok(std::net::Ipv6Addr::LOCALHOST.into()),
        other => Err(Status::permission_denied(format!(
            "listening on {other} is not allowed: only the workspace's loopback"
        ))),
    }
}

/// `TcpListen`.
pub async fn tcp_listen(
    request: pb::TcpListenRequest,
    pending: Pending,
) -> Result<TcpAcceptedStream, Status> {
    let address = loopback(&request.host)?;
    let port = u16::try_from(request.port)
        .map_err(|_| Status::invalid_argument(format!("port {} is out of range", request.port)))?;
    let listener = tokio::net::TcpListener::bind((address, port))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                Status::already_exists(format!("{address} port {port} is in use"))
            }
            _ => Status::internal(format!("cannot listen on {address} port {port}: {e}")),
        })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Status::internal(e.to_string()))?
        .port();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let first = pb::TcpAccepted {
            port: u32::from(bound),
            ..Default::default()
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, peer)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    let id = pending.park(Accepted::Tcp(stream));
                    let message = pb::TcpAccepted {
                        connection_id: id,
                        port: u32::from(bound),
                        peer: peer.to_string(),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
