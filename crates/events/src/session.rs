//! Interactive access: an SSH (or browser) session from login to logout,
//! and the recordings policy asks for. Aggregate id: the session id.
//!
//! A recording is an asciicast v2 stream cut into chunks: `recording_started`
//! carries the header line, each `recording_chunk` a run of event lines
//! (`[seconds, "o" | "i" | "r", data]`, one JSON array per line), in order
//! (`seq` from 0), and `recording_ended` how many chunks and bytes there
//! were. Concatenating the header and the chunks' lines gives a file any
//! asciicast v2 player replays.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Context, EventData};

/// Declares the `EventData` impl of one session event.
macro_rules! session_event {
    ($ty:ty, $name:literal, $description:literal) => {
        impl EventData for $ty {
            const TYPE: &'static str = concat!("k8shell.session.", $name, ".v1");
            const CONTEXT: Context = Context::Session;
            const DESCRIPTION: &'static str = $description;
        }
    };
}

/// A user logged in to a workspace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionStarted {
    /// Session id (`ses_…`).
    pub session_id: String,
    /// The k8shell user.
    pub username: String,
    /// The workspace reached.
    pub workspace_id: String,
    /// `ssh` or `web`.
    pub transport: String,
    /// Client address (after PROXY protocol, when enabled).
    pub client_address: String,
    /// The client's SSH version string, e.g. `SSH-2.0-OpenSSH_9.2p1`.
    #[serde(default)]
    pub client_version: String,
    /// How the user authenticated: `publickey`, `certificate`, `password`,
    /// `keyboard-interactive`, `oidc-device`.
    pub auth_method: String,
    /// The recording obligation in force: `none`, `shell`, `all`, or `input`
    /// (output and input).
    #[serde(default)]
    pub record: String,
}
session_event!(
    SessionStarted,
    "started",
    "A user logged in to a workspace."
);

/// A session ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionEnded {
    /// Session id.
    pub session_id: String,
    /// The k8shell user.
    pub username: String,
    /// The workspace.
    pub workspace_id: String,
    /// Client address.
    pub client_address: String,
    /// Channels opened, by kind (`shell`, `exec`, `sftp`, `direct-tcpip`,
    /// `direct-streamlocal`, `agent`, `tcpip-forward`).
    #[serde(default)]
    pub channels: BTreeMap<String, u64>,
    /// Bytes from the client to the workspace.
    pub bytes_in: u64,
    /// Bytes from the workspace to the client.
    pub bytes_out: u64,
    /// Seconds from login to logout.
    pub duration_seconds: f64,
    /// `disconnect`, `timeout`, `error: …`, `shutdown`.
    pub reason: String,
}
session_event!(SessionEnded, "ended", "A session ended (with its traffic).");

/// A channel's recording began.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionRecordingStarted {
    /// Session id.
    pub session_id: String,
    /// Recording id (`<session id>.<channel>`); chunks carry it.
    pub recording_id: String,
    /// What is recorded: `output` or `input+output`.
    pub mode: String,
    /// The asciicast v2 header line (JSON object: version, width, height,
    /// timestamp, env, title).
    pub header: String,
}
session_event!(
    SessionRecordingStarted,
    "recording_started",
    "A channel's recording began (asciicast v2 header)."
);

/// A run of recorded terminal events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionRecordingChunk {
    /// Session id.
    pub session_id: String,
    /// Recording id.
    pub recording_id: String,
    /// Position of this chunk, from 0, without gaps.
    pub seq: u64,
    /// Seconds since the recording began, of the chunk's first line.
    pub offset_seconds: f64,
    /// asciicast v2 event lines, each ending in `\n`.
    pub lines: String,
}
session_event!(
    SessionRecordingChunk,
    "recording_chunk",
    "A run of recorded terminal events (asciicast v2 lines)."
);

/// A channel's recording ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionRecordingEnded {
    /// Session id.
    pub session_id: String,
    /// Recording id.
    pub recording_id: String,
    /// Chunks sent (`seq` ran from 0 to chunks − 1).
    pub chunks: u64,
    /// Bytes of terminal data recorded.
    pub bytes: u64,
    /// Seconds the recording covers.
    pub duration_seconds: f64,
}
session_event!(
    SessionRecordingEnded,
    "recording_ended",
    "A channel's recording ended."
);

/// Any session event.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionEvent {
    /// See [`SessionStarted`].
    Started(SessionStarted),
    /// See [`SessionEnded`].
    Ended(SessionEnded),
    /// See [`SessionRecordingStarted`].
    RecordingStarted(SessionRecordingStarted),
    /// See [`SessionRecordingChunk`].
    RecordingChunk(SessionRecordingChunk),
    /// See [`SessionRecordingEnded`].
    RecordingEnded(SessionRecordingEnded),
}
