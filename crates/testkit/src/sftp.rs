//! An SFTP client session carried over k8shelld's `Sftp` gRPC stream.

use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_proto::k8shelld::v1::{SftpRequest, SftpStart, sftp_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Opens an SFTP session as `user` (the workspace user when empty).
pub async fn sftp_session(
    mut client: K8shelldClient<Channel>,
    token: &str,
    user: &str,
) -> anyhow::Result<russh_sftp::client::SftpSession> {
    let (client_end, bridge_end) = tokio::io::duplex(256 * 1024);
    let (tx, rx) = mpsc::channel(64);
    tx.send(SftpRequest {
        msg: Some(sftp_request::Msg::Start(SftpStart {
            user: user.to_owned(),
        })),
    })
    .await?;
    let mut responses = client
        .sftp(crate::bearer(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    let (mut bridge_read, mut bridge_write) = tokio::io::split(bridge_end);
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = bridge_read.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            let message = SftpRequest {
                msg: Some(sftp_request::Msg::Data(buffer[..n].to_vec())),
            };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(message)) = responses.message().await {
            if bridge_write.write_all(&message.data).await.is_err() {
                break;
            }
        }
    });
    Ok(russh_sftp::client::SftpSession::new(client_end).await?)
}
