//! What k8shelld owes as PID 1 (or as a child subreaper elsewhere): reaping
//! orphaned zombies, and stopping every child quickly on SIGTERM.
//!
//! Reaping must not steal the exit status of a process a handler is waiting
//! for (tokio waits for its own children by pid). So handlers register the
//! pids they spawn, and the reaper only reaps zombies that are not
//! registered and have been zombies for a second — by then their
//! parent-side waiter, if any, would have collected them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::session::lock;

/// Process groups k8shelld started and still waits for.
#[derive(Clone, Debug, Default)]
pub struct Children {
    pids: Arc<Mutex<HashSet<i32>>>,
}

impl Children {
    /// Registers a child (the leader of its own process group).
    pub fn add(&self, pid: Pid) {
        lock(&self.pids).insert(pid.as_raw());
    }

    /// Forgets a child that was waited for.
    pub fn remove(&self, pid: Pid) {
        lock(&self.pids).remove(&pid.as_raw());
    }

    fn contains(&self, pid: i32) -> bool {
        lock(&self.pids).contains(&pid)
    }

    fn snapshot(&self) -> Vec<i32> {
        lock(&self.pids).iter().copied().collect()
    }

    /// SIGTERM to every child's process group; SIGKILL to those still there
    /// after `grace`. Returns once all are gone or the kill was sent.
    pub async fn terminate_all(&self, grace: Duration) {
        let groups = self.snapshot();
        if groups.is_empty() {
            return;
        }
        for pid in &groups {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && !self.snapshot().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for pid in self.snapshot() {
            tracing::info!(pid, "child ignored SIGTERM; killing its process group");
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        }
    }
}

/// Makes orphaned descendants reparent to this process, as they would to
/// PID 1, so they can be reaped (a no-op need when already PID 1).
pub fn become_subreaper() -> nix::Result<()> {
    if std::process::id() == 1 {
        return Ok(());
    }
    nix::sys::prctl::set_child_subreaper(true)
}

/// Zombie children of this process, from /proc.
fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
            state == Some("Z") && ppid == Some(me)
        })
        .collect()
}

/// How long an unregistered zombie waits before the reaper takes it.
const ZOMBIE_GRACE: Duration = Duration::from_secs(1);

/// Reaps orphaned zombies until `shutdown` resolves.
pub async fn reap_orphans(children: Children, shutdown: impl Future<Output = ()>) {
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
    let mut first_seen: HashMap<i32, tokio::time::Instant> = HashMap::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = async {
                match sigchld.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        let now = tokio::time::Instant::now();
        let zombies: HashSet<i32> = zombie_children()
            .into_iter()
            .filter(|p| !children.contains(*p))
            .collect();
        first_seen.retain(|pid, _| zombies.contains(pid));
        for pid in zombies {
            let seen = *first_seen.entry(pid).or_insert(now);
            if now.duration_since(seen) >= ZOMBIE_GRACE
                && waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).is_ok()
            {
                tracing::debug!(pid, "reaped an orphan");
                first_seen.remove(&pid);
            }
        }
    }
}
