//! Prometheus metrics in text format: reconcile outcomes and durations, provider calls by
//! operation and result, and whatever the provider registers (pool usage).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<Labels, Counter>,
    pub reconcile_errors: Family<Labels, Counter>,
    pub reconcile_duration: Histogram,
    pub provider_calls: Family<Labels, Counter>,
    pub provider_call_duration: Family<Labels, Histogram>,
    pub leader: Gauge,
    pub orphans_deleted: Counter,
    pub foreign_resources: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        ferry_runtime::build_info::register(&mut registry, "operator");
        let reconciles = Family::<Labels, Counter>::default();
        let reconcile_errors = Family::<Labels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let provider_calls = Family::<Labels, Counter>::default();
        let provider_call_duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        let leader = Gauge::default();
        let orphans_deleted = Counter::default();
        let foreign_resources = Gauge::default();
        registry.register(
            "ferry_reconciles",
            "Service reconciles, by result (ok, error)",
            reconciles.clone(),
        );
        registry.register(
            "ferry_reconcile_errors",
            "Failed Service reconciles, by error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "ferry_reconcile_duration_seconds",
            "Time spent reconciling one Service",
            reconcile_duration.clone(),
        );
        registry.register(
            "ferry_provider_calls",
            "Calls to the load balancer provider, by operation and result",
            provider_calls.clone(),
        );
        registry.register(
            "ferry_provider_call_duration_seconds",
            "Duration of calls to the load balancer provider, by operation",
            provider_call_duration.clone(),
        );
        registry.register(
            "ferry_leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "ferry_orphans_deleted",
            "Balancers deleted because no Service claimed them",
            orphans_deleted.clone(),
        );
        registry.register(
            "ferry_foreign_resources",
            "Cloud resources with this cluster's --cluster-id but another cluster's identity (or none) at the last orphan pass; never deleted",
            foreign_resources.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            provider_calls,
            provider_call_duration,
            leader,
            orphans_deleted,
            foreign_resources,
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn provider_call(&self, operation: &'static str, result: &str, took: Duration) {
        self.provider_calls
            .get_or_create(&vec![
                ("operation", operation.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
        self.provider_call_duration
            .get_or_create(&vec![("operation", operation.to_string())])
            .observe(took.as_secs_f64());
    }

    pub fn reconciled(&self, result: &str, took: Duration) {
        self.reconciles
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn reconcile_error(&self, kind: &str) {
        self.reconcile_errors
            .get_or_create(&vec![("error", kind.to_string())])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_series() {
        let m = Metrics::new();
        m.reconciled("ok", Duration::from_millis(3));
        m.reconcile_error("transient");
        m.provider_call("ensure", "ok", Duration::from_millis(1));
        let text = m.encode();
        assert!(
            text.contains("ferry_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("ferry_reconcile_errors_total{error=\"transient\"} 1"));
        assert!(text.contains("ferry_reconcile_duration_seconds_bucket"));
        assert!(text.contains("ferry_provider_calls_total{operation=\"ensure\",result=\"ok\"} 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
