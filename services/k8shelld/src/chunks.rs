//! Reading a byte source into a gRPC response channel, shared by every
//! RPC that relays a process's or a socket's output.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes read per message.
pub const CHUNK: usize = 32 * 1024;

/// Sends what `reader` yields, one message per read, until EOF, a read
/// error (returned, so the caller can tell the client) or the receiver
/// going away.
pub async fn relay<R, T>(
    mut reader: R,
    tx: &mpsc::Sender<Result<T, Status>>,
    wrap: impl Fn(Vec<u8>) -> T,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 || tx.send(Ok(wrap(buffer[..n].to_vec()))).await.is_err() {
            return Ok(());
        }
    }
}
