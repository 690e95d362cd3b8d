//! Running a command in a workspace through k8shelld's Exec, for tests.

use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_proto::k8shelld::v1::{
    self as pb, ExecRequest, ExecStart, exec_request, exec_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::bearer;

/// What a command printed and how it ended.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// Exit status.
    pub exit: pb::ExitStatus,
}

/// Runs `argv` as `user` (the workspace default when empty) with no stdin.
pub async fn exec(
    client: &mut K8shelldClient<Channel>,
    token: &str,
    argv: &[&str],
    user: &str,
) -> anyhow::Result<ExecOutput> {
    let (tx, rx) = mpsc::channel(2);
    tx.send(ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            user: user.into(),
            ..Default::default()
        })),
    })
    .await?;
    drop(tx);
    let mut stream = client
        .exec(bearer(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(message) = stream.message().await? {
        match message.msg {
            Some(exec_response::Msg::Stdout(bytes)) => stdout.extend(bytes),
            Some(exec_response::Msg::Stderr(bytes)) => stderr.extend(bytes),
            Some(exec_response::Msg::Exit(exit)) => {
                return Ok(ExecOutput {
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    exit,
                });
            }
            None => {}
        }
    }
    anyhow::bail!("exec of {argv:?} ended without an exit status")
}
