//! Which workspace a connection reaches, and getting it running.
//!
//! After login the proxy asks authz for `session:start`, then starts the
//! workspace through the provisioner's `EnsureRunning` in the background:
//! the work begins at once, and the first channel that needs the workspace
//! waits on the [`WorkspaceGate`], showing the progress lines as they come.

use std::collections::HashMap;
use std::time::Duration;

use k8shell_addressing::UserString;
use k8shell_proto::authz::v1 as authz;
use k8shell_proto::provisioner::v1 as provisioner;
use tokio::sync::watch;

use crate::auth::Login;
use crate::backends::Backends;

/// A running workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Workspace id.
    pub id: String,
    /// How k8shelld is reached.
    pub endpoint: String,
    /// The blueprint's splash (login banner); empty: none.
    pub splash: String,
}

/// Where the workspace is on its way to running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateState {
    /// Still starting; every progress line so far.
    Starting(Vec<String>),
    /// Ready.
    Running(Running),
    /// It will not run; why.
    Failed(String),
}

/// Waits for the workspace.
#[derive(Clone)]
pub struct WorkspaceGate {
    state: watch::Receiver<GateState>,
}

impl WorkspaceGate {
    /// The running workspace; `progress` gets each new line while waiting.
    pub async fn wait(&self, mut progress: impl FnMut(&str)) -> Result<Running, String> {
        let mut state = self.state.clone();
        let mut shown = 0;
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                GateState::Running(running) => return Ok(running),
                GateState::Failed(reason) => return Err(reason),
                GateState::Starting(lines) => {
                    for line in lines.iter().skip(shown) {
                        progress(line);
                    }
                    shown = lines.len();
                }
            }
            if state.changed().await.is_err() {
                return Err("the workspace start was abandoned".to_owned());
            }
        }
    }

    /// The workspace when it already runs.
    pub fn running(&self) -> Option<Running> {
        match &*self.state.borrow() {
            GateState::Running(running) => Some(running.clone()),
            _ => None,
        }
    }
}

/// What `session:start` decided, and about which workspace.
pub struct Admission {
    /// The workspace's owner.
    pub owner: String,
    /// The workspace id when the user string named one (`ws=`).
    pub workspace_id: Option<String>,
    /// Obligations to honour (`record`).
    pub obligations: HashMap<String, String>,
}

/// Resource attributes every decision about this workspace carries.
pub fn resource(owner: &str, workspace_id: &str) -> authz::Resource {
    authz::Resource {
        r#type: "workspace".to_owned(),
        id: workspace_id.to_owned(),
        attributes: HashMap::from([("owner".to_owned(), owner.to_owned())]),
    }
}

/// What the blueprint named `name` asks to be recorded (empty: it does
/// not say, or there is no such blueprint: the start will report that).
async fn blueprint_recording(backends: &Backends, name: &str) -> Result<String, String> {
    let blueprints = backends
        .provisioner
        .clone()
        .list_blueprints(provisioner::ListBlueprintsRequest {
            include_templates: false,
        })
        .await
        .map_err(|status| format!("cannot read the blueprints: {}", status.message()))?
        .into_inner()
        .blueprints;
    Ok(blueprints
        .into_iter()
        .find(|b| b.name == name)
        .map(|b| b.recording)
        .unwrap_or_default())
}

/// Asks for `session:start`; `Err` carries the message for the client.
///
/// The resource carries the workspace's owner, its blueprint and, when the
/// blueprint asks for one, its recording (`record`), which the policy
/// turns into the `record` obligation.
pub async fn admit(
    backends: &Backends,
    login: &Login,
    target: &UserString,
    default_blueprint: &str,
    client_address: &str,
) -> Result<Admission, String> {
    let (owner, workspace_id, blueprint) = match &target.workspace {
        Some(id) => {
            let workspace = backends
                .provisioner
                .clone()
                .get_workspace(provisioner::GetWorkspaceRequest {
                    id: id.clone(),
                    min_version: 0,
                })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::NotFound => format!("there is no workspace {id}"),
                    _ => format!("cannot look up workspace {id}: {}", status.message()),
                })?
                .into_inner();
            (workspace.username, Some(id.clone()), workspace.blueprint)
        }
        None => (
            target.username.clone(),
            None,
            target
                .blueprint
                .clone()
                .unwrap_or_else(|| default_blueprint.to_owned()),
        ),
    };
    let recording = blueprint_recording(backends, &blueprint).await?;
    let mut resource = resource(&owner, workspace_id.as_deref().unwrap_or(""));
    resource
        .attributes
        .insert("blueprint".to_owned(), blueprint.clone());
    if !recording.is_empty() {
        resource.attributes.insert("record".to_owned(), recording);
    }
    let mut context = HashMap::from([
        ("transport".to_owned(), "ssh".to_owned()),
        ("client_address".to_owned(), client_address.to_owned()),
    ]);
    if let Some(account) = &target.login {
        context.insert("as_user".to_owned(), account.clone());
    }
    let decision = backends
        .decide(authz::EvaluateRequest {
            subject: Some(login.subject()),
            action: "session:start".to_owned(),
            resource: Some(resource),
            context,
            capability_check: false,
        })
        .await;
    if !decision.allow {
        return Err(format!(
            "permission denied: {}",
            decision.reasons.join("; ")
        ));
    }
    Ok(Admission {
        owner,
        workspace_id,
        obligations: decision.obligations,
    })
}

/// Starts the workspace in the background; the gate reports how it goes.
/// Without `ws=` the workspace is the user's of the user string's
/// blueprint (or `default_blueprint`), created when it does not exist.
pub fn start(
    backends: Backends,
    target: &UserString,
    workspace_id: Option<String>,
    default_blueprint: &str,
    timeout: Duration,
) -> WorkspaceGate {
    let (state, gate) = watch::channel(GateState::Starting(Vec::new()));
    let request = match workspace_id {
        Some(id) => provisioner::EnsureRunningRequest {
            id,
            ..Default::default()
        },
        None => provisioner::EnsureRunningRequest {
            username: target.username.clone(),
            blueprint: target
                .blueprint
                .clone()
                .unwrap_or_else(|| default_blueprint.to_owned()),
            ..Default::default()
        },
    };
    tokio::spawn(async move {
        let outcome = tokio::time::timeout(timeout, ensure_running(backends, request, &state))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the workspace did not start within {}",
                    humantime_seconds(timeout)
                ))
            });
        let _ = state.send(match outcome {
            Ok(running) => GateState::Running(running),
            Err(reason) => GateState::Failed(reason),
        });
    });
    WorkspaceGate { state: gate }
}

fn humantime_seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

async fn ensure_running(
    backends: Backends,
    request: provisioner::EnsureRunningRequest,
    state: &watch::Sender<GateState>,
) -> Result<Running, String> {
    let mut stream = backends
        .provisioner
        .clone()
        .ensure_running(request)
        .await
        .map_err(|status| format!("cannot start the workspace: {}", status.message()))?
        .into_inner();
    let mut lines: Vec<String> = Vec::new();
    let mut last = String::new();
    loop {
        let message = stream
            .message()
            .await
            .map_err(|status| format!("the workspace did not start: {}", status.message()))?;
        let Some(progress) = message else {
            return Err("the provisioner ended the start without a running workspace".to_owned());
        };
        let Some(workspace) = progress.workspace else {
            continue;
        };
        if workspace.state() == provisioner::WorkspaceState::Running {
            if workspace.endpoint.is_empty() {
                return Err(format!(
                    "workspace {} runs but has no endpoint",
                    workspace.id
                ));
            }
            return Ok(Running {
                id: workspace.id,
                endpoint: workspace.endpoint,
                splash: workspace.splash,
            });
        }
        // One line per visible change (the snapshot of a running workspace
        // says nothing).
        let line = progress_line(&workspace, &progress.event, &progress.detail);
        if line != last {
            last.clone_from(&line);
            lines.push(line);
            let _ = state.send(GateState::Starting(lines.clone()));
        }
    }
}

fn progress_line(workspace: &provisioner::Workspace, event: &str, detail: &str) -> String {
    let state = workspace
        .state()
        .as_str_name()
        .trim_start_matches("WORKSPACE_STATE_")
        .to_lowercase();
    let mut line = format!("k8shell: workspace {} is {state}", workspace.id);
    if !workspace.stage.is_empty() {
        line.push_str(&format!(
            " ({} {}%)",
            workspace.stage, workspace.progress_percent
        ));
    }
    if !detail.is_empty() && event != "snapshot" {
        line.push_str(&format!(": {detail}"));
    }
    line
}
