//! Rego policies evaluated in-process with regorus: a directory of `.rego`
//! files compiled into one engine, cloned per evaluation (the compiled
//! policy is shared), with a time limit so a runaway policy is cut off.
//! Reloads are all or nothing: a broken file keeps the last good set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;

/// The rule every evaluation reads.
pub const DECISION_RULE: &str = "data.k8shell.authz.decision";

/// What a policy decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Outcome {
    /// Allowed or not.
    pub allow: bool,
    /// Why.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// What the caller must enforce.
    #[serde(default)]
    pub obligations: std::collections::BTreeMap<String, String>,
}

/// An evaluation failed (the caller denies).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The policy failed or ran too long.
    #[error("policy evaluation failed: {0}")]
    Policy(String),
    /// The policy produced something that is not a decision.
    #[error("the policy's decision is malformed: {0}")]
    Malformed(String),
}

/// A compiled set of policies.
pub struct PolicySet {
    engine: regorus::Engine,
    /// Engines ready for reuse: cloning the compiled engine for every
    /// evaluation costs more than most decisions.
    spare: Mutex<Vec<regorus::Engine>>,
    /// Files it was compiled from.
    pub files: Vec<PathBuf>,
    fingerprint: String,
}

impl Clone for PolicySet {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            spare: Mutex::new(Vec::new()),
            files: self.files.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// Rego `.rego` files of `dir` (tests excluded: `*_test.rego`).
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let entries =
            std::fs::read_dir(&current).map_err(|e| format!("{}: {e}", current.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rego")
                && !path.to_string_lossy().ends_with("_test.rego")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn fingerprint(files: &[(PathBuf, String)]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (path, text) in files {
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
    }
    format!("{:x}", hasher.finalize())
}

impl PolicySet {
    /// Compiles the policies of `dir`; any error rejects the whole set.
    pub fn load(dir: &Path, time_limit: Duration) -> Result<Self, Vec<String>> {
        let paths = policy_files(dir).map_err(|e| vec![e])?;
        if paths.is_empty() {
            return Err(vec![format!("{}: no .rego files", dir.display())]);
        }
        let mut texts = Vec::with_capacity(paths.len());
        for path in &paths {
            let text = std::fs::read_to_string(path)
                .map_err(|e| vec![format!("{}: {e}", path.display())])?;
            texts.push((path.clone(), text));
        }
        Self::compile(texts, time_limit)
    }

    /// Compiles policies from `(file, text)` pairs.
    pub fn compile(
        files: Vec<(PathBuf, String)>,
        time_limit: Duration,
    ) -> Result<Self, Vec<String>> {
        let mut engine = regorus::Engine::new();
        let mut errors = Vec::new();
        for (path, text) in &files {
            if let Err(error) = engine.add_policy(path.display().to_string(), text.clone()) {
                errors.push(format!("{}: {error}", path.display()));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        if let Some(limit) = std::num::NonZeroU32::new(1000) {
            engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
                limit: time_limit,
                check_interval: limit,
            });
        }
        let set = Self {
            engine,
            spare: Mutex::new(Vec::new()),
            files: files.iter().map(|(p, _)| p.clone()).collect(),
            fingerprint: fingerprint(&files),
        };
        // A set whose decision rule does not even evaluate on an empty
        // input is broken (undefined names, type errors).
        set.evaluate(&serde_json::json!({}))
            .map_err(|e| vec![format!("{DECISION_RULE} does not evaluate: {e}")])?;
        Ok(set)
    }

    /// Evaluates the decision for `input`.
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<Outcome, EvalError> {
        let json = self.evaluate_rule(DECISION_RULE, input)?;
        // From a reference: the value is only copied into the error.
        Outcome::deserialize(&json).map_err(|e| EvalError::Malformed(format!("{e}: {json}")))
    }

    /// Evaluates any rule for `input`, as JSON.
    pub fn evaluate_rule(
        &self,
        rule: &str,
        input: &serde_json::Value,
    ) -> Result<serde_json::Value, EvalError> {
        let value = regorus::Value::from(input.clone());
        let mut engine = self
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_else(|| self.engine.clone());
        engine.set_input(value);
        let result = engine.eval_rule(rule.to_owned());
        // An engine whose evaluation failed may hold half a state; only
        // clean ones go back (a small pool: one per concurrent caller).
        if result.is_ok()
            && let Ok(mut spare) = self.spare.lock()
            && spare.len() < 64
        {
            spare.push(engine);
        }
        let result = result.map_err(|e| EvalError::Policy(e.to_string()))?;
        // Straight to a JSON value: no text in between.
        serde_json::to_value(&result).map_err(|e| EvalError::Malformed(e.to_string()))
    }

    /// Runs every `test_*` rule of the `*_test.rego` files in `dir`
    /// against this set; returns the failures.
    pub fn run_tests(&self, dir: &Path) -> Result<(usize, Vec<String>), String> {
        let mut files = Vec::new();
        let mut pending = vec![dir.to_owned()];
        while let Some(current) = pending.pop() {
            for entry in std::fs::read_dir(&current)
                .map_err(|e| e.to_string())?
                .filter_map(Result::ok)
            {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.to_string_lossy().ends_with("_test.rego") {
                    files.push(path);
                }
            }
        }
        let mut failures = Vec::new();
        let mut count = 0;
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let package = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("package "))
                .ok_or_else(|| format!("{}: no package", path.display()))?
                .trim()
                .to_owned();
            let mut engine = self.engine.clone();
            engine
                .add_policy(path.display().to_string(), text.clone())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for name in text.lines().filter_map(|l| {
                let l = l.trim_start();
                l.starts_with("test_")
                    .then(|| l.split_whitespace().next().unwrap_or(""))
            }) {
                count += 1;
                let rule = format!("data.{package}.{name}");
                match engine.eval_rule(rule.clone()) {
                    Ok(value) if value == regorus::Value::from(true) => {}
                    Ok(value) => failures.push(format!("{rule}: {value}")),
                    Err(error) => failures.push(format!("{rule}: {error}")),
                }
            }
        }
        Ok((count, failures))
    }
}

/// The policy set in force, reloaded from its directory.
pub struct PolicyCatalog {
    dir: PathBuf,
    time_limit: Duration,
    current: RwLock<Arc<PolicySet>>,
    errors: Mutex<Vec<String>>,
}

impl PolicyCatalog {
    /// Loads `dir`; unlike blueprints, a broken initial set is an error:
    /// authz without a policy could only deny everything.
    pub fn open(dir: &Path, time_limit: Duration) -> Result<Self, Vec<String>> {
        let set = PolicySet::load(dir, time_limit)?;
        Ok(Self {
            dir: dir.to_owned(),
            time_limit,
            current: RwLock::new(Arc::new(set)),
            errors: Mutex::new(Vec::new()),
        })
    }

    /// The set in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()))
    }

    /// Why the last reload was refused.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Reloads when the files changed; true when a new set is in force.
    pub fn reload(&self) -> bool {
        let texts: Result<Vec<(PathBuf, String)>, String> =
            policy_files(&self.dir).and_then(|paths| {
                paths
                    .into_iter()
                    .map(|p| {
                        std::fs::read_to_string(&p)
                            .map(|t| (p.clone(), t))
                            .map_err(|e| format!("{}: {e}", p.display()))
                    })
                    .collect()
            });
        let outcome = match texts {
            Ok(texts) if fingerprint(&texts) == self.current().fingerprint => return false,
            Ok(texts) => PolicySet::compile(texts, self.time_limit),
            Err(error) => Err(vec![error]),
        };
        let (changed, errors) = match outcome {
            Ok(set) => {
                tracing::info!(files = set.files.len(), "policies reloaded");
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(set);
                }
                (true, Vec::new())
            }
            Err(errors) => {
                if self.errors() != errors {
                    for error in &errors {
                        tracing::error!(%error, "policy rejected; keeping the last good set");
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_policies() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies")
    }

    /// The Rego unit tests of the default policies.
    #[test]
    fn default_policies_pass_their_rego_tests() {
        let set = PolicySet::load(&repo_policies(), Duration::from_secs(1)).unwrap();
        let (count, failures) = set.run_tests(&repo_policies()).unwrap();
        assert!(count >= 10, "found {count} tests");
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn broken_policies_are_refused_with_file_and_reason() {
        let errors = PolicySet::compile(
            vec![(
                PathBuf::from("broken.rego"),
                "package k8shell.authz\nallow if {".into(),
            )],
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(errors[0].starts_with("broken.rego:"), "{errors:?}");
        let errors = PolicySet::compile(
            vec![(
                PathBuf::from("other.rego"),
                "package other\nx := 1\n".into(),
            )],
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(errors[0].contains(DECISION_RULE), "{errors:?}");
    }

    #[test]
    fn a_runaway_policy_is_cut_off() {
        let set = PolicySet::compile(
            vec![(
                PathBuf::from("slow.rego"),
                "package k8shell.authz\nimport rego.v1\n\
                 n := object.get(input, \"n\", 1)\n\
                 decision := {\"allow\": count([x | some x in numbers.range(1, n); some y in numbers.range(1, n)]) > 0}\n"
                    .into(),
            )],
            Duration::from_millis(50),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let result = set.evaluate(&serde_json::json!({"n": 100000}));
        assert!(result.is_err(), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_broken_reload_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.rego"),
            "package k8shell.authz\ndecision := {\"allow\": true}\n",
        )
        .unwrap();
        let catalog = PolicyCatalog::open(dir.path(), Duration::from_secs(1)).unwrap();
        assert!(
            catalog
                .current()
                .evaluate(&serde_json::json!({}))
                .unwrap()
                .allow
        );
        std::fs::write(
            dir.path().join("p.rego"),
            "package k8shell.authz\ndecision := {",
        )
        .unwrap();
        assert!(!catalog.reload());
        assert!(
            catalog.errors()[0].contains("p.rego"),
            "{:?}",
            catalog.errors()
        );
        assert!(
            catalog
                .current()
                .evaluate(&serde_json::json!({}))
                .unwrap()
                .allow
        );
        std::fs::write(
            dir.path().join("p.rego"),
            "package k8shell.authz\ndecision := {\"allow\": false}\n",
        )
        .unwrap();
        assert!(catalog.reload());
        assert!(
            !catalog
                .current()
                .evaluate(&serde_json::json!({}))
                .unwrap()
                .allow
        );
        assert!(catalog.errors().is_empty());
    }
}
