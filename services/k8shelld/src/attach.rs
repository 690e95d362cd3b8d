//! Attaching a local terminal (`kbox attach`) to a session over the local
//! API: an HTTP upgrade (`Upgrade: k8shell-attach`) after which the server
//! sends raw terminal bytes (the screen snapshot first) and the client sends
//! frames — one type byte, a 4-byte big-endian length, the payload:
//! type 0 input, type 1 resize (rows and columns, 2 bytes each).

use std::sync::Arc;

use k8shell_proto::k8shelld::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

use crate::activity::Activity;
use crate::session::{Session, snapshot_message};

/// The `Upgrade` protocol name.
pub const PROTOCOL: &str = "k8shell-attach";
const MAX_FRAME: usize = 1 << 20;

/// A client frame.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Input(Vec<u8>),
    Resize { rows: u16, cols: u16 },
}

/// Encodes a frame.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let (kind, payload) = match frame {
        Frame::Input(bytes) => (0u8, bytes.clone()),
        Frame::Resize { rows, cols } => (1u8, [rows.to_be_bytes(), cols.to_be_bytes()].concat()),
    };
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads one frame; `None` at EOF or on a malformed frame.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Option<Frame> {
    let kind = reader.read_u8().await.ok()?;
    let len = reader.read_u32().await.ok()? as usize;
    if len > MAX_FRAME {
        return None;
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.ok()?;
    match (kind, payload.as_slice()) {
        (0, _) => Some(Frame::Input(payload)),
        (1, [r0, r1, c0, c1]) => Some(Frame::Resize {
            rows: u16::from_be_bytes([*r0, *r1]),
            cols: u16::from_be_bytes([*c0, *c1]),
        }),
        _ => None,
    }
}

/// Pumps a session to and from an upgraded connection until the session
/// ends, the client leaves, or the client is detached.
pub async fn pump<IO>(session: Arc<Session>, read_only: bool, io: IO, activity: Activity)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut attachment = session.attach(read_only);
    let client = attachment.client;
    let (mut reader, mut writer) = tokio::io::split(io);
    let (frames_tx, mut frames) = mpsc::channel(64);
    // Frames are read on their own task: a partly read frame must not be
    // dropped when the output branch wins the select below.
    let reader_task = tokio::spawn(async move {
        while let Some(frame) = read_frame(&mut reader).await {
            if frames_tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    if writer.write_all(&attachment.snapshot).await.is_ok() {
        loop {
            tokio::select! {
                biased;
                output = attachment.output.recv() => match output {
                    Ok(bytes) => {
                        if writer.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        attachment.output = attachment.output.resubscribe();
                        if writer.write_all(&snapshot_message(&session)).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                changed = attachment.exit.changed() => {
                    let status: Option<pb::ExitStatus> = attachment.exit.borrow().clone();
                    if changed.is_err() || status.is_some() {
                        while let Ok(bytes) = attachment.output.try_recv() {
                            let _ = writer.write_all(&bytes).await;
                        }
                        let code = status.and_then(|s| s.code).map_or("?".to_owned(), |c| c.to_string());
                        let _ = writer.write_all(format!("\r\n[session ended: exit {code}]\r\n").as_bytes()).await;
                        break;
                    }
                }
                notice = attachment.control.recv() => {
                    if let Ok(notice) = notice
                        && notice.client.is_none_or(|c| c == client)
                    {
                        let _ = writer.write_all(format!("\r\n[detached: {}]\r\n", notice.reason).as_bytes()).await;
                        break;
                    }
                }
                frame = frames.recv() => match frame {
                    Some(Frame::Input(bytes)) if session.is_writer(client) => {
                        activity.touch();
                        if session.write(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Frame::Resize { rows, cols }) if session.is_writer(client) => {
                        let size = pb::TerminalSize { rows: rows.into(), cols: cols.into() };
                        let _ = session.resize(&size).await;
                    }
                    Some(_) => {} // observers cannot write
                    None => break, // the client left
                },
            }
        }
    }
    let _ = writer.shutdown().await;
    reader_task.abort();
    session.detach(client);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_garbage_ends_the_stream() {
        let frames = [
            Frame::Input(b"ls\r".to_vec()),
            Frame::Resize {
                rows: 50,
                cols: 132,
            },
        ];
        let mut bytes = Vec::new();
        for frame in &frames {
            bytes.extend(encode(frame));
        }
        bytes.extend([7u8, 0, 0, 0, 0]);
        let mut reader = bytes.as_slice();
        assert_eq!(
            read_frame(&mut reader).await,
            Some(Frame::Input(b"ls\r".to_vec()))
        );
        assert_eq!(
            read_frame(&mut reader).await,
            Some(Frame::Resize {
                rows: 50,
                cols: 132
            })
        );
        assert_eq!(read_frame(&mut reader).await, None, "unknown frame type");
    }
}
