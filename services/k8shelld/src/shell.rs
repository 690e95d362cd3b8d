//! `Shell`: start or attach, then pump output out and keystrokes in.

use std::sync::Arc;

use k8shell_proto::k8shelld::v1::{self as pb, shell_request, shell_response};
use tokio::sync::{broadcast, mpsc};
use tonic::{Status, Streaming};

use crate::activity::Activity;
use crate::auth::Caller;
use crate::session::{Attachment, Session, Sessions, snapshot_message};
use crate::signals;

pub type ShellStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ShellResponse, Status>>;

fn message(msg: shell_response::Msg) -> Result<pb::ShellResponse, Status> {
    Ok(pb::ShellResponse { msg: Some(msg) })
}

/// Handles one Shell stream.
pub async fn shell(
    mut requests: Streaming<pb::ShellRequest>,
    caller: Caller,
    sessions: Sessions,
    activity: Activity,
) -> Result<ShellStream, Status> {
    let first = requests
        .message()
        .await?
        .and_then(|r| r.msg)
        .ok_or_else(|| {
            Status::invalid_argument("the first ShellRequest must be `start` or `attach`")
        })?;
    let (session, attachment, is_new) = match first {
        shell_request::Msg::Start(start) => {
            let session = sessions.spawn(&caller.subject, &start)?;
            tracing::info!(session = %session.id, owner = %caller.subject, argv = ?session.argv, "shell started");
            let attachment = session.attach(false);
            (session, attachment, true)
        }
        shell_request::Msg::Attach(attach) => {
            let session = sessions
                .get(&attach.session_id)
                .ok_or_else(|| Status::not_found(format!("no session {}", attach.session_id)))?;
            if session.owner != caller.subject {
                return Err(Status::permission_denied(
                    "the session belongs to another user",
                ));
            }
            let attachment = session.attach(attach.read_only);
            if let Some(size) = attach.size.filter(|_| !attach.read_only) {
                session.resize(&size).await?;
            }
            (session, attachment, false)
        }
        _ => {
            return Err(Status::invalid_argument(
                "the first ShellRequest must be `start` or `attach`",
            ));
        }
    };
    let (tx, rx) = mpsc::channel(256);
    let _ = tx
        .send(message(shell_response::Msg::Session(session.info())))
        .await;
    if !is_new {
        let _ = tx
            .send(message(shell_response::Msg::Snapshot(
                attachment.snapshot.clone(),
            )))
            .await;
    }
    tokio::spawn(pump(session, attachment, requests, tx, activity));
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn pump(
    session: Arc<Session>,
    mut attachment: Attachment,
    mut requests: Streaming<pb::ShellRequest>,
    tx: mpsc::Sender<Result<pb::ShellResponse, Status>>,
    activity: Activity,
) {
    let client = attachment.client;
    loop {
        tokio::select! {
            biased;
            output = attachment.output.recv() => match output {
                Ok(bytes) => {
                    if tx.send(message(shell_response::Msg::Output(bytes.to_vec()))).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Too slow to follow: redraw from the emulator instead of
                    // the missed bytes.
                    tracing::debug!(session = %session.id, missed, "client lagged; resending the screen");
                    attachment.output = attachment.output.resubscribe();
                    let redraw = snapshot_message(&session);
                    if tx.send(message(shell_response::Msg::Snapshot(redraw))).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            changed = attachment.exit.changed() => {
                let status = attachment.exit.borrow().clone();
                if changed.is_err() || status.is_some() {
                    // Output printed before the exit is already queued.
                    while let Ok(bytes) = attachment.output.try_recv() {
                        let _ = tx.send(message(shell_response::Msg::Output(bytes.to_vec()))).await;
                    }
                    let _ = tx.send(message(shell_response::Msg::Exit(status.unwrap_or_default()))).await;
                    break;
                }
            }
            notice = attachment.control.recv() => {
                if let Ok(notice) = notice
                    && notice.client.is_none_or(|c| c == client)
                {
                    let _ = tx.send(message(shell_response::Msg::Detached(notice.reason.to_owned()))).await;
                    break;
                }
            }
            request = requests.message() => {
                let Ok(Some(request)) = request else {
                    break; // the client left: detach, the session lives on
                };
                if let Err(status) = handle(&session, client, request, &activity).await {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            }
        }
    }
    session.detach(client);
}

async fn handle(
    session: &Session,
    client: u64,
    request: pb::ShellRequest,
    activity: &Activity,
) -> Result<(), Status> {
    let writes = matches!(
        request.msg,
        Some(
            shell_request::Msg::Input(_)
                | shell_request::Msg::Resize(_)
                | shell_request::Msg::Signal(_)
        )
    );
    if writes && !session.is_writer(client) {
        return Err(Status::permission_denied(
            "this client observes the session and cannot write",
        ));
    }
    match request.msg {
        Some(shell_request::Msg::Input(bytes)) => {
            activity.touch();
            session
                .write(&bytes)
                .await
                .map_err(|e| Status::unavailable(format!("the terminal is gone: {e}")))?;
        }
        Some(shell_request::Msg::Resize(size)) => session.resize(&size).await?,
        Some(shell_request::Msg::Signal(name)) => session.signal(signals::parse(&name)?),
        Some(shell_request::Msg::Start(_) | shell_request::Msg::Attach(_)) => {
            return Err(Status::invalid_argument(
                "start and attach are only valid as the first request",
            ));
        }
        None => {}
    }
    Ok(())
}
