//! Which engine decides: Rego in-process (regorus, the default) or an
//! OPA-compiled WebAssembly policy. Both reload from disk and keep the
//! last good policy; the API and the decision log do not care which.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::policy::{EvalError, Outcome, PolicyCatalog};
use crate::wasm::WasmCatalog;

/// The configured engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// `.rego` files from `policies_dir`, evaluated by regorus.
    #[default]
    Rego,
    /// `wasm_policy`, a module or bundle from `opa build -t wasm`.
    Wasm,
}

/// The engine in force for decisions.
pub enum Decider {
    Rego(Arc<PolicyCatalog>),
    Wasm(Arc<WasmCatalog>),
}

impl Decider {
    /// The decision for `input`.
    pub async fn decide(&self, input: &serde_json::Value) -> Result<Outcome, EvalError> {
        match self {
            // regorus is synchronous and fast (tens of microseconds); it
            // runs on the caller's task.
            Self::Rego(catalog) => catalog.current().evaluate(input),
            Self::Wasm(catalog) => catalog.current().evaluate(input).await,
        }
    }

    /// Why the last reload was refused.
    pub fn errors(&self) -> Vec<String> {
        match self {
            Self::Rego(catalog) => catalog.errors(),
            Self::Wasm(catalog) => catalog.errors(),
        }
    }

    /// What the policy was loaded from.
    pub fn sources(&self, wasm_path: &std::path::Path) -> Vec<String> {
        match self {
            Self::Rego(catalog) => catalog
                .current()
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            Self::Wasm(_) => vec![wasm_path.display().to_string()],
        }
    }

    /// `rego` or `wasm`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Rego(_) => "rego",
            Self::Wasm(_) => "wasm",
        }
    }

    /// Reloads from disk when changed.
    pub async fn reload(&self) -> anyhow::Result<bool> {
        Ok(match self {
            Self::Rego(catalog) => {
                let catalog = Arc::clone(catalog);
                tokio::task::spawn_blocking(move || catalog.reload()).await?
            }
            Self::Wasm(catalog) => catalog.reload().await,
        })
    }
}
