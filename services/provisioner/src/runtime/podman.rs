//! The local runtime: the rendered pod run with `podman kube play`,
//! watched with `podman events`. Podman's settings come from the
//! project-owned containers.conf (`CONTAINERS_CONF`), never from /etc.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use tokio::sync::{OnceCell, mpsc};

use super::render::{
    self, DaemonAccess, RenderTarget, SPEC_HASH_ANNOTATION, WORKSPACE_CONTAINER, WORKSPACE_LABEL,
};
use super::{ActualState, Progress, ProgressSink, Runtime, RuntimeError, RuntimeEvent};
use crate::blueprint::WorkspaceSpec;

/// Podman runtime settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodmanConfig {
    /// The podman binary.
    pub binary: PathBuf,
    /// containers.conf to use (`CONTAINERS_CONF`); podman's own lookup when unset.
    pub containers_conf: Option<PathBuf>,
    /// `--network` of `podman kube play`: `bridge`, `none`, `host`, a named network.
    pub network: String,
    /// Per-workspace directories (k8shelld's socket and config).
    pub state_dir: PathBuf,
    /// Static k8shelld binary the k8shelld image is built from.
    pub k8shelld_binary: Option<PathBuf>,
    /// Use this image for the install step instead of building one.
    pub k8shelld_image: Option<String>,
}

impl Default for PodmanConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("podman"),
            containers_conf: None,
            network: "bridge".to_owned(),
            state_dir: PathBuf::from("/var/lib/k8shell/workspaces"),
            k8shelld_binary: None,
            k8shelld_image: None,
        }
    }
}

/// Runs workspaces as podman pods.
pub struct PodmanRuntime {
    config: PodmanConfig,
    k8shelld_image: OnceCell<String>,
}

struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

impl PodmanRuntime {
    /// A runtime with `config`; nothing runs until used.
    pub fn new(config: PodmanConfig) -> Self {
        Self {
            config,
            k8shelld_image: OnceCell::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.config.binary);
        command.args(args).kill_on_drop(true).stdin(Stdio::null());
        if let Some(conf) = &self.config.containers_conf {
            command.env("CONTAINERS_CONF", conf);
        }
        command
    }

    async fn run(&self, args: &[&str]) -> Result<Output, RuntimeError> {
        let output = self
            .command(args)
            .output()
            .await
            .map_err(|e| RuntimeError::Unavailable {
                runtime: "podman",
                message: format!("cannot run {}: {e}", self.config.binary.display()),
            })?;
        Ok(Output {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    async fn run_ok(&self, operation: &str, args: &[&str]) -> Result<String, RuntimeError> {
        let output = self.run(args).await?;
        if output.success {
            Ok(output.stdout)
        } else {
            Err(RuntimeError::Failed {
                operation: operation.to_owned(),
                message: output.stderr,
            })
        }
    }

    fn workspace_dir(&self, workspace_id: &str) -> PathBuf {
        self.config.state_dir.join(workspace_id)
    }

    fn run_dir(&self, workspace_id: &str) -> PathBuf {
        self.workspace_dir(workspace_id).join("run")
    }

    /// The image the install step runs: configured, or built once from the
    /// static binary and tagged by its hash (rebuilt when the binary changes).
    async fn k8shelld_image(&self) -> Result<String, RuntimeError> {
        self.k8shelld_image
            .get_or_try_init(|| async {
                if let Some(image) = &self.config.k8shelld_image {
                    return Ok(image.clone());
                }
                let binary = self.config.k8shelld_binary.clone().ok_or_else(|| {
                    RuntimeError::Unavailable {
                        runtime: "podman",
                        message: "neither k8shelld_image nor k8shelld_binary is configured"
                            .to_owned(),
                    }
                })?;
                self.build_k8shelld_image(&binary).await
            })
            .await
            .cloned()
    }

    async fn build_k8shelld_image(&self, binary: &Path) -> Result<String, RuntimeError> {
        let failed = |message: String| RuntimeError::Failed {
            operation: "building the k8shelld image".to_owned(),
            message,
        };
        let bytes = tokio::fs::read(binary)
            .await
            .map_err(|e| failed(format!("cannot read {}: {e}", binary.display())))?;
        let digest = Sha256::digest(&bytes);
        let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        let image = format!("localhost/k8shell-k8shelld:{tag}");
        if self.run(&["image", "exists", &image]).await?.success {
            return Ok(image);
        }
        let dir = tempfile::tempdir().map_err(|e| failed(e.to_string()))?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).map_err(|e| failed(e.to_string()))?;
        std::fs::write(root.join("k8shelld"), &bytes).map_err(|e| failed(e.to_string()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                root.join("k8shelld"),
                std::fs::Permissions::from_mode(0o755),
            )
            .map_err(|e| failed(e.to_string()))?;
        }
        let tar = dir.path().join("k8shelld.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .await
            .map_err(|e| failed(format!("cannot run tar: {e}")))?;
        if !status.success() {
            return Err(failed("tar failed".to_owned()));
        }
        let tar = tar.to_string_lossy().into_owned();
        self.run_ok(
            "building the k8shelld image",
            &[
                "import",
                "-q",
                "--change",
                "ENTRYPOINT=[\"/k8shelld\"]",
                &tar,
                &image,
            ],
        )
        .await?;
        tracing::info!(%image, "built the k8shelld image");
        Ok(image)
    }

    async fn pod_hash(&self, pod: &str) -> Result<Option<String>, RuntimeError> {
        let output = self
            .run(&["pod", "inspect", pod, "--format", "{{json .Labels}}"])
            .await?;
        if !output.success {
            return Ok(None);
        }
        let labels: std::collections::BTreeMap<String, String> =
            serde_json::from_str(output.stdout.trim()).unwrap_or_default();
        Ok(Some(
            labels
                .get(SPEC_HASH_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
        ))
    }

    async fn provision_inner(
        &self,
        spec: &WorkspaceSpec,
        daemon_config: &str,
        progress: &ProgressSink,
    ) -> Result<String, RuntimeError> {
        let report = |stage: &str, percent: u8, detail: String| {
            let _ = progress.send(Progress {
                stage: stage.to_owned(),
                percent,
                detail,
            });
        };
        let id = &spec.workspace_id;
        let pod = render::pod_name(id);
        let k8shelld_image = self.k8shelld_image().await?;
        let run_dir = self.run_dir(id);
        let failed = |operation: &str, e: std::io::Error| RuntimeError::Failed {
            operation: operation.to_owned(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(&run_dir).map_err(|e| failed("creating the run directory", e))?;
        std::fs::write(run_dir.join("k8shelld.toml"), daemon_config)
            .map_err(|e| failed("writing k8shelld.toml", e))?;
        self.record_volumes(spec)
            .map_err(|e| failed("recording the workspace's volumes", e))?;
        let target = RenderTarget {
            k8shelld_image,
            access: DaemonAccess::HostDir(run_dir.to_string_lossy().into_owned()),
            restart_policy: "Never",
            namespace: None,
        };
        let hash = render::spec_hash(spec, &target);
        let endpoint = format!("unix://{}", run_dir.join("k8shelld.sock").display());

        match self.pod_hash(&pod).await? {
            Some(existing) if existing == hash => {
                if self.state(id).await? == ActualState::Running {
                    return Ok(endpoint);
                }
                report("Starting", 60, "starting the existing pod".to_owned());
                self.run_ok("podman pod start", &["pod", "start", &pod])
                    .await?;
                return Ok(endpoint);
            }
            Some(_) => report(
                "Creating",
                30,
                "the blueprint changed; re-creating the pod (volumes are kept)".to_owned(),
            ),
            None => report("Creating", 30, "creating the pod".to_owned()),
        }

        if spec.pull_policy != "Never" {
            let present = self.run(&["image", "exists", &spec.image]).await?.success;
            if !present || spec.pull_policy == "Always" {
                report("Pulling", 40, format!("pulling {}", spec.image));
                self.run_ok("pulling the image", &["pull", "-q", &spec.image])
                    .await?;
            }
        }
        let mut pod_manifest = render::render_pod(spec, &target);
        // Podman reads labels, not annotations, back through `pod inspect`.
        if let Some(labels) = pod_manifest.metadata.labels.as_mut() {
            labels.insert(SPEC_HASH_ANNOTATION.to_owned(), hash);
        }
        let yaml = render::to_yaml(&pod_manifest).map_err(|e| RuntimeError::Failed {
            operation: "rendering the pod".to_owned(),
            message: e.to_string(),
        })?;
        let manifest = self.workspace_dir(id).join("pod.yaml");
        std::fs::write(&manifest, yaml).map_err(|e| failed("writing pod.yaml", e))?;
        let manifest = manifest.to_string_lossy().into_owned();
        report("Starting", 60, "podman kube play".to_owned());
        self.run_ok(
            "podman kube play",
            &[
                "kube",
                "play",
                "--replace",
                "--network",
                &self.config.network,
                &manifest,
            ],
        )
        .await?;
        Ok(endpoint)
    }

    fn volumes_file(&self, workspace_id: &str) -> PathBuf {
        self.workspace_dir(workspace_id).join("volumes.json")
    }

    /// Volumes every provision of the workspace created.
    fn recorded_volumes(&self, workspace_id: &str) -> render::OwnedVolumes {
        std::fs::read(self.volumes_file(workspace_id))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<RecordedVolumes>(&bytes).ok())
            .map(|r| render::OwnedVolumes {
                persistent: r.persistent,
                retainable: r.retainable,
                scratch: r.scratch,
            })
            .unwrap_or_default()
    }

    fn record_volumes(&self, spec: &WorkspaceSpec) -> std::io::Result<()> {
        let mut recorded = self.recorded_volumes(&spec.workspace_id);
        let now = render::owned_volumes(spec);
        for (into, from) in [
            (&mut recorded.persistent, now.persistent),
            (&mut recorded.retainable, now.retainable),
            (&mut recorded.scratch, now.scratch),
        ] {
            for name in from {
                if !into.contains(&name) {
                    into.push(name);
                }
            }
        }
        // A volume once marked for retention stays retained: keeping a
        // volume too many is better than deleting someone's data.
        recorded
            .persistent
            .retain(|name| !recorded.retainable.contains(name));
        let file = RecordedVolumes {
            persistent: recorded.persistent,
            retainable: recorded.retainable,
            scratch: recorded.scratch,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        std::fs::write(self.volumes_file(&spec.workspace_id), bytes)
    }

    fn container_name(workspace_id: &str) -> String {
        format!("{}-{WORKSPACE_CONTAINER}", render::pod_name(workspace_id))
    }

    async fn last_log_line(&self, container: &str) -> String {
        match self.run(&["logs", "--tail", "5", container]).await {
            Ok(output) => {
                let text = strip_ansi(&format!("{}\n{}", output.stdout, output.stderr));
                text.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect()
            }
            Err(_) => String::new(),
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct RecordedVolumes {
    persistent: Vec<String>,
    retainable: Vec<String>,
    scratch: Vec<String>,
}

#[derive(Deserialize)]
struct ListedContainer {
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "State", default)]
    state: String,
    #[serde(rename = "ExitCode", default)]
    exit_code: i64,
    #[serde(rename = "Labels", default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct EventLine {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Attributes", default)]
    attributes: Option<std::collections::BTreeMap<String, String>>,
    #[serde(rename = "ContainerExitCode", default)]
    exit_code: Option<i64>,
}

impl Runtime for PodmanRuntime {
    fn name(&self) -> &'static str {
        "podman"
    }

    fn provision<'a>(
        &'a self,
        spec: &'a WorkspaceSpec,
        daemon_config: &'a str,
        progress: &'a ProgressSink,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        self.provision_inner(spec, daemon_config, progress).boxed()
    }

    fn stop<'a>(
        &'a self,
        workspace_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let pod = render::pod_name(workspace_id);
            let seconds = grace.as_secs().max(1).to_string();
            let output = self.run(&["pod", "stop", "-t", &seconds, &pod]).await?;
            if output.success || output.stderr.contains("no pod with name or ID") {
                Ok(())
            } else {
                Err(RuntimeError::Failed {
                    operation: "podman pod stop".to_owned(),
                    message: output.stderr,
                })
            }
        }
        .boxed()
    }

    fn delete<'a>(
        &'a self,
        workspace_id: &'a str,
        retain: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let id = workspace_id;
            let pod = render::pod_name(id);
            let output = self.run(&["pod", "rm", "-f", "-t", "0", &pod]).await?;
            if !output.success && !output.stderr.contains("no pod with name or ID") {
                return Err(RuntimeError::Failed {
                    operation: "podman pod rm".to_owned(),
                    message: output.stderr,
                });
            }
            let owned = self.recorded_volumes(id);
            let mut doomed: Vec<&String> = owned
                .persistent
                .iter()
                .chain(owned.scratch.iter())
                .collect();
            if !retain {
                doomed.extend(owned.retainable.iter());
            }
            for volume in doomed {
                let output = self.run(&["volume", "rm", "-f", volume]).await?;
                if !output.success && !output.stderr.contains("no such volume") {
                    return Err(RuntimeError::Failed {
                        operation: format!("podman volume rm {volume}"),
                        message: output.stderr,
                    });
                }
            }
            match std::fs::remove_dir_all(self.workspace_dir(id)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RuntimeError::Failed {
                    operation: "removing the workspace directory".to_owned(),
                    message: e.to_string(),
                }),
            }
        }
        .boxed()
    }

    fn state<'a>(
        &'a self,
        workspace_id: &'a str,
    ) -> BoxFuture<'a, Result<ActualState, RuntimeError>> {
        async move {
            let container = Self::container_name(workspace_id);
            let output = self
                .run(&[
                    "container",
                    "inspect",
                    &container,
                    "--format",
                    "{{.State.Status}} {{.State.ExitCode}}",
                ])
                .await?;
            if !output.success {
                return Ok(ActualState::Missing);
            }
            let mut fields = output.stdout.split_whitespace();
            let status = fields.next().unwrap_or("");
            let code = fields.next().unwrap_or("");
            Ok(match status {
                "running" => ActualState::Running,
                "exited" | "stopped" => {
                    let last = self.last_log_line(&container).await;
                    ActualState::Stopped {
                        detail: if last.is_empty() {
                            format!("exited with code {code}")
                        } else {
                            format!("exited with code {code}: {last}")
                        },
                    }
                }
                other => ActualState::Stopped {
                    detail: other.to_owned(),
                },
            })
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(String, ActualState)>, RuntimeError>> {
        async move {
            let filter = format!("label={WORKSPACE_LABEL}");
            let stdout = self
                .run_ok(
                    "podman ps",
                    &["ps", "-a", "--filter", &filter, "--format", "json"],
                )
                .await?;
            let containers: Vec<ListedContainer> =
                serde_json::from_str(stdout.trim()).map_err(|e| RuntimeError::Failed {
                    operation: "podman ps".to_owned(),
                    message: format!("unexpected output: {e}"),
                })?;
            let mut found = Vec::new();
            for container in containers {
                let Some(id) = container
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(WORKSPACE_LABEL))
                    .cloned()
                else {
                    continue;
                };
                if !container
                    .names
                    .iter()
                    .any(|n| *n == Self::container_name(&id))
                {
                    continue;
                }
                let state = if container.state == "running" {
                    ActualState::Running
                } else {
                    ActualState::Stopped {
                        detail: format!("{} (exit code {})", container.state, container.exit_code),
                    }
                };
                found.push((id, state));
            }
            Ok(found)
        }
        .boxed()
    }

    fn watch(&self) -> mpsc::Receiver<RuntimeEvent> {
        let (tx, rx) = mpsc::channel(256);
        let binary = self.config.binary.clone();
        let conf = self.config.containers_conf.clone();
        tokio::spawn(async move {
            loop {
                let mut command = Command::new(&binary);
                command
                    .args([
                        "events",
                        "--format",
                        "json",
                        "--filter",
                        "type=container",
                        "--filter",
                        &format!("label={WORKSPACE_LABEL}"),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .stdin(Stdio::null())
                    .kill_on_drop(true);
                if let Some(conf) = &conf {
                    command.env("CONTAINERS_CONF", conf);
                }
                match command.spawn() {
                    Ok(mut child) => {
                        if let Some(stdout) = child.stdout.take() {
                            let mut lines = tokio::io::BufReader::new(stdout).lines();
                            loop {
                                let line = tokio::select! {
                                    _ = tx.closed() => return,
                                    line = lines.next_line() => line,
                                };
                                let Ok(Some(line)) = line else { break };
                                if let Some(event) = parse_event(&line)
                                    && tx.send(event).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                        let _ = child.kill().await;
                    }
                    Err(error) => tracing::warn!(%error, "cannot run podman events"),
                }
                if tx.is_closed() {
                    return;
                }
                tracing::warn!("podman events ended; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        rx
    }
}

/// Drops terminal colour sequences (`ESC [ ... letter`) from log text.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_event(line: &str) -> Option<RuntimeEvent> {
    let event: EventLine = serde_json::from_str(line).ok()?;
    let workspace_id = event.attributes.as_ref()?.get(WORKSPACE_LABEL)?.clone();
    if event.name != PodmanRuntime::container_name(&workspace_id) {
        return None;
    }
    let kind = match event.status.as_str() {
        "died" => "died",
        "remove" => "removed",
        "start" => "started",
        _ => return None,
    };
    Some(RuntimeEvent {
        workspace_id,
        kind: kind.to_owned(),
        detail: event
            .exit_code
            .map(|c| format!("exit code {c}"))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped_from_log_lines() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m started"),
            "2026  INFO started"
        );
    }

    #[test]
    fn events_of_workspace_containers_are_recognised() {
        let died = r#"{"ID":"x","Name":"alice-1234567-workspace","Status":"died","Type":"container","ContainerExitCode":137,"Attributes":{"k8shell.io/workspace":"alice-1234567"}}"#;
        assert_eq!(
            parse_event(died),
            Some(RuntimeEvent {
                workspace_id: "alice-1234567".into(),
                kind: "died".into(),
                detail: "exit code 137".into()
            })
        );
        let init = r#"{"Name":"alice-1234567-install-k8shelld","Status":"died","Attributes":{"k8shell.io/workspace":"alice-1234567"}}"#;
        assert_eq!(parse_event(init), None, "the install step's exit is normal");
        let unlabelled = r#"{"Name":"other","Status":"died","Attributes":{}}"#;
        assert_eq!(parse_event(unlabelled), None);
        assert_eq!(parse_event("not json"), None);
    }
}
