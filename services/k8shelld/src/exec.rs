//! `Exec`: a process without a PTY; stdin, stdout and stderr kept apart.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use k8shell_proto::k8shelld::v1::{self as pb, exec_request, exec_response};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::activity::Activity;
use crate::pid1::Children;
use crate::{chunks, signals, users};

pub type ExecStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ExecResponse, Status>>;

/// Starts the process described by the first request and streams its
/// output; returns once the process runs.
pub async fn exec(
    mut requests: Streaming<pb::ExecRequest>,
    default_user: &str,
    activity: Activity,
    children: Children,
) -> Result<ExecStream, Status> {
    let Some(exec_request::Msg::Start(start)) = requests.message().await?.and_then(|r| r.msg)
    else {
        return Err(Status::invalid_argument(
            "the first ExecRequest must be `start`",
        ));
    };
    let account = users::resolve(&start.user, default_user)?;
    let argv = account.program(&start.argv, &start.command)?;
    let Some((program, args)) = argv.split_first() else {
        return Err(Status::invalid_argument("argv must not be empty"));
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(users::base_env(&account))
        .envs(&start.env)
        .current_dir(if start.working_dir.is_empty() {
            account.home.clone()
        } else {
            start.working_dir.clone().into()
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a signal reaches its children too.
        .process_group(0)
        .kill_on_drop(true);
    if account.uid != nix::unistd::Uid::effective() {
        command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
    }
    let mut child = command.spawn().map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(format!("{program}: command not found")),
        std::io::ErrorKind::PermissionDenied => {
            Status::permission_denied(format!("{program}: permission denied"))
        }
        _ => Status::internal(format!("{program}: cannot start: {error}")),
    })?;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    if let Some(pid) = pid {
        children.add(pid);
    }
    let (tx, rx) = mpsc::channel(64);

    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut stdin = child.stdin.take();
    let out_task = tokio::spawn(pump(stdout, tx.clone(), exec_response::Msg::Stdout));
    let err_task = tokio::spawn(pump(stderr, tx.clone(), exec_response::Msg::Stderr));

    // Client → process: stdin, EOF, signals. Ends when the client does.
    let input_task = tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            match request.msg {
                Some(exec_request::Msg::Stdin(bytes)) => {
                    activity.touch();
                    if let Some(pipe) = stdin.as_mut()
                        && pipe.write_all(&bytes).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some(exec_request::Msg::CloseStdin(true)) => stdin = None,
                Some(exec_request::Msg::Signal(name)) => {
                    if let (Ok(signal), Some(pid)) = (signals::parse(&name), pid) {
                        // Negative pid: the whole process group.
                        let _ = kill(Pid::from_raw(-pid.as_raw()), signal);
                    }
                }
                _ => {}
            }
        }
    });

    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            // The client went away: end the process group.
            _ = tx.closed() => {
                if let Some(pid) = pid {
                    let _ = kill(Pid::from_raw(-pid.as_raw()), nix::sys::signal::Signal::SIGKILL);
                }
                let status = child.wait().await;
                drop(status);
                if let Some(pid) = pid {
                    children.remove(pid);
                }
                return;
            }
        };
        if let Some(pid) = pid {
            children.remove(pid);
        }
        let _ = out_task.await;
        let _ = err_task.await;
        input_task.abort();
        let exit = match status {
            Ok(status) => pb::ExitStatus {
                code: status.code(),
                signal: status.signal().map(signals::name).unwrap_or_default(),
            },
            Err(error) => {
                let _ = tx
                    .send(Err(Status::internal(format!(
                        "cannot wait for the process: {error}"
                    ))))
                    .await;
                return;
            }
        };
        let _ = tx
            .send(Ok(pb::ExecResponse {
                msg: Some(exec_response::Msg::Exit(exit)),
            }))
            .await;
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    tx: mpsc::Sender<Result<pb::ExecResponse, Status>>,
    wrap: fn(Vec<u8>) -> exec_response::Msg,
) {
    if let Some(reader) = reader {
        // A read error ends the stream; the exit status still follows.
        let _ = chunks::relay(reader, &tx, |bytes| pb::ExecResponse {
            msg: Some(wrap(bytes)),
        })
        .await;
    }
}
