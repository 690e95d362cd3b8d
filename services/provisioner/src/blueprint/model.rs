//! The blueprint file format. Field names are camelCase, as in Kubernetes
//! manifests; values marked `Expr` may be `!cel` expressions.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use super::expr::Expr;

/// One blueprint: how to build a workspace.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Blueprint {
    /// Unique name, `[a-z0-9-]`, used in `alice~<name>` and the API.
    pub name: String,
    /// Shown in listings.
    #[serde(default)]
    pub description: String,
    /// A template only provides defaults to others and can't be provisioned.
    #[serde(default)]
    pub is_template: bool,
    /// Parent blueprint: its fields are the defaults of this one (maps
    /// merge, lists append, items with the same `name` merge, and a value
    /// tagged `!replace` replaces the parent's instead).
    #[serde(default)]
    pub template: Option<String>,
    /// Container image of the workspace.
    #[serde(default)]
    pub image: Option<Expr<String>>,
    /// When the runtime pulls the image.
    #[serde(default)]
    pub image_pull_policy: Option<PullPolicy>,
    /// The account developers work as.
    #[serde(default)]
    pub user: UserSpec,
    /// Environment of every process in the workspace.
    #[serde(default)]
    pub env: BTreeMap<String, Expr<String>>,
    /// Labels added to the pod.
    #[serde(default)]
    pub labels: BTreeMap<String, Expr<String>>,
    /// Annotations added to the pod.
    #[serde(default)]
    pub annotations: BTreeMap<String, Expr<String>>,
    /// CPU and memory requests and limits.
    #[serde(default)]
    pub resources: Resources,
    /// Kubernetes node selection.
    #[serde(default)]
    pub node_selector: BTreeMap<String, Expr<String>>,
    /// Kubernetes tolerations.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Volumes mounted into the workspace.
    #[serde(default)]
    pub storages: Vec<Storage>,
    /// Scripts run once, in order, after the workspace first starts.
    #[serde(default)]
    pub init_scripts: Vec<InitScript>,
    /// Long-running programs k8shelld starts and supervises.
    #[serde(default)]
    pub apps: Vec<App>,
    /// Ports the workspace exposes (through the apiserver's app proxy).
    #[serde(default)]
    pub ports: Vec<ExposedPort>,
    /// A rootless podman sidecar for containers inside the workspace.
    #[serde(default)]
    pub podman: PodmanSidecar,
    /// Network policy class (Kubernetes NetworkPolicy; nfgate locally).
    #[serde(default)]
    pub network_policy: Option<String>,
    /// Privileges of the workspace container.
    #[serde(default)]
    pub security_context: SecurityContext,
    /// Text shown when a user connects (SSH banner, console).
    #[serde(default)]
    pub splash: Option<Expr<String>>,
    /// Stop after this long without sessions or input (`30m`, `2h`); `0`
    /// never stops.
    #[serde(default)]
    pub idle_timeout: Option<Expr<String>>,
    /// What the SSH proxy records of sessions to these workspaces. The
    /// authorization policy has the last word (its `record` obligation
    /// starts from this value); unset: nothing.
    #[serde(default)]
    pub recording: Option<Recording>,
}

/// What is recorded of SSH sessions.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Recording {
    /// Nothing.
    None,
    /// Terminal sessions' output.
    Shell,
    /// Terminal sessions' output and keystrokes.
    Input,
    /// The output of terminal sessions and of commands.
    All,
}

impl Recording {
    /// The name used in the file, the API and policy input.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Shell => "shell",
            Self::Input => "input",
            Self::All => "all",
        }
    }
}

/// Image pull policy.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when missing (the default).
    IfNotPresent,
    /// Never pull (local images).
    Never,
}

/// The workspace account.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserSpec {
    /// Login name; the k8shell username when unset.
    #[serde(default)]
    pub name: Option<Expr<String>>,
    /// Numeric uid; 1000 when unset.
    #[serde(default)]
    pub uid: Option<Expr<u32>>,
    /// Numeric gid; the uid when unset.
    #[serde(default)]
    pub gid: Option<Expr<u32>>,
    /// Home directory; `/home/<name>` when unset.
    #[serde(default)]
    pub home: Option<Expr<String>>,
    /// Login shell; `/bin/bash` when unset.
    #[serde(default)]
    pub shell: Option<Expr<String>>,
    /// Passwordless sudo.
    #[serde(default)]
    pub sudo: Option<bool>,
}

/// Requests and limits.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// What the scheduler reserves.
    #[serde(default)]
    pub requests: ResourceAmounts,
    /// Hard caps.
    #[serde(default)]
    pub limits: ResourceAmounts,
}

/// CPU and memory as Kubernetes quantities (`500m`, `2`, `4Gi`).
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceAmounts {
    /// CPU.
    #[serde(default)]
    pub cpu: Option<Expr<String>>,
    /// Memory.
    #[serde(default)]
    pub memory: Option<Expr<String>>,
}

/// A Kubernetes toleration.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    /// Taint key; empty with `Exists` tolerates everything.
    #[serde(default)]
    pub key: Option<String>,
    /// `Exists` or `Equal`.
    #[serde(default)]
    pub operator: Option<TolerationOperator>,
    /// Taint value for `Equal`.
    #[serde(default)]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    #[serde(default)]
    pub effect: Option<TaintEffect>,
    /// How long a `NoExecute` taint is tolerated.
    #[serde(default)]
    pub toleration_seconds: Option<i64>,
}

/// Toleration operator.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
pub enum TolerationOperator {
    /// Any value.
    Exists,
    /// The given value.
    Equal,
}

/// Taint effect.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
pub enum TaintEffect {
    /// Not scheduled.
    NoSchedule,
    /// Avoided.
    PreferNoSchedule,
    /// Evicted.
    NoExecute,
}

/// A volume.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Storage {
    /// Name, `[a-z0-9-]`, unique in the blueprint.
    pub name: String,
    /// Kind of volume.
    #[serde(rename = "type")]
    pub kind: StorageKind,
    /// Mount path in the workspace.
    pub path: Expr<String>,
    /// Capacity for `local` and `shared` on Kubernetes (a PVC request).
    #[serde(default)]
    pub size: Option<Expr<String>>,
    /// Keep the volume when the workspace is deleted (`local`); a new
    /// workspace with the same id re-attaches it.
    #[serde(default)]
    pub retain: bool,
    /// Who shares a `shared` volume: the owner's workspaces (`user`, the
    /// default) or every workspace (`global`).
    #[serde(default)]
    pub scope: Option<SharedScope>,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Volume kinds.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StorageKind {
    /// Persistent, one per workspace.
    Local,
    /// Persistent, shared between workspaces.
    Shared,
    /// Scratch space that lives as long as the pod.
    EmptyDir,
    /// Scratch space in memory.
    Memory,
}

/// Sharing scope of a shared volume.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum SharedScope {
    /// The owner's workspaces.
    User,
    /// Every workspace.
    Global,
}

/// A script run once.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitScript {
    /// Name, unique in the blueprint; a run is recorded under it.
    pub name: String,
    /// Shell script (run with `sh -c`).
    pub script: Expr<String>,
    /// Run as root instead of the workspace user.
    #[serde(default)]
    pub as_root: bool,
}

/// A supervised program.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct App {
    /// Name, unique in the blueprint.
    pub name: String,
    /// argv.
    pub command: Vec<Expr<String>>,
    /// Binary the app needs; `install` runs when it is missing.
    #[serde(default)]
    pub binary: Option<String>,
    /// Install script.
    #[serde(default)]
    pub install: Option<Expr<String>>,
    /// Run the install script as root.
    #[serde(default)]
    pub install_as_root: bool,
    /// Port it listens on.
    #[serde(default)]
    pub port: Option<u16>,
    /// `http` or `tcp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// `always`, `on-failure` or `never`.
    #[serde(default)]
    pub restart: Option<String>,
    /// Started with the workspace (default true).
    #[serde(default)]
    pub autostart: Option<bool>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, Expr<String>>,
}

/// A port the workspace exposes.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExposedPort {
    /// Name, unique in the blueprint.
    pub name: String,
    /// Port inside the workspace.
    pub port: u16,
    /// `http` (default) or `tcp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Reachable without logging in.
    #[serde(default)]
    pub public: bool,
}

/// The podman sidecar.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodmanSidecar {
    /// Run it.
    #[serde(default)]
    pub enabled: bool,
    /// Its image (`quay.io/podman/stable` on Kubernetes by default).
    #[serde(default)]
    pub image: Option<String>,
}

/// Privileges.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityContext {
    /// Run privileged (needed by some nested container setups).
    #[serde(default)]
    pub privileged: bool,
    /// Capabilities to add.
    #[serde(default)]
    pub add_capabilities: Vec<String>,
    /// Capabilities to drop.
    #[serde(default)]
    pub drop_capabilities: Vec<String>,
}
