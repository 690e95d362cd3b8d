//! Blueprints: YAML files in a directory, merged through templates,
//! validated, watched, and resolved into a [`WorkspaceSpec`] per workspace.

mod catalog;
mod expr;
mod merge;
mod model;
mod resolve;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8shell_service::Shutdown;
use tokio::sync::watch;

pub use catalog::{
    BlueprintError, BlueprintSet, LoadedBlueprint, load_dir, parse_idle_timeout, valid_name,
};
pub use expr::{CelExpr, CelScope, Expr};
pub use model::*;
pub use resolve::{
    ResolveError, ResolvedApp, ResolvedInitScript, ResolvedStorage, StorageKindName, WorkspaceSpec,
    WorkspaceUser, resolve,
};

/// The blueprint set in force, reloaded when the directory changes.
///
/// A reload is atomic: the new set replaces the old one only when every
/// file in the directory is valid; otherwise the last good set stays and
/// the errors are kept for `ListBlueprints` and logged.
pub struct BlueprintCatalog {
    dir: PathBuf,
    current: watch::Sender<Arc<BlueprintSet>>,
    errors: Mutex<Vec<BlueprintError>>,
}

impl BlueprintCatalog {
    /// Loads `dir`. A broken directory still gives a catalog (empty, with
    /// the errors), so one bad file never keeps the provisioner down.
    pub fn open(dir: &Path) -> Self {
        let catalog = Self {
            dir: dir.to_owned(),
            current: watch::Sender::new(Arc::new(BlueprintSet::default())),
            errors: Mutex::new(Vec::new()),
        };
        catalog.reload();
        catalog
    }

    /// The directory watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set in force.
    pub fn current(&self) -> Arc<BlueprintSet> {
        self.current.borrow().clone()
    }

    /// Why the last reload was refused (empty when it succeeded).
    pub fn errors(&self) -> Vec<BlueprintError> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Changes of the set in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BlueprintSet>> {
        self.current.subscribe()
    }

    /// Reloads when the files changed; returns true when a new set is in force.
    pub fn reload(&self) -> bool {
        let fingerprint = self.current.borrow().fingerprint.clone();
        let outcome = match catalog::read_dir(&self.dir) {
            Ok((_, found)) if found == fingerprint && !fingerprint.is_empty() => return false,
            Ok(_) => load_dir(&self.dir),
            Err(error) => Err(vec![error]),
        };
        let (changed, errors) = match outcome {
            Ok(set) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    blueprints = set.len(),
                    "blueprints loaded"
                );
                self.current.send_replace(Arc::new(set));
                (true, Vec::new())
            }
            Err(errors) => {
                let previous = self.errors();
                if previous != errors {
                    for error in &errors {
                        tracing::error!(%error, "blueprint rejected; keeping the last good set");
                    }
                }
                (false, errors)
            }
        };
        if let Ok(mut slot) = self.errors.lock() {
            *slot = errors;
        }
        changed
    }

    /// Polls the directory every `interval` until shutdown. Polling, not
    /// inotify: it sees ConfigMap volumes (whose files are swapped through
    /// symlinks) and network filesystems alike, and a blueprint directory
    /// is a handful of small files.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let catalog = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let reloading = Arc::clone(&catalog);
                if let Err(error) = tokio::task::spawn_blocking(move || reloading.reload()).await {
                    tracing::error!(%error, "blueprint reload panicked");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_file_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dev.yaml"), "name: dev\nimage: debian\n").unwrap();
        let catalog = BlueprintCatalog::open(dir.path());
        assert!(catalog.current().get("dev").is_some());
        assert!(!catalog.reload(), "nothing changed");

        std::fs::write(
            dir.path().join("dev.yaml"),
            "name: dev\nimage: debian\nenv: [not, a, map]\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("ops.yaml"), "name: ops\nimage: debian\n").unwrap();
        assert!(!catalog.reload());
        let errors = catalog.errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "env");
        assert!(errors[0].file.ends_with("dev.yaml"));
        assert!(
            catalog.current().get("ops").is_none(),
            "the reload is all or nothing"
        );
        assert!(catalog.current().get("dev").is_some(), "last good set kept");

        std::fs::write(dir.path().join("dev.yaml"), "name: dev\nimage: ubuntu\n").unwrap();
        // Editor leftovers are ignored.
        std::fs::write(dir.path().join(".dev.yaml.swp"), "garbage: [").unwrap();
        assert!(catalog.reload());
        assert!(catalog.errors().is_empty());
        assert!(catalog.current().get("ops").is_some());
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_crash() {
        let catalog = BlueprintCatalog::open(Path::new("/nonexistent/blueprints"));
        assert!(catalog.current().is_empty());
        assert_eq!(catalog.errors().len(), 1);
    }
}

/// The JSON Schema of blueprint files, for editors.
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(Blueprint).to_value();
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "$id".to_owned(),
            "https://k8shell.dev/schemas/blueprint.schema.json".into(),
        );
        object.insert(
            "description".to_owned(),
            "A k8shell blueprint. Generated from services/provisioner by \
             `K8SHELL_UPDATE_DOCS=1 cargo test -p k8shell-provisioner`; do not edit."
                .into(),
        );
    }
    schema
}

#[cfg(test)]
mod published {
    use std::path::PathBuf;

    use super::*;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The schema is committed; this fails when it drifts from the code.
    /// `K8SHELL_UPDATE_DOCS=1` rewrites it.
    #[test]
    fn committed_blueprint_schema_is_current() {
        let path = repo().join("docs/schemas/blueprint.schema.json");
        let schema = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
        if std::env::var_os("K8SHELL_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &schema).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_default(),
            schema,
            "docs/schemas/blueprint.schema.json is stale"
        );
    }

    /// The shipped blueprints load, and `dev` resolves for a user.
    #[test]
    fn default_blueprints_are_valid() {
        let set = load_dir(&repo().join("blueprints")).unwrap();
        assert!(set.get("base").unwrap().blueprint.is_template);
        let dev = &set.get("dev").unwrap().blueprint;
        let spec = resolve(
            dev,
            &CelScope {
                user: serde_json::json!({"username": "alice"}),
                workspace: serde_json::json!({"id": "alice-1234567", "blueprint": "dev"}),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(spec.image, "localhost/k8shell-debian:bookworm");
        assert_eq!(spec.user.name, "alice");
        assert!(spec.user.sudo);
        assert_eq!(spec.env["K8SHELL_USER"], "alice");
        let home = spec.storages.iter().find(|s| s.name == "home").unwrap();
        assert_eq!((home.path.as_str(), home.retain), ("/home/alice", true));
        assert_eq!(spec.init_scripts.len(), 2);
        assert_eq!(
            spec.splash.as_deref(),
            Some("k8shell workspace alice-1234567 (dev)")
        );
    }
}
