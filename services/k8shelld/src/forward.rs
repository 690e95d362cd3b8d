//! `PortForward`: TCP to the workspace's own loopback, nowhere else.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use k8shell_proto::k8shelld::v1::{self as pb, port_forward_request};
use tokio::io::AsyncWriteExt;

use crate::chunks;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

pub type ForwardStream =
    tokio_stream::wrappers::ReceiverStream<Result<pb::PortForwardResponse, Status>>;

/// Resolves the destination, refusing anything but loopback. Names other
/// than `localhost` are refused rather than resolved, so DNS cannot be used
/// to reach elsewhere.
pub fn destination(start: &pb::PortForwardStart) -> Result<SocketAddr, Status> {
    let port = u16::try_from(start.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("invalid port {}", start.port)))?;
    let host = start.host.trim();
    let ip = match host {
        "" | "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => other
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| {
                Status::permission_denied(format!(
                    "only loopback destinations are allowed, not {other:?}"
                ))
            })?,
    };
    if !ip.is_loopback() {
        return Err(Status::permission_denied(format!(
            "only loopback destinations are allowed, not {ip}"
        )));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Connects and pumps bytes both ways until either side closes.
pub async fn forward(
    mut requests: Streaming<pb::PortForwardRequest>,
) -> Result<ForwardStream, Status> {
    let Some(port_forward_request::Msg::Start(start)) =
        requests.message().await?.and_then(|r| r.msg)
    else {
        return Err(Status::invalid_argument(
            "the first PortForwardRequest must be `start`",
        ));
    };
    let address = destination(&start)?;
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {address}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            match request.msg {
                Some(port_forward_request::Msg::Data(bytes)) => {
                    if let Err(error) = writer.write_all(&bytes).await {
                        tracing::debug!(%error, "forwarded connection closed by the workspace side");
                        return;
                    }
                }
                Some(port_forward_request::Msg::CloseWrite(true)) => {
                    let _ = writer.shutdown().await;
                }
                _ => {}
            }
        }
        let _ = writer.shutdown().await;
    });
    tokio::spawn(async move {
        let relayed = chunks::relay(reader, &tx, |data| pb::PortForwardResponse { data }).await;
        if let Err(error) = relayed {
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "connection lost: {error}"
                ))))
                .await;
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn start(host: &str, port: u32) -> pb::PortForwardStart {
        pb::PortForwardStart {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn only_loopback_is_allowed() {
        for ok in ["", "localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert!(destination(&start(ok, 80)).is_ok(), "{ok}");
        }
        for denied in [
            "10.0.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "example.com",
            "::",
            "2001:db8::1",
            "localhost.evil",
        ] {
            assert_eq!(
                destination(&start(denied, 80)).unwrap_err().code(),
                Code::PermissionDenied,
                "{denied}"
            );
        }
        assert_eq!(
            destination(&start("127.0.0.1", 0)).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            destination(&start("127.0.0.1", 70000)).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
