use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;

/// Sends `signal`, waits up to `grace` for the exit, then kills.
pub(crate) async fn stop_child(child: &mut Child, signal: Signal, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid, "child did not stop in time; killing it");
    }
    let _ = child.kill().await;
}

/// Signals a child without waiting (for `Drop`).
pub(crate) fn signal_child(child: &Child, signal: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops a server left running by an earlier run that died without
/// stopping it (its own process group outlives us). `pid_file`'s first line
/// is the pid; it is only signalled when `/proc/<pid>/comm` is `program`.
pub(crate) async fn stop_leftover(pid_file: &Path, program: &str, signal: Signal) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
    else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != program {
        return;
    }
    tracing::warn!(
        pid,
        program,
        "stopping a server left over from an earlier run"
    );
    let _ = kill(Pid::from_raw(pid), signal);
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}
