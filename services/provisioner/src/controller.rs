//! Drives workspaces: takes the lifecycle commands, does the runtime work
//! they claim, records every outcome as an event, and keeps the runtime in
//! line with what owners want (reconcile) and stops idle workspaces.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8shell_bus::{EventStore, ExecuteError, execute};
use k8shell_events::AggregateId;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blueprint::{BlueprintCatalog, CelScope, WorkspaceSpec, resolve};
use crate::daemon;
use crate::id::{self, MAX_HEX, MIN_HEX};
use crate::read_model::{self, ListFilter};
use crate::runtime::render::render_daemon_config;
use crate::runtime::{ActualState, Progress, Runtime, RuntimeEvent};
use crate::tokens::WorkspaceTokens;
use crate::workspace::{
    CreateDecision, DecideError, Outcome, Refusal, StartDecision, State, StopDecision, Workspace,
    WorkspaceAggregate, decide_create, decide_delete, decide_outcome, decide_schedule_stop,
    decide_start, decide_stop,
};

/// Lifecycle settings (`[lifecycle]` in the provisioner's config).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Longest a start may take until k8shelld answers.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long a stop waits for the workspace before killing it.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// How often desired and actual state are compared (runtime events
    /// trigger it at once too).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// How often running workspaces are checked for idleness.
    #[serde(with = "humantime_serde")]
    pub idle_check_interval: Duration,
    /// How long before an idle stop the warning event goes out.
    #[serde(with = "humantime_serde")]
    pub idle_warning: Duration,
    /// Restarts of a crashing workspace allowed within `restart_window`
    /// before it is left failed.
    pub max_restarts: u32,
    /// See `max_restarts`.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// What blueprints' `env(name)` may read. Never the provisioner's own
    /// environment, which holds its secrets.
    pub blueprint_env: BTreeMap<String, String>,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            start_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(3),
            reconcile_interval: Duration::from_secs(30),
            idle_check_interval: Duration::from_secs(30),
            idle_warning: Duration::from_secs(5 * 60),
            max_restarts: 3,
            restart_window: Duration::from_secs(10 * 60),
            blueprint_env: BTreeMap::new(),
        }
    }
}

/// A lifecycle command failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such workspace or blueprint.
    #[error("{0}")]
    NotFound(String),
    /// The workspace's state forbids it.
    #[error("{0}")]
    WrongState(String),
    /// Concurrent changes kept winning.
    #[error("workspace is being changed concurrently; retry")]
    Contended,
    /// NATS is unreachable.
    #[error("event bus unavailable; retry")]
    Unavailable,
    /// Provisioning failed.
    #[error("{0}")]
    Failed(String),
    /// Something broke on our side (logged).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ExecuteError<DecideError>> for ControlError {
    fn from(error: ExecuteError<DecideError>) -> Self {
        match error {
            ExecuteError::Rejected(DecideError::Refused(Refusal::NotFound(id))) => {
                ControlError::NotFound(format!("workspace {id} not found"))
            }
            ExecuteError::Rejected(DecideError::Refused(refusal)) => {
                ControlError::WrongState(refusal.to_string())
            }
            ExecuteError::Contended(..) => ControlError::Contended,
            ExecuteError::Append(k8shell_bus::AppendError::Unavailable { .. })
            | ExecuteError::Load(_) => ControlError::Unavailable,
            other => {
                tracing::error!(error = %other, "cannot record a workspace event");
                ControlError::Internal("cannot record a workspace event".to_owned())
            }
        }
    }
}

/// The lifecycle engine; cheap to clone.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    store: EventStore,
    pool: PgPool,
    catalog: Arc<BlueprintCatalog>,
    runtime: Arc<dyn Runtime>,
    tokens: Arc<WorkspaceTokens>,
    config: LifecycleConfig,
    /// One runtime operation per workspace at a time in this process.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    scheduled_stops: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    restarts: Mutex<HashMap<String, Vec<Instant>>>,
    /// Idle bookkeeping: when each workspace was last seen in use, and
    /// which ones were warned.
    last_busy: Mutex<HashMap<String, SystemTime>>,
    warned: Mutex<HashSet<String>>,
    specs: Mutex<HashMap<String, WorkspaceSpec>>,
    /// The JWKS each running workspace was last given (to push changes).
    pushed_jwks: Mutex<HashMap<String, String>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn aggregate_id(id: &str) -> Result<AggregateId, ControlError> {
    AggregateId::new(id.to_owned())
        .map_err(|_| ControlError::Invalid(format!("invalid workspace id {id:?}")))
}

impl Controller {
    /// A controller; nothing runs until [`Controller::spawn_loops`].
    pub fn new(
        store: EventStore,
        pool: PgPool,
        catalog: Arc<BlueprintCatalog>,
        runtime: Arc<dyn Runtime>,
        tokens: Arc<WorkspaceTokens>,
        config: LifecycleConfig,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                pool,
                catalog,
                runtime,
                tokens,
                config,
                locks: Mutex::new(HashMap::new()),
                scheduled_stops: Mutex::new(HashMap::new()),
                restarts: Mutex::new(HashMap::new()),
                last_busy: Mutex::new(HashMap::new()),
                warned: Mutex::new(HashSet::new()),
                specs: Mutex::new(HashMap::new()),
                pushed_jwks: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    /// The blueprint catalog.
    pub fn catalog(&self) -> &Arc<BlueprintCatalog> {
        &self.inner.catalog
    }

    /// The event store.
    pub fn store(&self) -> &EventStore {
        &self.inner.store
    }

    /// Waits for in-flight runtime work (bounded by the caller).
    pub async fn drain(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.locks)
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = future => {}
            }
        });
    }

    /// Loads a workspace from the event store (the truth, not the projection).
    pub async fn load(&self, id: &str) -> Result<Option<Workspace>, ControlError> {
        let aggregate = aggregate_id(id)?;
        let loaded = self
            .inner
            .store
            .load(k8shell_events::Context::Workspace, &aggregate)
            .await
            .map_err(|_| ControlError::Unavailable)?;
        let mut state = WorkspaceAggregate::default();
        for event in &loaded.events {
            k8shell_bus::Aggregate::apply(&mut state, event);
        }
        Ok(state.0.filter(|w| w.state != State::Deleted))
    }

    /// Like [`Controller::load`], deleted workspaces included.
    async fn load_any(&self, id: &str) -> Result<Option<Workspace>, ControlError> {
        let aggregate = aggregate_id(id)?;
        let loaded = self
            .inner
            .store
            .load(k8shell_events::Context::Workspace, &aggregate)
            .await
            .map_err(|_| ControlError::Unavailable)?;
        let mut state = WorkspaceAggregate::default();
        for event in &loaded.events {
            k8shell_bus::Aggregate::apply(&mut state, event);
        }
        Ok(state.0)
    }

    /// Removes runtime objects of workspaces that were deleted (a delete
    /// whose runtime part failed, or a provisioner killed in between).
    /// Objects with no workspace at all are left alone: they may belong to
    /// another installation on the same runtime. Retained volumes stay.
    pub async fn collect_garbage(&self) {
        let found = match self.inner.runtime.list().await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "garbage collection: runtime unavailable");
                return;
            }
        };
        for (id, _) in found {
            let guard = self.op_lock(&id);
            let Ok(_held) = guard.try_lock() else {
                continue;
            };
            let deleted = matches!(
                self.load_any(&id).await,
                Ok(Some(workspace)) if workspace.state == State::Deleted
            );
            if !deleted {
                continue;
            }
            match self.inner.runtime.delete(&id, true).await {
                Ok(()) => {
                    tracing::info!(workspace = %id, "removed the objects of a deleted workspace");
                }
                Err(error) => {
                    tracing::warn!(workspace = %id, %error, "cannot remove a deleted workspace's objects");
                }
            }
        }
    }

    /// Records a request for a workspace (idempotent).
    pub async fn create(
        &self,
        username: &str,
        blueprint: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(Workspace, bool), ControlError> {
        id::validate_username(username).map_err(|e| ControlError::Invalid(e.to_string()))?;
        id::validate_blueprint(blueprint).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let set = self.inner.catalog.current();
        match set.get(blueprint) {
            None => {
                return Err(ControlError::NotFound(format!(
                    "blueprint {blueprint:?} not found"
                )));
            }
            Some(loaded) if loaded.blueprint.is_template => {
                return Err(ControlError::Invalid(format!(
                    "blueprint {blueprint:?} is a template and can't be provisioned"
                )));
            }
            Some(_) => {}
        }
        for hex_len in MIN_HEX..=MAX_HEX {
            let candidate = id::workspace_id(username, blueprint, hex_len);
            let aggregate = aggregate_id(&candidate)?;
            let executed =
                execute::<WorkspaceAggregate, _, _, _>(&self.inner.store, &aggregate, |state| {
                    decide_create(state, &aggregate, username, blueprint, metadata)
                        .map_err(DecideError::from)
                })
                .await?;
            let created = match executed.outcome {
                CreateDecision::Collision => continue,
                CreateDecision::Create => true,
                CreateDecision::Exists => false,
            };
            let workspace = executed
                .state
                .0
                .ok_or_else(|| ControlError::Internal("workspace missing after create".into()))?;
            if created {
                tracing::info!(workspace = %workspace.id, "workspace requested");
                // Provisioning starts now rather than at the next reconcile;
                // the returned workspace is the one that was requested.
                if let Err(error) = self.start(&workspace.id).await {
                    tracing::warn!(workspace = %workspace.id, %error, "cannot start a new workspace; the reconcile loop will retry");
                }
            }
            return Ok((workspace, created));
        }
        Err(ControlError::Failed(
            "no free workspace id for this user and blueprint".to_owned(),
        ))
    }

    /// Claims a start and does it in the background.
    pub async fn start(&self, id: &str) -> Result<Workspace, ControlError> {
        self.cancel_scheduled_stop(id);
        let aggregate = aggregate_id(id)?;
        let executed =
            execute::<WorkspaceAggregate, _, _, _>(&self.inner.store, &aggregate, |state| {
                let stage = match state.0.as_ref().map(|w| w.state) {
                    Some(State::Requested) => "Creating",
                    _ => "Starting",
                };
                decide_start(state, &aggregate, stage)
            })
            .await?;
        if executed.outcome == StartDecision::Start {
            let controller = self.clone();
            let id = id.to_owned();
            self.spawn(async move { controller.drive_start(&id).await });
        }
        executed
            .state
            .0
            .ok_or_else(|| ControlError::Internal("workspace missing after start".into()))
    }

    /// Stops now, or schedules a stop after `delay`.
    pub async fn stop(
        &self,
        id: &str,
        reason: &str,
        delay: Duration,
    ) -> Result<Workspace, ControlError> {
        let Some(workspace) = self.load(id).await? else {
            return Err(ControlError::NotFound(format!("workspace {id} not found")));
        };
        if !delay.is_zero() {
            // Recorded as an event, so a restarted provisioner re-arms it.
            let at = time::OffsetDateTime::now_utc()
                + time::Duration::try_from(delay).unwrap_or(time::Duration::DAY);
            let at = at
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| ControlError::Internal(e.to_string()))?;
            let aggregate = aggregate_id(id)?;
            let executed =
                execute::<WorkspaceAggregate, _, _, _>(&self.inner.store, &aggregate, |state| {
                    decide_schedule_stop(state, &aggregate, &at, reason)
                })
                .await?;
            if executed.outcome {
                self.arm_stop(id, &at, reason);
            }
            return Ok(executed.state.0.unwrap_or(workspace));
        }
        if let Some(previous) = lock(&self.inner.scheduled_stops).remove(id) {
            previous.abort();
        }
        self.stop_now(id, reason).await
    }

    /// Arms the timer of a scheduled stop (`at`, RFC 3339); the stop
    /// happens only if the workspace still has that stop scheduled.
    fn arm_stop(&self, id: &str, at: &str, reason: &str) {
        let delay = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .map(|at| (at - time::OffsetDateTime::now_utc()).unsigned_abs())
            .unwrap_or_default();
        let controller = self.clone();
        let (owned_id, owned_at, owned_reason) = (id.to_owned(), at.to_owned(), reason.to_owned());
        let handle = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            lock(&controller.inner.scheduled_stops).remove(&owned_id);
            let still = controller
                .load(&owned_id)
                .await
                .ok()
                .flatten()
                .and_then(|w| w.stop_at)
                .is_some_and(|(at, _)| at == owned_at);
            if !still {
                return; // started, stopped or deleted meanwhile
            }
            if let Err(error) = controller.stop_now(&owned_id, &owned_reason).await {
                tracing::warn!(workspace = %owned_id, %error, "scheduled stop failed");
            }
        });
        if let Some(previous) =
            lock(&self.inner.scheduled_stops).insert(id.to_owned(), handle.abort_handle())
        {
            previous.abort();
        }
        tracing::info!(workspace = id, at, "stop scheduled");
    }

    async fn stop_now(&self, id: &str, reason: &str) -> Result<Workspace, ControlError> {
        let aggregate = aggregate_id(id)?;
        let executed =
            execute::<WorkspaceAggregate, _, _, _>(&self.inner.store, &aggregate, |state| {
                decide_stop(state, &aggregate, reason)
            })
            .await?;
        if executed.outcome == StopDecision::Stop {
            let controller = self.clone();
            let (id, reason) = (id.to_owned(), reason.to_owned());
            self.spawn(async move { controller.drive_stop(&id, &reason).await });
        }
        executed
            .state
            .0
            .ok_or_else(|| ControlError::Internal("workspace missing after stop".into()))
    }

    fn cancel_scheduled_stop(&self, id: &str) {
        if let Some(handle) = lock(&self.inner.scheduled_stops).remove(id) {
            handle.abort();
            tracing::info!(workspace = id, "scheduled stop cancelled by a start");
        }
    }

    /// Deletes the workspace: the event first (the owner's intent is what
    /// counts), then the runtime's objects.
    pub async fn delete(&self, id: &str, keep_volumes: bool) -> Result<Workspace, ControlError> {
        self.cancel_scheduled_stop(id);
        let aggregate = aggregate_id(id)?;
        let executed =
            execute::<WorkspaceAggregate, _, _, _>(&self.inner.store, &aggregate, |state| {
                decide_delete(state, &aggregate, keep_volumes)
            })
            .await?;
        let guard = self.op_lock(id);
        let _held = guard.lock().await;
        self.inner
            .runtime
            .delete(id, keep_volumes)
            .await
            .map_err(|e| ControlError::Failed(format!("the workspace's objects remain: {e}")))?;
        lock(&self.inner.specs).remove(id);
        lock(&self.inner.restarts).remove(id);
        tracing::info!(workspace = id, keep_volumes, "workspace deleted");
        executed
            .state
            .0
            .ok_or_else(|| ControlError::Internal("workspace missing after delete".into()))
    }

    async fn record(&self, id: &str, expected: &[State], outcome: Outcome) -> bool {
        let Ok(aggregate) = aggregate_id(id) else {
            return false;
        };
        let result =
            execute::<WorkspaceAggregate, _, _, _>(&self.inner.store, &aggregate, |state| {
                decide_outcome(state, &aggregate, expected, outcome.clone())
            })
            .await;
        match result {
            Ok(executed) => executed.outcome,
            Err(error) => {
                tracing::warn!(workspace = id, error = %error, "cannot record a workspace outcome");
                false
            }
        }
    }

    /// Resolves the workspace's blueprint into a spec.
    fn spec_for(&self, workspace: &Workspace) -> Result<WorkspaceSpec, String> {
        let set = self.inner.catalog.current();
        let loaded = set
            .get(&workspace.blueprint)
            .ok_or_else(|| format!("blueprint {:?} not found", workspace.blueprint))?;
        let scope = CelScope {
            user: serde_json::json!({ "username": workspace.username }),
            workspace: serde_json::json!({
                "id": workspace.id,
                "blueprint": workspace.blueprint,
            }),
            metadata: workspace.metadata.clone(),
            env: self.inner.config.blueprint_env.clone(),
        };
        resolve(&loaded.blueprint, &scope).map_err(|e| {
            format!(
                "blueprint {:?} ({}): {e}",
                workspace.blueprint,
                loaded.file.display()
            )
        })
    }

    /// Provisions a workspace whose start was claimed, until k8shelld
    /// answers; records `running` or `failed`.
    async fn drive_start(&self, id: &str) {
        let guard = self.op_lock(id);
        let _held = guard.lock().await;
        let expected = [State::Provisioning];
        let workspace = match self.load(id).await {
            Ok(Some(w)) if w.state == State::Provisioning => w,
            Ok(_) => return, // stopped or deleted meanwhile
            Err(error) => {
                tracing::warn!(workspace = id, %error, "cannot load workspace to start it");
                return;
            }
        };
        let started = Instant::now();
        match self.provision(&workspace).await {
            Ok((endpoint, splash)) => {
                if self
                    .record(id, &expected, Outcome::Running { endpoint, splash })
                    .await
                {
                    lock(&self.inner.last_busy).insert(id.to_owned(), SystemTime::now());
                    tracing::info!(workspace = id, elapsed = ?started.elapsed(), "workspace running");
                }
            }
            Err(reason) => {
                tracing::warn!(workspace = id, %reason, "workspace failed to start");
                self.record(id, &expected, Outcome::Failed { reason }).await;
            }
        }
    }

    /// Provisions; returns k8shelld's endpoint and the blueprint's splash.
    async fn provision(&self, workspace: &Workspace) -> Result<(String, String), String> {
        let id = workspace.id.as_str();
        let spec = self.spec_for(workspace)?;
        // The freshest keys: a workspace must know the current signer.
        if let Err(error) = self.inner.tokens.refresh_jwks().await {
            tracing::warn!(workspace = id, %error, "cannot refresh identity's keys; using the last ones");
        }
        let jwks = self.inner.tokens.jwks();
        lock(&self.inner.pushed_jwks).insert(id.to_owned(), jwks.clone());
        let daemon_config =
            render_daemon_config(&spec, &jwks, self.inner.runtime.daemon_uses_tls())
                .map_err(|e| format!("cannot render k8shelld's config: {e}"))?;
        lock(&self.inner.specs).insert(id.to_owned(), spec.clone());

        // Progress is recorded as it comes, in order, by one task.
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
        let recorder = {
            let controller = self.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                while let Some(progress) = progress_rx.recv().await {
                    controller
                        .record(
                            &id,
                            &[State::Provisioning],
                            Outcome::Progress {
                                stage: progress.stage,
                                percent: progress.percent,
                                detail: progress.detail,
                            },
                        )
                        .await;
                }
            })
        };
        let deadline = tokio::time::Instant::now() + self.inner.config.start_timeout;
        let provisioned = tokio::time::timeout_at(
            deadline,
            self.inner
                .runtime
                .provision(&spec, &daemon_config, &progress_tx),
        )
        .await;
        let endpoint = match provisioned {
            Err(_) => Err(format!(
                "timed out after {:?} while the runtime provisioned",
                self.inner.config.start_timeout
            )),
            Ok(Err(error)) => Err(error.to_string()),
            Ok(Ok(endpoint)) => Ok(endpoint),
        };
        let endpoint = match endpoint {
            Ok(endpoint) => {
                let _ = progress_tx.send(Progress {
                    stage: "WaitingForDaemon".to_owned(),
                    percent: 80,
                    detail: "waiting for k8shelld to answer".to_owned(),
                });
                Ok(endpoint)
            }
            Err(e) => Err(e),
        };
        drop(progress_tx);
        let _ = recorder.await;
        let endpoint = endpoint?;
        self.wait_for_daemon(id, &endpoint, deadline).await?;
        Ok((endpoint, spec.splash.clone().unwrap_or_default()))
    }

    /// Polls k8shelld until it answers; gives up early when the container
    /// exited (with its last words) or the start was superseded.
    async fn wait_for_daemon(
        &self,
        id: &str,
        endpoint: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let mut checks = 0u32;
        loop {
            let last_error = match daemon::activity(
                self.inner.runtime.as_ref(),
                endpoint,
                id,
                &self.inner.tokens,
                Duration::from_secs(2),
            )
            .await
            {
                Ok(_) => return Ok(()),
                Err(error) => error.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "k8shelld did not answer within {:?}: {last_error}",
                    self.inner.config.start_timeout
                ));
            }
            checks += 1;
            if checks.is_multiple_of(10) {
                match self.inner.runtime.state(id).await {
                    Ok(ActualState::Stopped { detail }) => {
                        return Err(format!("the workspace container {detail}"));
                    }
                    Ok(ActualState::Missing) => {
                        return Err("the workspace container disappeared".to_owned());
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn drive_stop(&self, id: &str, reason: &str) {
        let guard = self.op_lock(id);
        let _held = guard.lock().await;
        match self.load(id).await {
            Ok(Some(w)) if w.state == State::Stopping => {}
            _ => return,
        }
        let started = Instant::now();
        match self
            .inner
            .runtime
            .stop(id, self.inner.config.stop_grace)
            .await
        {
            Ok(()) => {
                self.record(
                    id,
                    &[State::Stopping],
                    Outcome::Stopped {
                        reason: reason.to_owned(),
                    },
                )
                .await;
                lock(&self.inner.warned).remove(id);
                tracing::info!(workspace = id, elapsed = ?started.elapsed(), reason, "workspace stopped");
            }
            Err(error) => {
                self.record(
                    id,
                    &[State::Stopping],
                    Outcome::Failed {
                        reason: format!("stop failed: {error}"),
                    },
                )
                .await;
            }
        }
    }

    /// Compares one workspace's desired and actual state and acts.
    pub async fn reconcile_one(&self, id: &str) {
        let guard = self.op_lock(id);
        let Ok(held) = guard.try_lock() else {
            return; // an operation is running; it records its own outcome
        };
        let workspace = match self.load(id).await {
            Ok(Some(w)) => w,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(workspace = id, %error, "reconcile: cannot load");
                return;
            }
        };
        let actual = match self.inner.runtime.state(id).await {
            Ok(actual) => actual,
            Err(error) => {
                tracing::warn!(workspace = id, %error, "reconcile: runtime unavailable");
                return;
            }
        };
        drop(held);
        if let Some((at, reason)) = &workspace.stop_at
            && !lock(&self.inner.scheduled_stops).contains_key(id)
        {
            // Scheduled before a restart of this provisioner.
            self.arm_stop(id, at, reason);
        }
        match (workspace.state, &actual) {
            (State::Requested, _) | (State::Failed, _) if !workspace.desired_running => {}
            (State::Requested, _) => {
                if let Err(error) = self.start(id).await {
                    tracing::warn!(workspace = id, %error, "reconcile: cannot start");
                }
            }
            (State::Provisioning, _) => {
                // A start whose driver died with a previous process.
                tracing::info!(workspace = id, "reconcile: resuming an interrupted start");
                let controller = self.clone();
                let id = id.to_owned();
                self.spawn(async move { controller.drive_start(&id).await });
            }
            (State::Stopping, _) => {
                tracing::info!(workspace = id, "reconcile: resuming an interrupted stop");
                let controller = self.clone();
                let (id, reason) = (id.to_owned(), workspace.reason.clone());
                self.spawn(async move { controller.drive_stop(&id, &reason).await });
            }
            (State::Running, ActualState::Running) => {}
            (State::Running, not_running) => {
                let detail = match not_running {
                    ActualState::Missing => "the workspace container was removed".to_owned(),
                    ActualState::Stopped { detail } => format!("the workspace container {detail}"),
                    ActualState::Running => String::new(),
                };
                tracing::warn!(workspace = id, %detail, "reconcile: workspace is not running");
                self.record(id, &[State::Running], Outcome::Failed { reason: detail })
                    .await;
                self.restart_after_failure(id).await;
            }
            (State::Failed, _) => self.restart_after_failure(id).await,
            (State::Stopped, ActualState::Running) => {
                tracing::warn!(
                    workspace = id,
                    "reconcile: a stopped workspace runs; stopping it"
                );
                if let Err(error) = self
                    .inner
                    .runtime
                    .stop(id, self.inner.config.stop_grace)
                    .await
                {
                    tracing::warn!(workspace = id, %error, "reconcile: cannot stop");
                }
            }
            (State::Stopped, _) | (State::Deleted, _) => {}
        }
    }

    /// Restarts a workspace its owner wants running, unless it keeps dying.
    async fn restart_after_failure(&self, id: &str) {
        let window = self.inner.config.restart_window;
        let allowed = {
            let mut restarts = lock(&self.inner.restarts);
            let recent = restarts.entry(id.to_owned()).or_default();
            recent.retain(|t| t.elapsed() < window);
            if recent.len() as u32 >= self.inner.config.max_restarts {
                false
            } else {
                recent.push(Instant::now());
                true
            }
        };
        if !allowed {
            tracing::debug!(
                workspace = id,
                "not restarting: too many restarts in the window"
            );
            return;
        }
        tracing::info!(workspace = id, "restarting a workspace that should run");
        if let Err(error) = self.start(id).await {
            tracing::warn!(workspace = id, %error, "restart failed");
        }
    }

    /// Reconciles every live workspace.
    pub async fn reconcile_all(&self) {
        let ids = match self.live_ids(None).await {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!(%error, "reconcile: cannot list workspaces");
                return;
            }
        };
        for id in ids {
            self.reconcile_one(&id).await;
        }
    }

    async fn live_ids(&self, state: Option<State>) -> Result<Vec<String>, sqlx::Error> {
        let rows = read_model::list(
            &self.inner.pool,
            &ListFilter {
                state,
                limit: 100_000,
                ..Default::default()
            },
        )
        .await?;
        Ok(rows.into_iter().map(|(w, _)| w.id).collect())
    }

    /// Running workspaces from the read model; none (logged) when it
    /// cannot be read — the periodic passes simply try again.
    async fn running_workspaces(&self, purpose: &str) -> Vec<Workspace> {
        let listed = read_model::list(
            &self.inner.pool,
            &ListFilter {
                state: Some(State::Running),
                limit: 100_000,
                ..Default::default()
            },
        )
        .await;
        match listed {
            Ok(rows) => rows.into_iter().map(|(workspace, _)| workspace).collect(),
            Err(error) => {
                tracing::warn!(%error, "{purpose}: cannot list workspaces");
                Vec::new()
            }
        }
    }

    /// Fetches identity's JWKS and gives it to every running workspace
    /// that does not have it yet. Identity publishes its next signing key a
    /// rotation period ahead, so a workspace learns a key long before the
    /// first token signed with it arrives.
    pub async fn jwks_tick(&self) {
        if let Err(error) = self.inner.tokens.refresh_jwks().await {
            tracing::warn!(%error, "cannot fetch identity's keys");
            return;
        }
        let jwks = self.inner.tokens.jwks();
        for workspace in self.running_workspaces("key push").await {
            let id = workspace.id.as_str();
            if lock(&self.inner.pushed_jwks).get(id) == Some(&jwks) {
                continue;
            }
            match daemon::update_jwks(
                self.inner.runtime.as_ref(),
                &workspace.endpoint,
                id,
                &self.inner.tokens,
                &jwks,
                Duration::from_secs(5),
            )
            .await
            {
                Ok(()) => {
                    tracing::info!(workspace = id, "pushed identity's keys");
                    lock(&self.inner.pushed_jwks).insert(id.to_owned(), jwks.clone());
                }
                Err(error) => {
                    tracing::warn!(workspace = id, %error, "cannot push identity's keys")
                }
            }
        }
    }

    /// Checks running workspaces for idleness: warns, then stops.
    pub async fn idle_tick(&self) {
        for workspace in self.running_workspaces("idle check").await {
            if let Err(error) = self.idle_check(&workspace).await {
                tracing::debug!(workspace = %workspace.id, %error, "idle check skipped");
            }
        }
    }

    async fn idle_check(&self, workspace: &Workspace) -> Result<(), String> {
        let id = workspace.id.as_str();
        let cached = lock(&self.inner.specs).get(id).cloned();
        let spec = match cached {
            Some(spec) => spec,
            None => {
                let full = self
                    .load(id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("gone")?;
                let spec = self.spec_for(&full)?;
                lock(&self.inner.specs).insert(id.to_owned(), spec.clone());
                spec
            }
        };
        let Some(timeout) = spec.idle_timeout else {
            return Ok(());
        };
        let activity = daemon::activity(
            self.inner.runtime.as_ref(),
            &workspace.endpoint,
            id,
            &self.inner.tokens,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        if activity.attached_clients > 0 {
            // Never stop under someone's feet; count this as use.
            lock(&self.inner.last_busy).insert(id.to_owned(), now);
            lock(&self.inner.warned).remove(id);
            return Ok(());
        }
        // Set when it started running; after a provisioner restart, the
        // projection's last update is the best guess (and is kept, so an
        // idle warning, which updates the row, does not reset the clock).
        let base = *lock(&self.inner.last_busy)
            .entry(id.to_owned())
            .or_insert_with(|| workspace.updated_at.into());
        let since = activity.last_input.map_or(base, |input| input.max(base));
        let idle_for = now.duration_since(since).unwrap_or_default();
        let warn_at = timeout.saturating_sub(self.inner.config.idle_warning);
        if idle_for >= timeout {
            tracing::info!(workspace = id, ?idle_for, "stopping an idle workspace");
            self.stop(id, "idle", Duration::ZERO)
                .await
                .map_err(|e| e.to_string())?;
        } else if idle_for >= warn_at {
            let first = lock(&self.inner.warned).insert(id.to_owned());
            if first {
                self.record(
                    id,
                    &[State::Running],
                    Outcome::IdleWarning {
                        idle_seconds: idle_for.as_secs(),
                        stop_in_seconds: timeout.saturating_sub(idle_for).as_secs(),
                    },
                )
                .await;
            }
        } else {
            lock(&self.inner.warned).remove(id);
        }
        Ok(())
    }

    /// Runs the reconcile and idle loops until shutdown.
    pub fn spawn_loops(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut handles = Vec::new();
        {
            let controller = self.clone();
            let shutdown = self.inner.shutdown.clone();
            let mut events = self.inner.runtime.watch();
            let interval = self.inner.config.reconcile_interval;
            handles.push(tokio::spawn(async move {
                controller.reconcile_all().await;
                controller.collect_garbage().await;
                let mut tick = tokio::time::interval(interval);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {
                            controller.reconcile_all().await;
                            controller.collect_garbage().await;
                            controller.jwks_tick().await;
                        }
                        event = events.recv() => match event {
                            Some(RuntimeEvent { workspace_id, kind, detail }) => {
                                tracing::debug!(workspace = %workspace_id, %kind, %detail, "runtime event");
                                if kind != "started" {
                                    controller.reconcile_one(&workspace_id).await;
                                }
                            }
                            None => return,
                        },
                    }
                }
            }));
        }
        {
            let controller = self.clone();
            let shutdown = self.inner.shutdown.clone();
            let interval = self.inner.config.idle_check_interval;
            handles.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => controller.idle_tick().await,
                    }
                }
            }));
        }
        handles
    }
}
