use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Readiness of a service's components, shared between the components that
/// report it and the admin server that answers `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, ComponentState>>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
struct ComponentState {
    ready: bool,
    detail: String,
}

/// What `/readyz` answers.
#[derive(Clone, Debug, Serialize)]
pub struct HealthReport {
    /// Service name.
    pub service: String,
    /// True when every component is ready.
    pub ready: bool,
    /// Per-component state.
    pub components: BTreeMap<String, serde_json::Value>,
}

impl Health {
    /// Creates a health registry with no components (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a component that starts as not ready.
    pub fn register(&self, component: &str) {
        let mut components = self.components.lock().unwrap_or_else(|p| p.into_inner());
        components.insert(
            component.to_owned(),
            ComponentState {
                ready: false,
                detail: "starting".to_owned(),
            },
        );
    }

    /// Marks a component ready.
    pub fn ready(&self, component: &str) {
        self.set(component, true, "ok");
    }

    /// Marks a component not ready, with the reason.
    pub fn not_ready(&self, component: &str, detail: impl Into<String>) {
        self.set(component, false, detail);
    }

    fn set(&self, component: &str, ready: bool, detail: impl Into<String>) {
        let state = ComponentState {
            ready,
            detail: detail.into(),
        };
        // A poisoned lock only means a reporter panicked mid-update; the map
        // itself is still consistent, so keep serving it.
        let mut components = self.components.lock().unwrap_or_else(|p| p.into_inner());
        if components.get(component) != Some(&state) {
            if !state.ready {
                tracing::info!(component, detail = %state.detail, "component not ready");
            }
            components.insert(component.to_owned(), state);
        }
    }

    /// Returns the current report.
    pub fn report(&self, service: &str) -> HealthReport {
        let components = self.components.lock().unwrap_or_else(|p| p.into_inner());
        HealthReport {
            service: service.to_owned(),
            ready: components.values().all(|c| c.ready),
            components: components
                .iter()
                .map(|(name, state)| {
                    (
                        name.clone(),
                        serde_json::json!({"ready": state.ready, "detail": state.detail}),
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_component_is() {
        let health = Health::new();
        health.register("bus");
        health.register("db");
        assert!(!health.report("x").ready);
        health.ready("bus");
        assert!(!health.report("x").ready);
        health.ready("db");
        assert!(health.report("x").ready);
        health.not_ready("db", "connection refused");
        let report = health.report("x");
        assert!(!report.ready);
        assert_eq!(report.components["db"]["detail"], "connection refused");
    }
}
