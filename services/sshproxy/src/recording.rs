//! The recording tee: terminal output (and input, when policy asks) as
//! asciicast v2 lines, cut into chunks and handed to the session service
//! as `session.recording_*` events (see k8shell-events' `session` module).
//!
//! A chunk is sent when it reaches [`CHUNK_BYTES`] or has waited
//! [`CHUNK_AGE`]; bytes that end inside a UTF-8 character wait for the
//! rest, so every line is valid JSON text.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8shell_events::session::{
    SessionRecordingChunk, SessionRecordingEnded, SessionRecordingStarted,
};
use tokio::sync::mpsc;

use crate::audit::Audit;

/// A chunk is sent once it holds this much.
pub const CHUNK_BYTES: usize = 32 * 1024;
/// Or once its first line is this old.
pub const CHUNK_AGE: Duration = Duration::from_secs(1);

/// What is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Terminal output.
    Output,
    /// Output and keystrokes.
    InputOutput,
}

impl Mode {
    /// The mode the `record` obligation asks for on a channel; `pty` says
    /// whether it is a terminal session.
    ///
    /// `none`: nothing; `shell`: terminal sessions' output; `all`: every
    /// shell and command's output; `input`: terminal sessions' output and
    /// keystrokes.
    pub fn for_channel(obligation: &str, pty: bool) -> Option<Self> {
        match (obligation, pty) {
            ("shell" | "all", true) => Some(Self::Output),
            ("all", false) => Some(Self::Output),
            ("input", true) => Some(Self::InputOutput),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::InputOutput => "input+output",
        }
    }
}

enum Event {
    Output(Vec<u8>),
    Input(Vec<u8>),
    Resize(u32, u32),
}

/// Feeds one channel's recording.
pub struct Recorder {
    events: mpsc::Sender<Event>,
    mode: Mode,
}

/// What the asciicast header says about the terminal.
pub struct Terminal {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// `TERM`.
    pub term: String,
    /// Title (the command, or the user and workspace).
    pub title: String,
}

impl Recorder {
    /// Starts recording channel `channel` of session `session_id`.
    pub fn start(
        audit: Audit,
        session_id: &str,
        channel: u32,
        mode: Mode,
        terminal: Terminal,
    ) -> Self {
        let (events, receiver) = mpsc::channel(256);
        let recording_id = format!("{session_id}-{channel}");
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let header = serde_json::json!({
            "version": 2,
            "width": terminal.width,
            "height": terminal.height,
            "timestamp": timestamp,
            "title": terminal.title,
            "env": {"TERM": terminal.term, "SHELL": ""},
        })
        .to_string();
        let writer = ChunkWriter {
            audit,
            session_id: session_id.to_owned(),
            recording_id,
            started: Instant::now(),
            lines: String::new(),
            first_line_at: None,
            chunk_offset: 0.0,
            seq: 0,
            bytes: 0,
            carry_output: Vec::new(),
            carry_input: Vec::new(),
        };
        tokio::spawn(writer.run(mode, header, receiver));
        Self { events, mode }
    }

    /// Terminal output.
    pub async fn output(&self, data: &[u8]) {
        let _ = self.events.send(Event::Output(data.to_vec())).await;
    }

    /// Keystrokes (recorded only in [`Mode::InputOutput`]).
    pub async fn input(&self, data: &[u8]) {
        if self.mode == Mode::InputOutput {
            let _ = self.events.send(Event::Input(data.to_vec())).await;
        }
    }

    /// A window change.
    pub async fn resize(&self, width: u32, height: u32) {
        let _ = self.events.send(Event::Resize(width, height)).await;
    }
}

struct ChunkWriter {
    audit: Audit,
    session_id: String,
    recording_id: String,
    started: Instant,
    lines: String,
    first_line_at: Option<Instant>,
    chunk_offset: f64,
    seq: u64,
    bytes: u64,
    carry_output: Vec<u8>,
    carry_input: Vec<u8>,
}

/// Splits `bytes` (after `carry`) at the last complete UTF-8 character;
/// the incomplete tail becomes the new carry.
fn complete_utf8(carry: &mut Vec<u8>, bytes: Vec<u8>) -> String {
    carry.extend(bytes);
    let valid_up_to = match std::str::from_utf8(carry) {
        Ok(_) => carry.len(),
        // An error with no length is an incomplete sequence at the end.
        Err(error) if error.error_len().is_none() => error.valid_up_to(),
        Err(_) => carry.len(),
    };
    let rest = carry.split_off(valid_up_to);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = rest;
    text
}

impl ChunkWriter {
    async fn run(mut self, mode: Mode, header: String, mut events: mpsc::Receiver<Event>) {
        self.audit
            .publish(
                &self.session_id,
                &SessionRecordingStarted {
                    session_id: self.session_id.clone(),
                    recording_id: self.recording_id.clone(),
                    mode: mode.name().to_owned(),
                    header,
                },
            )
            .await;
        loop {
            let deadline = self.first_line_at.map(|t| t + CHUNK_AGE);
            let next = match deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                        Ok(next) => next,
                        Err(_) => {
                            self.flush().await;
                            continue;
                        }
                    }
                }
                None => events.recv().await,
            };
            let Some(event) = next else {
                break;
            };
            let at = self.started.elapsed().as_secs_f64();
            let line = match event {
                Event::Output(bytes) => {
                    self.bytes += bytes.len() as u64;
                    let text = complete_utf8(&mut self.carry_output, bytes);
                    (!text.is_empty()).then(|| serde_json::json!([at, "o", text]))
                }
                Event::Input(bytes) => {
                    self.bytes += bytes.len() as u64;
                    let text = complete_utf8(&mut self.carry_input, bytes);
                    (!text.is_empty()).then(|| serde_json::json!([at, "i", text]))
                }
                Event::Resize(width, height) => {
                    Some(serde_json::json!([at, "r", format!("{width}x{height}")]))
                }
            };
            if let Some(line) = line {
                if self.first_line_at.is_none() {
                    self.first_line_at = Some(Instant::now());
                    self.chunk_offset = at;
                }
                self.lines.push_str(&line.to_string());
                self.lines.push('\n');
                if self.lines.len() >= CHUNK_BYTES {
                    self.flush().await;
                }
            }
        }
        self.flush().await;
        self.audit
            .publish(
                &self.session_id,
                &SessionRecordingEnded {
                    session_id: self.session_id.clone(),
                    recording_id: self.recording_id.clone(),
                    chunks: self.seq,
                    bytes: self.bytes,
                    duration_seconds: self.started.elapsed().as_secs_f64(),
                },
            )
            .await;
    }

    async fn flush(&mut self) {
        self.first_line_at = None;
        if self.lines.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.lines);
        self.audit
            .publish(
                &self.session_id,
                &SessionRecordingChunk {
                    session_id: self.session_id.clone(),
                    recording_id: self.recording_id.clone(),
                    seq: self.seq,
                    offset_seconds: self.chunk_offset,
                    lines,
                },
            )
            .await;
        self.seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_writes_waits_for_the_rest() {
        let mut carry = Vec::new();
        let euro = "€".as_bytes();
        assert_eq!(complete_utf8(&mut carry, vec![b'a', euro[0]]), "a");
        assert_eq!(carry, vec![euro[0]]);
        assert_eq!(complete_utf8(&mut carry, euro[1..].to_vec()), "€");
        assert!(carry.is_empty());
        // Invalid bytes do not stall the recording.
        assert_eq!(complete_utf8(&mut carry, vec![0xff, b'b']), "\u{fffd}b");
    }

    #[test]
    fn the_obligation_picks_what_is_recorded() {
        assert_eq!(Mode::for_channel("none", true), None);
        assert_eq!(Mode::for_channel("shell", true), Some(Mode::Output));
        assert_eq!(Mode::for_channel("shell", false), None);
        assert_eq!(Mode::for_channel("all", false), Some(Mode::Output));
        assert_eq!(Mode::for_channel("input", true), Some(Mode::InputOutput));
        assert_eq!(Mode::for_channel("", true), None);
    }
}
