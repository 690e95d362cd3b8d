//! Session channels: `pty-req`, `env`, then one of `shell`, `exec` or the
//! `sftp` subsystem, mapped onto k8shelld's Shell (with a PTY), Exec
//! (without) or Sftp; `window-change`, `signal`, input and EOF while it
//! runs; `exit-status` / `exit-signal` when it ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::StreamExt as _;
use k8shell_proto::k8shelld::v1 as pb;
use russh::server::Msg;
use russh::{Channel, ChannelId, ChannelMsg, ChannelWriteHalf, Sig};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::channels::forward::open_stream;
use crate::daemon::DaemonClient;
use crate::handler::{ChannelSlot, Conn};
use crate::recording::{Mode, Recorder, Terminal};

/// The terminal a client asked for.
#[derive(Clone, Debug)]
struct Pty {
    term: String,
    cols: u32,
    rows: u32,
}

/// What the channel runs.
#[derive(Clone, Debug)]
enum Kind {
    Shell,
    Exec(String),
    Sftp,
}

impl Kind {
    fn action(&self) -> &'static str {
        match self {
            Self::Shell => "ssh:shell",
            Self::Exec(_) => "ssh:exec",
            Self::Sftp => "ssh:sftp",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Shell => "shell",
            Self::Exec(_) => "exec",
            Self::Sftp => "sftp",
        }
    }
}

/// Input for the running process.
enum Input {
    Data(Bytes),
    Eof,
    Resize(u32, u32),
    Signal(String),
}

/// Output of the running process.
enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(pb::ExitStatus),
}

/// Serves one session channel until it closes.
pub async fn run(conn: Arc<Conn>, channel: Channel<Msg>, _slot: ChannelSlot) {
    let id = channel.id();
    let (mut reader, writer) = channel.split();
    let mut pty: Option<Pty> = None;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut input: Option<mpsc::Sender<Input>> = None;
    let mut recorder: Option<Arc<Recorder>> = None;
    let mut writer = Some(writer);
    // Cancelled when the channel goes: the program's stream (the process
    // ends with it) and the agent listener stop.
    let channel_gone = conn.closed.child_token();
    let _gone = channel_gone.clone().drop_guard();
    loop {
        let message = tokio::select! {
            _ = conn.closed.cancelled() => break,
            message = reader.wait() => message,
        };
        let Some(message) = message else { break };
        match message {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            } => {
                // Clients without a terminal (`ssh -tt` from a script) say
                // 0x0; the program gets the classic 80x24 instead.
                pty = Some(Pty {
                    term,
                    cols: or_default(col_width, 80),
                    rows: or_default(row_height, 24),
                });
                reply(&conn, id, true).await;
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                let accepted = accepts_env(&conn.shared.config.accept_env, &variable_name);
                if accepted {
                    env.insert(variable_name, variable_value);
                }
                reply(&conn, id, accepted).await;
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                if let Some(pty) = pty.as_mut() {
                    pty.cols = col_width;
                    pty.rows = row_height;
                }
                if let Some(recorder) = &recorder {
                    recorder.resize(col_width, row_height).await;
                }
                if let Some(input) = &input
                    && col_width > 0
                    && row_height > 0
                {
                    let _ = input
                        .send(Input::Resize(col_width.min(1000), row_height.min(1000)))
                        .await;
                }
            }
            ChannelMsg::Signal { signal } => {
                if let Some(input) = &input {
                    let _ = input.send(Input::Signal(signal_name(&signal))).await;
                }
            }
            ChannelMsg::Data { data } => {
                conn.bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(recorder) = &recorder {
                    recorder.input(&data).await;
                }
                if let Some(input) = &input {
                    // Backpressure: a slow workspace slows the client down.
                    let _ = input.send(Input::Data(data)).await;
                }
            }
            ChannelMsg::Eof => {
                if let Some(input) = &input {
                    let _ = input.send(Input::Eof).await;
                }
            }
            ChannelMsg::Close => break,
            ChannelMsg::RequestShell { .. }
            | ChannelMsg::Exec { .. }
            | ChannelMsg::RequestSubsystem { .. } => {
                let kind = match message {
                    ChannelMsg::Exec { command, .. } => {
                        Kind::Exec(String::from_utf8_lossy(&command).into_owned())
                    }
                    ChannelMsg::RequestSubsystem { name, .. } if name == "sftp" => Kind::Sftp,
                    ChannelMsg::RequestSubsystem { name, .. } => {
                        tracing::info!(session = %conn.id, subsystem = %name, "unknown subsystem");
                        reply(&conn, id, false).await;
                        continue;
                    }
                    _ => Kind::Shell,
                };
                // One program per channel (RFC 4254 §6.5).
                let Some(channel_writer) = writer.take() else {
                    reply(&conn, id, false).await;
                    continue;
                };
                let start = Start {
                    conn: Arc::clone(&conn),
                    id,
                    kind,
                    pty: pty.clone(),
                    env: env.clone(),
                    channel_gone: channel_gone.clone(),
                };
                match start.run(channel_writer).await {
                    Some((sender, started_recorder)) => {
                        input = Some(sender);
                        recorder = started_recorder;
                    }
                    None => {
                        // Refused or failed: the client was told why; the
                        // channel is closed.
                        break;
                    }
                }
            }
            _ => {}
        }
    }
}

async fn reply(conn: &Conn, id: ChannelId, success: bool) {
    if let Some(handle) = conn.handle() {
        let _ = if success {
            handle.channel_success(id).await
        } else {
            handle.channel_failure(id).await
        };
    }
}

fn or_default(size: u32, default: u32) -> u32 {
    if size == 0 { default } else { size.min(1000) }
}

/// Whether a client may set `name` (`SendEnv` / `SetEnv`).
fn accepts_env(patterns: &[String], name: &str) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        })
}

fn signal_name(signal: &Sig) -> String {
    match signal {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name.as_str(),
    }
    .to_owned()
}

fn sig_from_name(name: &str) -> Sig {
    match name.trim_start_matches("SIG") {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_owned()),
    }
}

struct Start {
    conn: Arc<Conn>,
    id: ChannelId,
    kind: Kind,
    pty: Option<Pty>,
    env: BTreeMap<String, String>,
    channel_gone: CancellationToken,
}

impl Start {
    /// Decides, waits for the workspace, starts the program and its output
    /// pump; replies to the request. `None`: refused (and closed).
    async fn run(
        self,
        writer: ChannelWriteHalf<Msg>,
    ) -> Option<(mpsc::Sender<Input>, Option<Arc<Recorder>>)> {
        let conn = &self.conn;
        conn.count_channel(self.kind.name());
        let mut stderr = writer.make_writer_ext(Some(1));
        let newline = if self.pty.is_some() { "\r\n" } else { "\n" };
        let mut context = HashMap::from([("pty".to_owned(), self.pty.is_some().to_string())]);
        if let Kind::Exec(command) = &self.kind {
            context.insert("command".to_owned(), truncate(command, 1024));
        }
        let decision = conn.decide(self.kind.action(), context).await;
        if !decision.allow {
            tracing::info!(session = %conn.id, action = self.kind.action(), reasons = ?decision.reasons, "channel refused by policy");
            let message = format!(
                "k8shell: permission denied for {}: {}{newline}",
                self.kind.action(),
                decision.reasons.join("; ")
            );
            self.refuse(&mut stderr, &writer, &message).await;
            return None;
        }
        let session = conn.session()?;
        // Cold start: progress lines while the workspace starts.
        let mut lines = Vec::new();
        let waited = session.gate.wait(|line| lines.push(line.to_owned()));
        let running = tokio::select! {
            running = waited => running,
            _ = conn.closed.cancelled() => return None,
        };
        for line in &lines {
            let _ = stderr
                .write_all(format!("{line}{newline}").as_bytes())
                .await;
        }
        let running = match running {
            Ok(running) => running,
            Err(reason) => {
                self.refuse(&mut stderr, &writer, &format!("k8shell: {reason}{newline}"))
                    .await;
                return None;
            }
        };
        let login = conn.login()?;
        let client = match conn.daemon(&running).await {
            Ok(client) => client,
            Err(error) => {
                self.refuse(&mut stderr, &writer, &format!("k8shell: {error}{newline}"))
                    .await;
                return None;
            }
        };
        let mut env = self.env.clone();
        if conn.wants_agent(self.id) && !matches!(self.kind, Kind::Sftp) {
            let path = crate::channels::agent::socket_path(conn, self.id);
            match crate::channels::agent::listen(
                Arc::clone(conn),
                client.clone(),
                path.clone(),
                conn.account(),
                self.channel_gone.clone(),
            )
            .await
            {
                Ok(()) => {
                    env.insert("SSH_AUTH_SOCK".to_owned(), path);
                }
                Err(error) => {
                    let _ = stderr
                        .write_all(
                            format!("k8shell: agent forwarding unavailable: {error}{newline}")
                                .as_bytes(),
                        )
                        .await;
                }
            }
        }
        let obligation = session
            .obligations
            .get("record")
            .map(String::as_str)
            .unwrap_or("none");
        let recorder = match (
            &self.kind,
            Mode::for_channel(obligation, self.pty.is_some()),
        ) {
            (Kind::Sftp, _) | (_, None) => None,
            (kind, Some(mode)) => {
                let (width, height, term) = match &self.pty {
                    Some(pty) => (pty.cols, pty.rows, pty.term.clone()),
                    None => (80, 24, String::new()),
                };
                let title = match kind {
                    Kind::Exec(command) => truncate(command, 200),
                    _ => format!("{}@{}", login.username, running.id),
                };
                Some(Arc::new(Recorder::start(
                    conn.shared.audit.clone(),
                    &conn.id,
                    self.id.number(),
                    mode,
                    Terminal {
                        width,
                        height,
                        term,
                        title,
                    },
                )))
            }
        };
        let started = match (&self.kind, &self.pty) {
            (Kind::Sftp, _) => start_sftp(&client, conn.account()).await,
            (kind, Some(pty)) => start_shell(&client, kind, pty, env, conn.account()).await,
            (kind, None) => start_exec(&client, kind, env, conn.account()).await,
        };
        let (sender, outputs) = match started {
            Ok(started) => started,
            Err(status) => {
                let message = format!(
                    "k8shell: cannot start {}: {}{newline}",
                    self.kind.name(),
                    status.message()
                );
                self.refuse(&mut stderr, &writer, &message).await;
                return None;
            }
        };
        reply(conn, self.id, true).await;
        // The blueprint's splash greets interactive logins (never a
        // command's output).
        if matches!(self.kind, Kind::Shell) && self.pty.is_some() && !running.splash.is_empty() {
            let mut stdout = writer.make_writer();
            let splash = running.splash.trim_end().replace('\n', "\r\n");
            let _ = stdout.write_all(format!("{splash}\r\n").as_bytes()).await;
            let _ = stdout.flush().await;
        }
        let pump = Pump {
            conn: Arc::clone(conn),
            id: self.id,
            recorder: recorder.clone(),
            stop: self.channel_gone.clone(),
        };
        tokio::spawn(pump.run(writer, stderr, outputs));
        Some((sender, recorder))
    }

    /// Tells the client why and ends the channel with exit status 1.
    ///
    /// The request itself succeeds: OpenSSH's client exits at once on a
    /// failed `shell`/`exec` request, before it prints what the channel
    /// said, so a failure reply would hide the reason.
    async fn refuse(
        &self,
        stderr: &mut (impl AsyncWrite + Unpin),
        writer: &ChannelWriteHalf<Msg>,
        message: &str,
    ) {
        reply(&self.conn, self.id, true).await;
        let _ = stderr.write_all(message.as_bytes()).await;
        let _ = stderr.flush().await;
        let _ = writer.exit_status(1).await;
        let _ = writer.eof().await;
        let _ = writer.close().await;
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

type Outputs = futures::stream::BoxStream<'static, Result<Output, tonic::Status>>;

async fn start_shell(
    client: &DaemonClient,
    kind: &Kind,
    pty: &Pty,
    env: BTreeMap<String, String>,
    user: String,
) -> Result<(mpsc::Sender<Input>, Outputs), tonic::Status> {
    let first = pb::ShellRequest {
        msg: Some(pb::shell_request::Msg::Start(pb::ShellStart {
            argv: Vec::new(),
            env: env.into_iter().collect(),
            working_dir: String::new(),
            user,
            size: Some(pb::TerminalSize {
                rows: pty.rows,
                cols: pty.cols,
            }),
            term: pty.term.clone(),
            command: match kind {
                Kind::Exec(command) => command.clone(),
                _ => String::new(),
            },
        })),
    };
    let (requests, stream) = open_stream(first);
    let responses = client
        .client
        .clone()
        .shell(client.request(stream))
        .await?
        .into_inner();
    let (sender, mut inputs) = mpsc::channel::<Input>(64);
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            let msg = match input {
                Input::Data(data) => pb::shell_request::Msg::Input(data.to_vec()),
                Input::Resize(cols, rows) => {
                    pb::shell_request::Msg::Resize(pb::TerminalSize { rows, cols })
                }
                Input::Signal(name) => pb::shell_request::Msg::Signal(name),
                // A terminal has no EOF of its own (^D is data).
                Input::Eof => continue,
            };
            if requests
                .send(pb::ShellRequest { msg: Some(msg) })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let outputs = responses
        .filter_map(|response| async move {
            match response {
                Ok(pb::ShellResponse { msg: Some(msg) }) => match msg {
                    pb::shell_response::Msg::Output(bytes)
                    | pb::shell_response::Msg::Snapshot(bytes) => Some(Ok(Output::Stdout(bytes))),
                    pb::shell_response::Msg::Exit(status) => Some(Ok(Output::Exit(status))),
                    pb::shell_response::Msg::Detached(reason) => Some(Ok(Output::Stderr(
                        format!("\r\nk8shell: detached: {reason}\r\n").into_bytes(),
                    ))),
                    pb::shell_response::Msg::Session(_) => None,
                },
                Ok(pb::ShellResponse { msg: None }) => None,
                Err(status) => Some(Err(status)),
            }
        })
        .boxed();
    Ok((sender, outputs))
}

async fn start_exec(
    client: &DaemonClient,
    kind: &Kind,
    env: BTreeMap<String, String>,
    user: String,
) -> Result<(mpsc::Sender<Input>, Outputs), tonic::Status> {
    let first = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Start(pb::ExecStart {
            // No command: the login shell, reading from stdin (`ssh -T`).
            argv: Vec::new(),
            env: env.into_iter().collect(),
            working_dir: String::new(),
            user,
            command: match kind {
                Kind::Exec(command) => command.clone(),
                _ => String::new(),
            },
        })),
    };
    let (requests, stream) = open_stream(first);
    let responses = client
        .client
        .clone()
        .exec(client.request(stream))
        .await?
        .into_inner();
    let (sender, mut inputs) = mpsc::channel::<Input>(64);
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            let msg = match input {
                Input::Data(data) => pb::exec_request::Msg::Stdin(data.to_vec()),
                Input::Eof => pb::exec_request::Msg::CloseStdin(true),
                Input::Signal(name) => pb::exec_request::Msg::Signal(name),
                Input::Resize(..) => continue,
            };
            if requests
                .send(pb::ExecRequest { msg: Some(msg) })
                .await
                .is_err()
            {
                break;
            }
        }
        // The request stream stays open until the process ends.
        requests.closed().await;
    });
    let outputs = responses
        .filter_map(|response| async move {
            match response {
                Ok(pb::ExecResponse { msg: Some(msg) }) => Some(Ok(match msg {
                    pb::exec_response::Msg::Stdout(bytes) => Output::Stdout(bytes),
                    pb::exec_response::Msg::Stderr(bytes) => Output::Stderr(bytes),
                    pb::exec_response::Msg::Exit(status) => Output::Exit(status),
                })),
                Ok(pb::ExecResponse { msg: None }) => None,
                Err(status) => Some(Err(status)),
            }
        })
        .boxed();
    Ok((sender, outputs))
}

async fn start_sftp(
    client: &DaemonClient,
    user: String,
) -> Result<(mpsc::Sender<Input>, Outputs), tonic::Status> {
    let first = pb::SftpRequest {
        msg: Some(pb::sftp_request::Msg::Start(pb::SftpStart { user })),
    };
    let (requests, stream) = open_stream(first);
    let responses = client
        .client
        .clone()
        .sftp(client.request(stream))
        .await?
        .into_inner();
    let (sender, mut inputs) = mpsc::channel::<Input>(64);
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            match input {
                Input::Data(data) => {
                    let request = pb::SftpRequest {
                        msg: Some(pb::sftp_request::Msg::Data(data.to_vec())),
                    };
                    if requests.send(request).await.is_err() {
                        break;
                    }
                }
                // The client is done: ending the stream ends the server.
                Input::Eof => break,
                Input::Resize(..) | Input::Signal(_) => {}
            }
        }
    });
    let outputs = responses
        .map(|response| response.map(|data| Output::Stdout(data.data)))
        .chain(futures::stream::once(async {
            Ok(Output::Exit(pb::ExitStatus {
                code: Some(0),
                signal: String::new(),
            }))
        }))
        .boxed();
    Ok((sender, outputs))
}

/// Copies the program's output to the channel, then its exit.
struct Pump {
    conn: Arc<Conn>,
    id: ChannelId,
    recorder: Option<Arc<Recorder>>,
    stop: CancellationToken,
}

impl Pump {
    async fn run(
        self,
        writer: ChannelWriteHalf<Msg>,
        mut stderr: impl AsyncWrite + Unpin,
        mut outputs: Outputs,
    ) {
        let mut stdout = writer.make_writer();
        let mut exit: Option<pb::ExitStatus> = None;
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return,
                next = outputs.next() => next,
            };
            match next {
                Some(Ok(Output::Stdout(bytes))) => {
                    self.conn
                        .bytes_out
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if let Some(recorder) = &self.recorder {
                        recorder.output(&bytes).await;
                    }
                    if stdout.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Output::Stderr(bytes))) => {
                    self.conn
                        .bytes_out
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if stderr.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Output::Exit(status))) => {
                    exit = Some(status);
                    break;
                }
                Some(Err(status)) => {
                    tracing::info!(session = %self.conn.id, error = %status.message(), "the workspace ended the channel");
                    let _ = stderr
                        .write_all(format!("k8shell: {}\n", status.message()).as_bytes())
                        .await;
                    break;
                }
                None => break,
            }
        }
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        drop(self.recorder);
        match exit {
            Some(pb::ExitStatus {
                code: Some(code), ..
            }) => {
                let _ = writer.exit_status(u32::try_from(code).unwrap_or(255)).await;
            }
            Some(pb::ExitStatus { signal, .. }) if !signal.is_empty() => {
                if let Some(handle) = self.conn.handle() {
                    let _ = handle
                        .exit_signal_request(
                            self.id,
                            sig_from_name(&signal),
                            false,
                            String::new(),
                            String::new(),
                        )
                        .await;
                }
            }
            // The stream broke without an exit: like a lost connection.
            _ => {
                let _ = writer.exit_status(255).await;
            }
        }
        let _ = writer.eof().await;
        let _ = writer.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_patterns_accept_names_and_prefixes() {
        let patterns = vec!["LANG".to_owned(), "LC_*".to_owned()];
        assert!(accepts_env(&patterns, "LANG"));
        assert!(accepts_env(&patterns, "LC_ALL"));
        assert!(!accepts_env(&patterns, "LD_PRELOAD"));
        assert!(!accepts_env(&patterns, "LANGUAGE"));
    }

    #[test]
    fn signals_round_trip_by_name() {
        for name in ["INT", "TERM", "HUP", "KILL", "USR2"] {
            assert_eq!(signal_name(&sig_from_name(name)), name);
        }
        assert_eq!(signal_name(&sig_from_name("SIGTERM")), "TERM");
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é…");
    }
}
