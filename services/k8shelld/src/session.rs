//! PTY sessions that outlive their clients.
//!
//! Every byte the PTY prints goes through a server-side terminal emulator
//! (vt100) before it is broadcast, under one lock; an attaching client takes
//! a snapshot of the emulator and subscribes in the same critical section,
//! so the snapshot plus the live output it receives next is exactly the
//! terminal, with no gap and no repeat.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use k8shell_proto::k8shelld::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::pid1::Children;
use crate::{signals, users};

const CHUNK: usize = 32 * 1024;
/// Output chunks buffered per client before it counts as lagging (it then
/// gets a fresh snapshot instead of the missed bytes).
const OUTPUT_BUFFER: usize = 1024;

/// Why a client's stream was detached.
#[derive(Clone, Debug)]
pub struct DetachNotice {
    /// The client concerned; `None` for all.
    pub client: Option<u64>,
    /// Told to the client.
    pub reason: &'static str,
}

#[derive(Debug, Default)]
struct Attachments {
    clients: u32,
    writer: Option<u64>,
    detached_since: Option<SystemTime>,
    next_client: u64,
}

/// One PTY session.
pub struct Session {
    pub id: String,
    pub owner: String,
    pub argv: Vec<String>,
    pub started_at: SystemTime,
    pid: Pid,
    pty: tokio::sync::Mutex<pty_process::OwnedWritePty>,
    screen: Mutex<vt100::Parser>,
    output: broadcast::Sender<Bytes>,
    control: broadcast::Sender<DetachNotice>,
    attachments: Mutex<Attachments>,
    exit: watch::Receiver<Option<pb::ExitStatus>>,
}

/// A client's view of a session after attaching.
pub struct Attachment {
    pub client: u64,
    pub snapshot: Vec<u8>,
    pub output: broadcast::Receiver<Bytes>,
    pub control: broadcast::Receiver<DetachNotice>,
    pub exit: watch::Receiver<Option<pb::ExitStatus>>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // keep serving it rather than poisoning every later client.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Redraws an emulator's screen on a blank terminal.
pub fn snapshot(parser: &vt100::Parser) -> Vec<u8> {
    let screen = parser.screen();
    let mut bytes = Vec::new();
    if screen.alternate_screen() {
        bytes.extend_from_slice(b"\x1b[?1049h");
    }
    bytes.extend_from_slice(screen.state_formatted().as_bytes());
    bytes
}

/// A fresh redraw of a session's screen.
pub fn snapshot_message(session: &Session) -> Vec<u8> {
    snapshot(&lock(&session.screen))
}

impl Session {
    /// Attaches a client; a writer takes the role from the previous writer.
    pub fn attach(&self, read_only: bool) -> Attachment {
        let client = {
            let mut attachments = lock(&self.attachments);
            attachments.next_client += 1;
            let client = attachments.next_client;
            attachments.clients += 1;
            attachments.detached_since = None;
            if !read_only && let Some(previous) = attachments.writer.replace(client) {
                let _ = self.control.send(DetachNotice {
                    client: Some(previous),
                    reason: "another writer attached",
                });
            }
            client
        };
        let control = self.control.subscribe();
        let screen = lock(&self.screen);
        Attachment {
            client,
            snapshot: snapshot(&screen),
            output: self.output.subscribe(),
            control,
            exit: self.exit.clone(),
        }
    }

    /// Releases a client.
    pub fn detach(&self, client: u64) {
        let mut attachments = lock(&self.attachments);
        attachments.clients = attachments.clients.saturating_sub(1);
        if attachments.writer == Some(client) {
            attachments.writer = None;
        }
        if attachments.clients == 0 {
            attachments.detached_since = Some(SystemTime::now());
        }
    }

    /// Whether `client` holds the writer role.
    pub fn is_writer(&self, client: u64) -> bool {
        lock(&self.attachments).writer == Some(client)
    }

    /// Writes keystrokes.
    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.pty.lock().await.write_all(bytes).await
    }

    /// Resizes the PTY and the emulator.
    pub async fn resize(&self, size: &pb::TerminalSize) -> Result<(), Status> {
        let (rows, cols) = checked_size(size)?;
        self.pty
            .lock()
            .await
            .resize(pty_process::Size::new(rows, cols))
            .map_err(|e| Status::internal(format!("cannot resize: {e}")))?;
        lock(&self.screen)
            .screen_mut()
            .set_size(non_zero(rows), non_zero(cols));
        Ok(())
    }

    /// Sends a signal to the session's process group.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(-self.pid.as_raw()), signal);
    }

    /// Detaches every client (or one); returns how many were attached.
    pub fn detach_all(&self, reason: &'static str) -> u32 {
        let clients = lock(&self.attachments).clients;
        let _ = self.control.send(DetachNotice {
            client: None,
            reason,
        });
        clients
    }

    /// Public description.
    pub fn info(&self) -> pb::SessionInfo {
        let attachments = lock(&self.attachments);
        pb::SessionInfo {
            id: self.id.clone(),
            owner: self.owner.clone(),
            argv: self.argv.clone(),
            started_at: Some(timestamp(self.started_at)),
            detached_since: attachments.detached_since.map(timestamp),
            attached_clients: attachments.clients,
            has_writer: attachments.writer.is_some(),
        }
    }

    fn detached_longer_than(&self, ttl: Duration) -> bool {
        lock(&self.attachments)
            .detached_since
            .and_then(|since| since.elapsed().ok())
            .is_some_and(|elapsed| elapsed > ttl)
    }
}

pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

fn non_zero(value: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(value).unwrap_or(std::num::NonZeroU16::MIN)
}

fn checked_size(size: &pb::TerminalSize) -> Result<(u16, u16), Status> {
    let rows = u16::try_from(size.rows)
        .ok()
        .filter(|r| (1..=1000).contains(r));
    let cols = u16::try_from(size.cols)
        .ok()
        .filter(|c| (1..=1000).contains(c));
    match (rows, cols) {
        (Some(rows), Some(cols)) => Ok((rows, cols)),
        _ => Err(Status::invalid_argument(
            "terminal size must be 1..=1000 rows and columns",
        )),
    }
}

/// All sessions of this daemon.
#[derive(Clone)]
pub struct Sessions {
    map: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    default_user: String,
    children: Children,
}

impl Sessions {
    pub fn new(default_user: String, children: Children) -> Self {
        Self {
            map: Arc::default(),
            default_user,
            children,
        }
    }

    /// Starts a process on a new PTY.
    pub fn spawn(&self, owner: &str, start: &pb::ShellStart) -> Result<Arc<Session>, Status> {
        let account = users::resolve(&start.user, &self.default_user)?;
        let (rows, cols) = match &start.size {
            Some(size) => checked_size(size)?,
            None => (24, 80),
        };
        let argv = account.program(&start.argv, &start.command)?;
        let term = if start.term.is_empty() {
            "xterm-256color"
        } else {
            start.term.as_str()
        };
        let id = uuid::Uuid::now_v7().simple().to_string();
        let (pty, pts) =
            pty_process::open().map_err(|e| Status::internal(format!("cannot open a pty: {e}")))?;
        pty.resize(pty_process::Size::new(rows, cols))
            .map_err(|e| Status::internal(format!("cannot size the pty: {e}")))?;
        let mut command = pty_process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(users::base_env(&account))
            .env("TERM", term)
            // Lets `kbox detach` inside the session find it.
            .env("K8SHELL_SESSION_ID", &id)
            .envs(&start.env)
            .current_dir(if start.working_dir.is_empty() {
                account.home.clone()
            } else {
                start.working_dir.clone().into()
            });
        if account.uid != nix::unistd::Uid::effective() {
            command = command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        let mut child = command.spawn(pts).map_err(|error| match error {
            pty_process::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Status::not_found(format!("{}: command not found", argv[0]))
            }
            other => Status::internal(format!("{}: cannot start: {other}", argv[0])),
        })?;
        let pid = child
            .id()
            .map(|p| Pid::from_raw(p as i32))
            .ok_or_else(|| Status::internal("process exited at once"))?;
        let (mut reader, writer) = pty.into_split();
        let (output, _) = broadcast::channel(OUTPUT_BUFFER);
        let (control, _) = broadcast::channel(16);
        let (exit_tx, exit) = watch::channel(None);
        let session = Arc::new(Session {
            id,
            owner: owner.to_owned(),
            argv,
            started_at: SystemTime::now(),
            pid,
            pty: tokio::sync::Mutex::new(writer),
            screen: Mutex::new(vt100::Parser::new(non_zero(rows), non_zero(cols), 0)),
            output,
            control,
            attachments: Mutex::new(Attachments::default()),
            exit,
        });
        lock(&self.map).insert(session.id.clone(), session.clone());
        self.children.add(pid);

        let registry = self.map.clone();
        let children = self.children.clone();
        let running = session.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; CHUNK];
            loop {
                match reader.read(&mut buffer).await {
                    // EIO once the last process holding the terminal is gone.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut screen = lock(&running.screen);
                        screen.process(&buffer[..n]);
                        let _ = running.output.send(Bytes::copy_from_slice(&buffer[..n]));
                    }
                }
            }
            let status = match child.wait().await {
                Ok(status) => pb::ExitStatus {
                    code: status.code(),
                    signal: status.signal().map(signals::name).unwrap_or_default(),
                },
                Err(_) => pb::ExitStatus::default(),
            };
            children.remove(running.pid);
            let _ = exit_tx.send(Some(status));
            lock(&registry).remove(&running.id);
        });
        Ok(session)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        lock(&self.map).get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Session>> {
        lock(&self.map).values().cloned().collect()
    }

    /// Ends sessions detached for longer than `ttl`: SIGHUP, then SIGKILL.
    pub async fn expire(&self, ttl: Duration) {
        let expired: Vec<Arc<Session>> = self
            .list()
            .into_iter()
            .filter(|s| s.detached_longer_than(ttl))
            .collect();
        for session in expired {
            tracing::info!(session = %session.id, "detached session expired");
            session.signal(Signal::SIGHUP);
            let mut exit = session.exit.clone();
            let ended =
                tokio::time::timeout(Duration::from_secs(2), exit.wait_for(|e| e.is_some())).await;
            if ended.is_err() {
                session.signal(Signal::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(bytes: &[u8]) -> vt100::Parser {
        let mut parser = vt100::Parser::new(non_zero(24), non_zero(80), 0);
        parser.process(bytes);
        parser
    }

    fn same(a: &vt100::Parser, b: &vt100::Parser) -> bool {
        let (a, b) = (a.screen(), b.screen());
        a.contents() == b.contents()
            && a.cursor_position() == b.cursor_position()
            && a.alternate_screen() == b.alternate_screen()
            && a.hide_cursor() == b.hide_cursor()
            && a.application_cursor() == b.application_cursor()
    }

    #[test]
    fn snapshot_redraws_main_and_alternate_screens() {
        let scripts: [&[u8]; 3] = [
            b"plain line\r\nsecond\x1b[3;5Hcursor here",
            // A full-screen program: alternate screen, cleared, drawn, cursor hidden.
            b"shell prompt$ \x1b[?1049h\x1b[2J\x1b[5;10H\x1b[1mhello\x1b[0m\x1b[10;3Hworld\x1b[?25l\x1b[?1h",
            // Back from the alternate screen: the main screen returns.
            b"before\x1b[?1049h\x1b[2Jinside\x1b[?1049lafter",
        ];
        for script in scripts {
            let original = replay(script);
            let redrawn = replay(&snapshot(&original));
            assert!(
                same(&original, &redrawn),
                "script {:?}:\n{}\n---\n{}",
                String::from_utf8_lossy(script),
                original.screen().contents(),
                redrawn.screen().contents()
            );
        }
    }
}
