//! Apps: long-running programs of the workspace (code-server, a dev server),
//! each supervised by its own task with a restart policy and backoff.

use std::collections::{BTreeMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8shell_proto::k8shelld::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tonic::Status;

use crate::pid1::Children;
use crate::session::lock;
use crate::users::{self, Account};

/// Output kept per app.
const LOG_CAPACITY: usize = 256 * 1024;
/// A run this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// When an exited app is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// How to find an app's version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionProbe {
    pub command: Vec<String>,
    /// The first capture group (or the whole match) is the version.
    pub regex: String,
}

/// One app, from the workspace's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub name: String,
    /// argv to run.
    pub command: Vec<String>,
    /// The program whose absence triggers `install`; `command[0]` when unset.
    #[serde(default)]
    pub binary: Option<String>,
    /// Shell command that installs the app.
    #[serde(default)]
    pub install: Option<String>,
    #[serde(default)]
    pub install_as_root: bool,
    #[serde(default)]
    pub port: Option<u16>,
    /// `http` or `tcp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default = "default_true")]
    pub autostart: bool,
    #[serde(default)]
    pub version: Option<VersionProbe>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_protocol() -> String {
    "http".into()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Stopped,
    Installing,
    Starting,
    Running { pid: i32 },
    Backoff { until: Instant },
    Failed,
}

#[derive(Debug)]
struct AppState {
    phase: Phase,
    restarts: u32,
    last_exit: Option<i32>,
    detail: String,
    version: String,
    log: VecDeque<u8>,
}

struct App {
    config: AppConfig,
    state: Mutex<AppState>,
    /// True while the app should run.
    wanted: watch::Sender<bool>,
}

impl App {
    fn append_log(&self, bytes: &[u8]) {
        let mut state = lock(&self.state);
        state.log.extend(bytes);
        let excess = state.log.len().saturating_sub(LOG_CAPACITY);
        state.log.drain(..excess);
    }

    fn set(&self, phase: Phase, detail: impl Into<String>) {
        let mut state = lock(&self.state);
        state.phase = phase;
        state.detail = detail.into();
    }

    fn view(&self) -> pb::App {
        let state = lock(&self.state);
        let (name, pid) = match &state.phase {
            Phase::Stopped => ("stopped", 0),
            Phase::Installing => ("installing", 0),
            Phase::Starting => ("starting", 0),
            Phase::Running { pid } => ("running", *pid),
            Phase::Backoff { .. } => ("backoff", 0),
            Phase::Failed => ("failed", 0),
        };
        pb::App {
            name: self.config.name.clone(),
            state: name.into(),
            pid,
            restarts: state.restarts,
            last_exit_code: state.last_exit,
            detail: state.detail.clone(),
            port: self.config.port.map(u32::from).unwrap_or(0),
            protocol: self.config.protocol.clone(),
            version: state.version.clone(),
        }
    }
}

/// Every app and its supervisor.
#[derive(Clone)]
pub struct Apps {
    apps: Arc<BTreeMap<String, Arc<App>>>,
}

impl Apps {
    /// Starts a supervisor per app (those with `autostart` run at once).
    pub fn start(
        configs: &[AppConfig],
        account: Account,
        children: Children,
        backoff: Duration,
    ) -> Self {
        let mut apps = BTreeMap::new();
        for config in configs {
            let (wanted, _) = watch::channel(config.autostart);
            let app = Arc::new(App {
                config: config.clone(),
                state: Mutex::new(AppState {
                    phase: Phase::Stopped,
                    restarts: 0,
                    last_exit: None,
                    detail: String::new(),
                    version: String::new(),
                    log: VecDeque::new(),
                }),
                wanted,
            });
            tokio::spawn(supervise(
                app.clone(),
                account.clone(),
                children.clone(),
                backoff,
            ));
            apps.insert(config.name.clone(), app);
        }
        Self {
            apps: Arc::new(apps),
        }
    }

    fn get(&self, name: &str) -> Result<&Arc<App>, Status> {
        self.apps
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no app {name:?}")))
    }

    pub fn list(&self) -> Vec<pb::App> {
        self.apps.values().map(|a| a.view()).collect()
    }

    pub fn start_app(&self, name: &str) -> Result<pb::App, Status> {
        let app = self.get(name)?;
        app.wanted.send_replace(true);
        Ok(app.view())
    }

    pub fn stop_app(&self, name: &str) -> Result<pb::App, Status> {
        let app = self.get(name)?;
        app.wanted.send_replace(false);
        Ok(app.view())
    }

    pub async fn install_app(&self, name: &str, account: &Account) -> Result<pb::App, Status> {
        let app = self.get(name)?;
        if app.config.install.is_none() {
            return Err(Status::failed_precondition(format!(
                "app {name} has no install command"
            )));
        }
        install(app, account).await.map_err(Status::internal)?;
        Ok(app.view())
    }

    pub fn logs(&self, name: &str, tail: usize) -> Result<Vec<u8>, Status> {
        let app = self.get(name)?;
        let state = lock(&app.state);
        let skip = state.log.len().saturating_sub(tail);
        Ok(state.log.iter().skip(skip).copied().collect())
    }
}

fn binary_present(config: &AppConfig, account: &Account) -> bool {
    let program = config
        .binary
        .clone()
        .or_else(|| config.command.first().cloned())
        .unwrap_or_default();
    if program.contains('/') {
        return std::path::Path::new(&program).exists();
    }
    let path = users::base_env(account)
        .into_iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v)
        .unwrap_or_default();
    path.split(':')
        .any(|dir| std::path::Path::new(dir).join(&program).exists())
}

async fn pump_log<R: AsyncRead + Unpin>(app: Arc<App>, reader: Option<R>) {
    let Some(mut reader) = reader else { return };
    let mut buffer = vec![0u8; 8192];
    while let Ok(n) = reader.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        app.append_log(&buffer[..n]);
    }
}

fn command(
    argv: &[String],
    account: &Account,
    as_root: bool,
    env: &BTreeMap<String, String>,
) -> Option<tokio::process::Command> {
    let (program, args) = argv.split_first()?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(users::base_env(account))
        .envs(env)
        .current_dir(&account.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if !as_root && account.uid != nix::unistd::Uid::effective() {
        command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
    }
    Some(command)
}

/// Runs the install command; Err carries what to show.
async fn install(app: &Arc<App>, account: &Account) -> Result<(), String> {
    let Some(script) = app.config.install.clone() else {
        return Ok(());
    };
    app.set(Phase::Installing, "");
    let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), script];
    let mut command = command(&argv, account, app.config.install_as_root, &app.config.env)
        .ok_or("empty install")?;
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run the install command: {e}"))?;
    let out = tokio::spawn(pump_log(app.clone(), child.stdout.take()));
    let err = tokio::spawn(pump_log(app.clone(), child.stderr.take()));
    let status = child
        .wait()
        .await
        .map_err(|e| format!("install failed: {e}"))?;
    let _ = (out.await, err.await);
    if status.success() {
        probe_version(app, account).await;
        app.set(Phase::Stopped, "installed");
        Ok(())
    } else {
        let detail = format!("install exited with {status}");
        app.set(Phase::Failed, detail.clone());
        Err(detail)
    }
}

async fn probe_version(app: &Arc<App>, account: &Account) {
    let Some(probe) = &app.config.version else {
        return;
    };
    let Ok(regex) = regex_lite::Regex::new(&probe.regex) else {
        app.append_log(format!("invalid version regex {:?}\n", probe.regex).as_bytes());
        return;
    };
    let Some(mut command) = command(&probe.command, account, false, &app.config.env) else {
        return;
    };
    // A probe that hangs must not hold up the app; kill_on_drop ends it.
    let Ok(Ok(output)) = tokio::time::timeout(Duration::from_secs(5), command.output()).await
    else {
        app.append_log(b"version probe failed or timed out\n");
        return;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if let Some(captures) = regex.captures(&text) {
        let version = captures
            .get(1)
            .or_else(|| captures.get(0))
            .map(|m| m.as_str().to_owned());
        if let Some(version) = version {
            lock(&app.state).version = version;
        }
    }
}

/// Resolves when the app should no longer run (the guard `wait_for`
/// returns is dropped here, so the future stays `Send`).
async fn stop_requested(wanted: &mut watch::Receiver<bool>) {
    let _ = wanted.wait_for(|w| !*w).await;
}

/// One app's life: install if needed, run, restart per policy with
/// exponential backoff, stop on request.
async fn supervise(app: Arc<App>, account: Account, children: Children, base_backoff: Duration) {
    let mut wanted = app.wanted.subscribe();
    let mut backoff = base_backoff;
    loop {
        if !*wanted.borrow_and_update() {
            app.set(Phase::Stopped, "");
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        }
        if !binary_present(&app.config, &account) {
            if app.config.install.is_none() {
                app.set(
                    Phase::Failed,
                    "the program is not installed and the app has no install command",
                );
                if wanted.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if let Err(detail) = install(&app, &account).await {
                tracing::warn!(app = %app.config.name, detail, "app install failed");
                app.set(Phase::Failed, detail);
                if wanted.changed().await.is_err() {
                    return;
                }
                continue;
            }
        } else if lock(&app.state).version.is_empty() {
            probe_version(&app, &account).await;
        }
        app.set(Phase::Starting, "");
        let Some(mut command) = command(&app.config.command, &account, false, &app.config.env)
        else {
            app.set(Phase::Failed, "empty command");
            return;
        };
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                app.set(Phase::Failed, format!("cannot start: {error}"));
                if wanted.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        let pid = child.id().map_or(0, |p| p as i32);
        children.add(Pid::from_raw(pid));
        app.set(Phase::Running { pid }, "");
        tokio::spawn(pump_log(app.clone(), child.stdout.take()));
        tokio::spawn(pump_log(app.clone(), child.stderr.take()));
        let started = Instant::now();
        let status = tokio::select! {
            status = child.wait() => status.ok(),
            _ = stop_requested(&mut wanted) => {
                // Stop requested: SIGTERM, then SIGKILL after 2 s.
                let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
                match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                    Ok(status) => status.ok(),
                    Err(_) => {
                        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                        child.wait().await.ok()
                    }
                }
            }
        };
        children.remove(Pid::from_raw(pid));
        let code = status.and_then(|s| s.code());
        lock(&app.state).last_exit = code;
        if !*app.wanted.borrow() {
            continue; // stopped on request
        }
        let failed = code != Some(0);
        let restart = match app.config.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if !restart {
            app.wanted.send_replace(false);
            app.set(
                if failed {
                    Phase::Failed
                } else {
                    Phase::Stopped
                },
                format!("exited with {code:?}"),
            );
            continue;
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = base_backoff;
        }
        lock(&app.state).restarts += 1;
        app.set(
            Phase::Backoff {
                until: Instant::now() + backoff,
            },
            format!("exited with {code:?}; restarting"),
        );
        tracing::info!(app = %app.config.name, ?code, ?backoff, "app exited; restarting after backoff");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop_requested(&mut wanted) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}
