use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a projection metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    /// Projection name.
    pub projection: String,
}

/// Bus metrics, registered in the owning service's registry.
#[derive(Clone, Debug, Default)]
pub struct BusMetrics {
    /// Events appended.
    pub appended: Counter,
    /// Appends rejected by optimistic concurrency.
    pub append_conflicts: Counter,
    /// Events applied per projection.
    pub projection_applied: Family<ProjectionLabels, Counter>,
    /// Events skipped per projection (unknown or malformed).
    pub projection_skipped: Family<ProjectionLabels, Counter>,
    /// Last applied stream sequence per projection.
    pub projection_sequence: Family<ProjectionLabels, Gauge>,
}

impl BusMetrics {
    /// Creates the metrics and registers them under `k8shell_bus_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("k8shell_bus");
        sub.register(
            "appended_events",
            "Events appended",
            metrics.appended.clone(),
        );
        sub.register(
            "append_conflicts",
            "Appends rejected by optimistic concurrency",
            metrics.append_conflicts.clone(),
        );
        sub.register(
            "projection_applied_events",
            "Events applied by a projection",
            metrics.projection_applied.clone(),
        );
        sub.register(
            "projection_skipped_events",
            "Unknown or malformed events skipped by a projection",
            metrics.projection_skipped.clone(),
        );
        sub.register(
            "projection_sequence",
            "Last stream sequence applied by a projection",
            metrics.projection_sequence.clone(),
        );
        metrics
    }
}
