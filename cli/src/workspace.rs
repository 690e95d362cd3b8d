//! `k8shell workspace …`: the workspace lifecycle from a terminal, through
//! the provisioner's gRPC API.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use k8shell_proto::provisioner::v1 as pb;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace and follow its provisioning.
    Create {
        /// `alice~dev`, or a username with --blueprint.
        target: String,
        /// Blueprint (when TARGET is a plain username).
        #[arg(long, short)]
        blueprint: Option<String>,
        /// `key=value` seen by the blueprint's CEL expressions as `metadata`.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// Return once requested instead of following to the end.
        #[arg(long)]
        no_wait: bool,
        /// JSON output (one object per progress step, then the workspace).
        #[arg(long)]
        json: bool,
    },
    /// List workspaces.
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        blueprint: Option<String>,
        /// requested, provisioning, running, stopping, stopped, failed, deleted.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one workspace.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped or failed workspace and follow it.
    Start {
        id: String,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop a workspace (its storage is kept).
    Stop {
        id: String,
        /// Stop after this long (`10m`), not now.
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete a workspace and its volumes.
    Delete {
        id: String,
        /// Keep storages marked `retain`.
        #[arg(long)]
        keep_volumes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Follow a workspace's events.
    Watch {
        id: String,
        /// Stop once it is running, stopped, failed or deleted.
        #[arg(long)]
        until_settled: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the blueprints in force.
    Blueprints {
        /// Include templates.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

/// The provisioner's address: `K8SHELL_PROVISIONER_URL`, else the local
/// platform's state file.
fn provisioner_url(data_dir: &Path, env: &HashMap<String, String>) -> anyhow::Result<String> {
    if let Some(url) = env.get("K8SHELL_PROVISIONER_URL").filter(|u| !u.is_empty()) {
        return Ok(url.clone());
    }
    let state = k8shell_platform::PlatformState::read(data_dir)?.with_context(|| {
        format!(
            "no platform is running with data directory {} (start one with `k8shell up`, or set K8SHELL_PROVISIONER_URL)",
            data_dir.display()
        )
    })?;
    let address = state
        .services
        .iter()
        .find(|s| s.name == "provisioner")
        .and_then(|s| s.listeners.get("grpc"))
        .context("the platform state names no provisioner")?;
    Ok(format!("http://{address}"))
}

fn state_name(state: i32) -> String {
    pb::WorkspaceState::try_from(state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("WORKSPACE_STATE_")
        .to_lowercase()
}

fn parse_state(name: &str) -> anyhow::Result<i32> {
    let wanted = format!("WORKSPACE_STATE_{}", name.to_uppercase());
    pb::WorkspaceState::from_str_name(&wanted)
        .map(|s| s as i32)
        .with_context(|| format!("unknown state {name:?}"))
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            Some(humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(secs),
            ))
        })
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn workspace_json(w: &pb::Workspace) -> serde_json::Value {
    serde_json::json!({
        "id": w.id,
        "username": w.username,
        "blueprint": w.blueprint,
        "state": state_name(w.state),
        "reason": w.reason,
        "stage": w.stage,
        "progress_percent": w.progress_percent,
        "endpoint": w.endpoint,
        "created_at": timestamp(&w.created_at),
        "updated_at": timestamp(&w.updated_at),
        "version": w.version,
    })
}

fn print_workspace(w: &pb::Workspace, json: bool) {
    if json {
        println!("{}", workspace_json(w));
        return;
    }
    println!("id:        {}", w.id);
    println!("user:      {}", w.username);
    println!("blueprint: {}", w.blueprint);
    println!("state:     {}", state_name(w.state));
    if !w.reason.is_empty() {
        println!("reason:    {}", w.reason);
    }
    if !w.endpoint.is_empty() {
        println!("endpoint:  {}", w.endpoint);
    }
    println!("created:   {}", timestamp(&w.created_at));
}

/// A one-line progress bar on stderr when it is a terminal; plain lines
/// otherwise (logs, CI).
struct ProgressView {
    terminal: bool,
    last_line: String,
}

impl ProgressView {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last_line: String::new(),
        }
    }

    fn show(&mut self, message: &pb::WorkspaceProgress) {
        let Some(w) = &message.workspace else { return };
        let state = state_name(w.state);
        let label = if w.stage.is_empty() {
            state.clone()
        } else {
            w.stage.clone()
        };
        let detail = if message.detail.is_empty() {
            String::new()
        } else {
            format!(" — {}", message.detail)
        };
        let line = if state == "provisioning" || state == "running" {
            let filled = (w.progress_percent.min(100) / 5) as usize;
            format!(
                "[{}{}] {:>3}% {label}{detail}",
                "#".repeat(filled),
                " ".repeat(20 - filled),
                w.progress_percent.min(100)
            )
        } else {
            format!("{label}{detail}")
        };
        if line == self.last_line {
            return;
        }
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(stderr, "{line}");
        }
        let _ = stderr.flush();
        self.last_line = line;
    }

    fn finish(&self) {
        if self.terminal && !self.last_line.is_empty() {
            eprintln!();
        }
    }
}

/// Follows a workspace until it settles; the exit code says how it ended.
async fn follow(
    client: &mut ProvisionerServiceClient<Channel>,
    id: &str,
    json: bool,
    want: pb::WorkspaceState,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .watch_workspace(pb::WatchWorkspaceRequest {
            id: id.to_owned(),
            until_settled: false,
        })
        .await?
        .into_inner();
    let mut view = ProgressView::new();
    let mut last = None;
    while let Some(message) = stream.message().await? {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "event": message.event,
                    "detail": message.detail,
                    "workspace": message.workspace.as_ref().map(workspace_json),
                })
            );
        } else {
            view.show(&message);
        }
        let Some(workspace) = message.workspace else {
            continue;
        };
        let state = workspace.state();
        let settled = matches!(
            state,
            pb::WorkspaceState::Running
                | pb::WorkspaceState::Stopped
                | pb::WorkspaceState::Failed
                | pb::WorkspaceState::Deleted
        );
        // The snapshot of a workspace about to change is not the end.
        let transitional_snapshot = message.event == "snapshot" && state != want;
        last = Some(workspace);
        if settled && !transitional_snapshot {
            break;
        }
    }
    view.finish();
    let Some(workspace) = last else {
        anyhow::bail!("the provisioner ended the watch without a state");
    };
    if !json {
        print_workspace(&workspace, false);
    }
    Ok(if workspace.state() == want {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_metadata(pairs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--meta {pair:?}: use KEY=VALUE"))
        })
        .collect()
}

pub async fn run(
    command: WorkspaceCommand,
    data_dir: &Path,
    env: &HashMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let url = provisioner_url(data_dir, env)?;
    let mut client = ProvisionerServiceClient::connect(url.clone())
        .await
        .with_context(|| format!("cannot reach the provisioner at {url}"))?;
    let status = |error: tonic::Status| anyhow::anyhow!("{}", error.message());
    match command {
        WorkspaceCommand::Create {
            target,
            blueprint,
            metadata,
            no_wait,
            json,
        } => {
            let (username, blueprint, user_string) = match blueprint {
                Some(blueprint) => (target, blueprint, String::new()),
                None => (String::new(), String::new(), target),
            };
            let created = client
                .create_workspace(pb::CreateWorkspaceRequest {
                    username,
                    blueprint,
                    user_string,
                    metadata: parse_metadata(&metadata)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            let workspace = created.workspace.context("no workspace in the answer")?;
            if !created.created && !json {
                eprintln!("{} already exists", workspace.id);
            }
            if no_wait {
                print_workspace(&workspace, json);
                return Ok(ExitCode::SUCCESS);
            }
            follow(
                &mut client,
                &workspace.id,
                json,
                pb::WorkspaceState::Running,
            )
            .await
        }
        WorkspaceCommand::List {
            user,
            blueprint,
            state,
            json,
        } => {
            let mut request = pb::ListWorkspacesRequest {
                username: user.unwrap_or_default(),
                blueprint: blueprint.unwrap_or_default(),
                state: state.as_deref().map(parse_state).transpose()?.unwrap_or(0),
                page_size: 1000,
                page_token: String::new(),
            };
            let mut all = Vec::new();
            loop {
                let page = client
                    .list_workspaces(request.clone())
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(page.workspaces);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            if json {
                let list: Vec<_> = all.iter().map(workspace_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!(
                    "{:<24} {:<12} {:<12} {:<13} REASON",
                    "ID", "USER", "BLUEPRINT", "STATE"
                );
                for w in &all {
                    println!(
                        "{:<24} {:<12} {:<12} {:<13} {}",
                        w.id,
                        w.username,
                        w.blueprint,
                        state_name(w.state),
                        w.reason
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkspaceCommand::Get { id, json } => {
            let workspace = client
                .get_workspace(pb::GetWorkspaceRequest { id, min_version: 0 })
                .await
                .map_err(status)?
                .into_inner();
            print_workspace(&workspace, json);
            Ok(ExitCode::SUCCESS)
        }
        WorkspaceCommand::Start { id, no_wait, json } => {
            let workspace = client
                .start_workspace(pb::StartWorkspaceRequest { id: id.clone() })
                .await
                .map_err(status)?
                .into_inner();
            if no_wait {
                print_workspace(&workspace, json);
                return Ok(ExitCode::SUCCESS);
            }
            follow(&mut client, &id, json, pb::WorkspaceState::Running).await
        }
        WorkspaceCommand::Stop {
            id,
            delay,
            no_wait,
            json,
        } => {
            let delay_seconds = delay.map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32);
            let workspace = client
                .stop_workspace(pb::StopWorkspaceRequest {
                    id: id.clone(),
                    delay_seconds,
                    reason: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if no_wait || delay_seconds > 0 {
                if delay_seconds > 0 && !json {
                    eprintln!("{id} stops in {delay_seconds}s");
                }
                print_workspace(&workspace, json);
                return Ok(ExitCode::SUCCESS);
            }
            follow(&mut client, &id, json, pb::WorkspaceState::Stopped).await
        }
        WorkspaceCommand::Delete {
            id,
            keep_volumes,
            json,
        } => {
            let workspace = client
                .delete_workspace(pb::DeleteWorkspaceRequest { id, keep_volumes })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                println!("{}", workspace_json(&workspace));
            } else {
                println!("{} deleted", workspace.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkspaceCommand::Watch {
            id,
            until_settled,
            json,
        } => {
            let mut stream = client
                .watch_workspace(pb::WatchWorkspaceRequest { id, until_settled })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(message) = stream.message().await.map_err(status)? {
                let workspace = message.workspace.as_ref();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "event": message.event,
                            "detail": message.detail,
                            "workspace": workspace.map(workspace_json),
                        })
                    );
                } else {
                    println!(
                        "{:<14} {:<13} {:>3}% {} {}",
                        message.event,
                        workspace.map(|w| state_name(w.state)).unwrap_or_default(),
                        workspace.map_or(0, |w| w.progress_percent),
                        workspace.map(|w| w.stage.as_str()).unwrap_or_default(),
                        message.detail
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkspaceCommand::Blueprints { all, json } => {
            let listed = client
                .list_blueprints(pb::ListBlueprintsRequest {
                    include_templates: all,
                })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                let blueprints: Vec<_> = listed
                    .blueprints
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "name": b.name, "description": b.description,
                            "is_template": b.is_template, "file": b.file, "image": b.image,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"blueprints": blueprints, "errors": listed.errors})
                );
            } else {
                for b in &listed.blueprints {
                    let kind = if b.is_template { " (template)" } else { "" };
                    println!("{:<16} {}{kind}", b.name, b.description);
                }
                for error in &listed.errors {
                    eprintln!("error: {error}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
