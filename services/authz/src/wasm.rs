//! The second policy engine: OPA policies compiled to WebAssembly
//! (`opa build -t wasm`), run by `opa-wasm` on wasmtime. One wasmtime
//! Engine per process; compiled modules are cached by content; every
//! evaluation runs on a metered budget of fuel, so a runaway policy traps
//! instead of holding a core. Instances are pooled: instantiating a module
//! (reading its builtins and entrypoints, loading `data`) costs more than
//! most decisions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use opa_wasm::wasmtime;
use serde::Deserialize as _;
use sha2::{Digest, Sha256};

use crate::policy::{EvalError, Outcome};

/// Entrypoint evaluated for decisions: what `opa build -t wasm -e
/// k8shell/authz/decision` names it.
pub const DEFAULT_ENTRYPOINT: &str = "k8shell/authz/decision";

/// A module that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error("{path}: {message}")]
    Module { path: String, message: String },
}

/// The process's wasmtime Engine and its compiled modules.
pub struct WasmEngine {
    engine: wasmtime::Engine,
    modules: Mutex<HashMap<[u8; 32], wasmtime::Module>>,
}

impl WasmEngine {
    /// One per process.
    pub fn new() -> Result<Self, WasmError> {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let engine =
            wasmtime::Engine::new(&config).map_err(|e| WasmError::Engine(e.to_string()))?;
        Ok(Self {
            engine,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Compiles `bytes` (WebAssembly), or returns the cached module.
    fn compile(&self, bytes: &[u8]) -> Result<wasmtime::Module, String> {
        let key: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(module) = self.modules.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(module);
        }
        let module = wasmtime::Module::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
        if let Ok(mut modules) = self.modules.lock() {
            // Old versions of a reloaded policy are not kept forever.
            if modules.len() >= 16 {
                modules.clear();
            }
            modules.insert(key, module.clone());
        }
        Ok(module)
    }
}

/// An instantiated policy with its own store.
struct Instance {
    store: wasmtime::Store<()>,
    policy: opa_wasm::Policy<opa_wasm::DefaultContext>,
}

/// One compiled OPA policy, ready to evaluate.
pub struct WasmPolicy {
    engine: Arc<WasmEngine>,
    module: wasmtime::Module,
    entrypoint: String,
    fuel: u64,
    pool: Mutex<Vec<Instance>>,
    /// Content hash, to notice changes on reload.
    pub fingerprint: String,
}

/// Reads a policy file: a bare module (`.wasm`) or an OPA bundle
/// (`.tar.gz` with `/policy.wasm`).
pub async fn read_policy(path: &Path) -> Result<Vec<u8>, WasmError> {
    let error = |message: String| WasmError::Module {
        path: path.display().to_string(),
        message,
    };
    let name = path.to_string_lossy();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        opa_wasm::read_bundle(path.to_owned())
            .await
            .map_err(|e| error(format!("not an OPA bundle: {e:#}")))
    } else {
        tokio::fs::read(path)
            .await
            .map_err(|e| error(e.to_string()))
    }
}

impl WasmPolicy {
    /// Compiles and checks a policy: it must implement OPA's ABI, have
    /// `entrypoint`, and decide on an empty input within the budget.
    pub async fn load(
        engine: Arc<WasmEngine>,
        source: &Path,
        bytes: &[u8],
        entrypoint: &str,
        fuel: u64,
    ) -> Result<Self, WasmError> {
        let error = |message: String| WasmError::Module {
            path: source.display().to_string(),
            message,
        };
        let module = engine.compile(bytes).map_err(error)?;
        let policy = Self {
            engine,
            module,
            entrypoint: entrypoint.to_owned(),
            fuel,
            pool: Mutex::new(Vec::new()),
            fingerprint: hex(&Sha256::digest(bytes)),
        };
        let instance = policy.instantiate().await.map_err(error)?;
        if !instance.policy.entrypoints().contains(entrypoint) {
            let mut known: Vec<_> = instance.policy.entrypoints().into_iter().collect();
            known.sort_unstable();
            return Err(error(format!(
                "no entrypoint {entrypoint:?} (the module has {known:?}); build it with `opa build -t wasm -e {entrypoint}`"
            )));
        }
        policy.give_back(instance);
        policy
            .evaluate(&serde_json::json!({}))
            .await
            .map_err(|e| error(format!("{entrypoint} does not evaluate: {e}")))?;
        Ok(policy)
    }

    async fn instantiate(&self) -> Result<Instance, String> {
        let mut store = wasmtime::Store::new(&self.engine.engine, ());
        // Instantiation runs module code too; it gets the same budget.
        store.set_fuel(self.fuel).map_err(|e| e.to_string())?;
        let runtime = opa_wasm::Runtime::new(&mut store, &self.module)
            .await
            .map_err(|e| format!("not an OPA WebAssembly policy: {e:#}"))?;
        let policy = runtime
            .without_data(&mut store)
            .await
            .map_err(|e| format!("cannot load data: {e:#}"))?;
        Ok(Instance { store, policy })
    }

    fn give_back(&self, instance: Instance) {
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < 64
        {
            pool.push(instance);
        }
    }

    /// Evaluates the decision entrypoint for `input`.
    pub async fn evaluate(&self, input: &serde_json::Value) -> Result<Outcome, EvalError> {
        let json = self.evaluate_json(input).await?;
        // From a reference: the value is only copied into the error.
        Outcome::deserialize(&json).map_err(|e| EvalError::Malformed(format!("{e}: {json}")))
    }

    /// Evaluates the entrypoint; the first result's value, as JSON.
    pub async fn evaluate_json(
        &self,
        input: &serde_json::Value,
    ) -> Result<serde_json::Value, EvalError> {
        let pooled = self.pool.lock().ok().and_then(|mut pool| pool.pop());
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self.instantiate().await.map_err(EvalError::Policy)?,
        };
        instance
            .store
            .set_fuel(self.fuel)
            .map_err(|e| EvalError::Policy(e.to_string()))?;
        let result: Result<Vec<serde_json::Value>, _> = instance
            .policy
            .evaluate(&mut instance.store, &self.entrypoint, input)
            .await;
        let results = match result {
            Ok(results) => {
                self.give_back(instance);
                results
            }
            // A trapped instance may hold half a state: it is dropped.
            Err(error) => {
                let out_of_fuel = error
                    .chain()
                    .any(|cause| cause.to_string().contains("fuel"));
                return Err(EvalError::Policy(if out_of_fuel {
                    format!(
                        "cut off after its budget of {} fuel units (a runaway policy?)",
                        self.fuel
                    )
                } else {
                    format!("{error:#}")
                }));
            }
        };
        match results.into_iter().next() {
            Some(serde_json::Value::Object(mut first)) => first
                .remove("result")
                .ok_or_else(|| EvalError::Malformed("a result without `result`".to_owned())),
            Some(other) => Err(EvalError::Malformed(format!("unexpected result {other}"))),
            None => Err(EvalError::Policy(format!(
                "{} is undefined for this input",
                self.entrypoint
            ))),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The wasm policy in force, reloaded from its file when it changes; a
/// broken file keeps the last good policy.
pub struct WasmCatalog {
    engine: Arc<WasmEngine>,
    path: PathBuf,
    entrypoint: String,
    fuel: u64,
    current: std::sync::RwLock<Arc<WasmPolicy>>,
    errors: Mutex<Vec<String>>,
}

impl WasmCatalog {
    /// Loads the policy; failing to is an error (authz without a policy
    /// could only deny).
    pub async fn open(
        engine: Arc<WasmEngine>,
        path: &Path,
        entrypoint: &str,
        fuel: u64,
    ) -> Result<Self, WasmError> {
        let bytes = read_policy(path).await?;
        let policy = WasmPolicy::load(Arc::clone(&engine), path, &bytes, entrypoint, fuel).await?;
        Ok(Self {
            engine,
            path: path.to_owned(),
            entrypoint: entrypoint.to_owned(),
            fuel,
            current: std::sync::RwLock::new(Arc::new(policy)),
            errors: Mutex::new(Vec::new()),
        })
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<WasmPolicy> {
        self.current
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()))
    }

    /// Why the last reload was refused.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Reloads when the file changed; true when a new policy is in force.
    pub async fn reload(&self) -> bool {
        let loaded = match read_policy(&self.path).await {
            Ok(bytes) if hex(&Sha256::digest(&bytes)) == self.current().fingerprint => {
                return false;
            }
            Ok(bytes) => {
                WasmPolicy::load(
                    Arc::clone(&self.engine),
                    &self.path,
                    &bytes,
                    &self.entrypoint,
                    self.fuel,
                )
                .await
            }
            Err(error) => Err(error),
        };
        let (changed, errors) = match loaded {
            Ok(policy) => {
                tracing::info!(path = %self.path.display(), "wasm policy reloaded");
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(policy);
                }
                (true, Vec::new())
            }
            Err(error) => {
                let errors = vec![error.to_string()];
                if self.errors() != errors {
                    tracing::error!(%error, "wasm policy rejected; keeping the last good one");
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

    /// The hand-written ABI 1.2 module, assembled from its text.
    fn test_module() -> Vec<u8> {
        wat::parse_str(include_str!("../tests/wasm/opa_abi.wat")).unwrap()
    }

    fn input(roles: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "subject": {"sub": "alice", "roles": roles},
            "action": "workspace:read",
            "resource": {"type": "workspace", "id": "bob-1", "attributes": {}},
        })
    }

    async fn load(entrypoint: &str, fuel: u64) -> Result<WasmPolicy, WasmError> {
        let engine = Arc::new(WasmEngine::new().unwrap());
        WasmPolicy::load(
            engine,
            Path::new("test.wasm"),
            &test_module(),
            entrypoint,
            fuel,
        )
        .await
    }

    #[tokio::test]
    async fn decides_through_the_opa_abi_with_obligations() {
        // The test module scans the input byte by byte: a big input needs
        // a big budget.
        let policy = load(DEFAULT_ENTRYPOINT, 50_000_000).await.unwrap();
        let allowed = policy.evaluate(&input(&["admin"])).await.unwrap();
        assert!(allowed.allow);
        assert_eq!(
            allowed.obligations.get("record").map(String::as_str),
            Some("true")
        );
        let denied = policy.evaluate(&input(&["developer"])).await.unwrap();
        assert!(!denied.allow);
        assert_eq!(
            denied.reasons,
            vec!["only admins (wasm test policy)".to_owned()]
        );
        // Pooled instances give the same answers, concurrently too.
        let (admin, nobody) = (input(&["admin"]), input(&[]));
        let (a, b) = tokio::join!(policy.evaluate(&admin), policy.evaluate(&nobody));
        assert!(a.unwrap().allow && !b.unwrap().allow);
        // A big input grows the module's memory.
        let mut big = input(&["admin"]);
        big["context"] = serde_json::json!({"blob": "x".repeat(300_000)});
        assert!(policy.evaluate(&big).await.unwrap().allow);
    }

    #[tokio::test]
    async fn a_runaway_policy_is_cut_off_by_fuel() {
        let started = std::time::Instant::now();
        let error = load("spin", 2_000_000).await.err().unwrap().to_string();
        assert!(error.contains("cut off"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A healthy policy on the same engine is unaffected.
        let engine = Arc::new(WasmEngine::new().unwrap());
        let runaway = WasmPolicy::load(
            Arc::clone(&engine),
            Path::new("test.wasm"),
            &test_module(),
            DEFAULT_ENTRYPOINT,
            1_000_000,
        )
        .await
        .unwrap();
        assert!(runaway.evaluate(&input(&["admin"])).await.unwrap().allow);
    }

    #[tokio::test]
    async fn modules_that_are_not_policies_are_refused_clearly() {
        let engine = Arc::new(WasmEngine::new().unwrap());
        let garbage = WasmPolicy::load(
            Arc::clone(&engine),
            Path::new("garbage.wasm"),
            b"not wasm",
            DEFAULT_ENTRYPOINT,
            1000,
        )
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(garbage.starts_with("garbage.wasm:"), "{garbage}");
        let empty = wat::parse_str("(module)").unwrap();
        let not_opa = WasmPolicy::load(
            Arc::clone(&engine),
            Path::new("empty.wasm"),
            &empty,
            DEFAULT_ENTRYPOINT,
            1000,
        )
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(
            not_opa.contains("not an OPA WebAssembly policy"),
            "{not_opa}"
        );
        let missing = load("k8shell/other", 1_000_000)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            missing.contains("no entrypoint") && missing.contains("k8shell/authz/decision"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn reload_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.wasm");
        std::fs::write(&path, test_module()).unwrap();
        let engine = Arc::new(WasmEngine::new().unwrap());
        let catalog = WasmCatalog::open(engine, &path, DEFAULT_ENTRYPOINT, 1_000_000)
            .await
            .unwrap();
        assert!(!catalog.reload().await, "unchanged");
        std::fs::write(&path, b"broken").unwrap();
        assert!(!catalog.reload().await);
        assert!(
            catalog.errors()[0].contains("policy.wasm"),
            "{:?}",
            catalog.errors()
        );
        assert!(
            catalog
                .current()
                .evaluate(&input(&["admin"]))
                .await
                .unwrap()
                .allow
        );
        // A changed, valid module takes over (here: other reasons).
        let text = include_str!("../tests/wasm/opa_abi.wat").replace(
            "only admins (wasm test policy)",
            "only admins (version two)",
        );
        std::fs::write(&path, wat::parse_str(text).unwrap()).unwrap();
        assert!(catalog.reload().await);
        assert!(catalog.errors().is_empty());
        let denied = catalog.current().evaluate(&input(&[])).await.unwrap();
        assert_eq!(denied.reasons, vec!["only admins (version two)".to_owned()]);
    }

    /// A real `opa build -t wasm -e k8shell/authz/decision` bundle of
    /// `policies/k8shell`. No `opa` binary can be installed on the machines
    /// this suite runs on, so this runs on request:
    /// `K8SHELL_OPA_WASM_BUNDLE=bundle.tar.gz cargo nextest run -p
    /// k8shell-authz --run-ignored only real_opa_bundle`.
    #[tokio::test]
    #[ignore = "needs an `opa build -t wasm` bundle in K8SHELL_OPA_WASM_BUNDLE"]
    async fn real_opa_bundle_decides_like_the_rego_engine() {
        let path = std::env::var_os("K8SHELL_OPA_WASM_BUNDLE")
            .expect("K8SHELL_OPA_WASM_BUNDLE names the bundle");
        let path = PathBuf::from(path);
        let bytes = read_policy(&path).await.unwrap();
        let engine = Arc::new(WasmEngine::new().unwrap());
        let wasm = WasmPolicy::load(engine, &path, &bytes, DEFAULT_ENTRYPOINT, 50_000_000)
            .await
            .unwrap();
        let rego = crate::policy::PolicySet::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/k8shell"),
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        for roles in [&["admin"][..], &[]] {
            let input = input(roles);
            assert_eq!(
                wasm.evaluate(&input).await.unwrap(),
                rego.evaluate(&input).unwrap()
            );
        }
    }
}
