//! The forwarder's Prometheus metrics: what it holds (VIPs, live forwarders), how its plan is
//! applied, and per Service what its data plane does (connections, refusals, timeouts, UDP
//! flows), and per VIP who announces it (`vip_owner`, on the owner), who took it over, and
//! which no node can announce. Services are labelled `namespace` and `service` (its name),
//! as kube-state-metrics does, so the two join. Labels are Service keys and VIPs, never
//! client addresses: cardinality stays with the cluster's size, not its traffic.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// `namespace` and `service` labels of a Service key (`namespace/name`).
pub fn service_labels(service: &str) -> Labels {
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    vec![
        ("namespace", namespace.to_string()),
        ("service", name.to_string()),
    ]
}

/// Gauges whose label sets follow a state: each `set` replaces every series with the given
/// ones, removing those no longer present (rather than clearing, so a scrape never sees
/// the family empty in between).
#[derive(Default)]
pub struct StateGauge {
    family: Family<Labels, Gauge>,
    last: std::sync::Mutex<std::collections::BTreeSet<Labels>>,
}

impl StateGauge {
    pub fn set(&self, values: impl IntoIterator<Item = (Labels, i64)>) {
        let mut now = std::collections::BTreeSet::new();
        for (labels, value) in values {
            self.family.get_or_create(&labels).set(value);
            now.insert(labels);
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for gone in last.difference(&now) {
            self.family.remove(gone);
        }
        *last = now;
    }
}

/// Counters the data planes update, by Service.
#[derive(Default)]
pub struct DataplaneMetrics {
    connections: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    connect_failures: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    timeouts: Family<Labels, Counter>,
    udp_flows: Family<Labels, Gauge>,
    udp_evicted: Family<Labels, Counter>,
    engine_connections: Family<Labels, Counter>,
}

/// One Service's handles, taken once per frontend so the hot path only touches atomics.
#[derive(Clone, Default)]
pub struct ServiceMetrics {
    connections: Counter,
    active: Gauge,
    connect_failures: Counter,
    refused: Counter,
    timeouts: Counter,
    udp_flows: Gauge,
    udp_evicted: Counter,
}

impl ServiceMetrics {
    pub fn opened(&self) {
        self.connections.inc();
        self.active.inc();
    }
    /// New connections the kernel data plane counted.
    pub fn counted(&self, n: u64) {
        self.connections.inc_by(n);
    }
    pub fn closed(&self) {
        self.active.dec();
    }
    pub fn connect_failed(&self) {
        self.connect_failures.inc();
    }
    pub fn refused(&self) {
        self.refused.inc();
    }
    pub fn timed_out(&self) {
        self.timeouts.inc();
    }
    pub fn udp_flows_changed(&self, by: i64) {
        self.udp_flows.inc_by(by);
    }
    pub fn udp_flow_evicted(&self) {
        self.udp_evicted.inc();
    }
}

impl DataplaneMetrics {
    /// The handles of `service` (`namespace/name`).
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let labels = service_labels(service);
        ServiceMetrics {
            connections: self.connections.get_or_create(&labels).clone(),
            active: self.active.get_or_create(&labels).clone(),
            connect_failures: self.connect_failures.get_or_create(&labels).clone(),
            refused: self.refused.get_or_create(&labels).clone(),
            timeouts: self.timeouts.get_or_create(&labels).clone(),
            udp_flows: self.udp_flows.get_or_create(&labels).clone(),
            udp_evicted: self.udp_evicted.get_or_create(&labels).clone(),
        }
    }

    /// The count of connections TCP engine `thread` accepts, labelled with the CPU it is
    /// pinned to (`any` when it is not).
    pub fn engine(&self, thread: usize, cpu: Option<usize>) -> Counter {
        let labels = vec![
            ("thread", thread.to_string()),
            (
                "cpu",
                cpu.map_or_else(|| "any".to_string(), |c| c.to_string()),
            ),
        ];
        self.engine_connections.get_or_create(&labels).clone()
    }
}

pub struct Metrics {
    registry: Registry,
    pub dataplane: std::sync::Arc<DataplaneMetrics>,
    pub vips_held: Gauge,
    pub live_forwarders: Gauge,
    /// The other forwarders by what the direct heartbeats say (`set_peers`).
    peers: Family<Labels, Gauge>,
    pub frontends: Gauge,
    pub applies: Family<Labels, Counter>,
    pub announcements: Counter,
    pub refused_vips: Gauge,
    pub forwarding_failures: Family<Labels, Counter>,
    /// 1 per (VIP, Service) this node announces.
    pub vip_owner: StateGauge,
    /// VIPs this node took over, by Service.
    pub vip_owner_changes: Family<Labels, Counter>,
    /// 1 per (VIP, Service) no node can announce, as this node sees it.
    pub vip_unannounced: StateGauge,
    /// Backends of the Services forwarded here, by health state.
    pub backends: StateGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        ferry_runtime::build_info::register(&mut r, "forwarder");
        let d = DataplaneMetrics::default();
        r.register(
            "ferry_forwarder_connections",
            "New connections forwarded, by Service: TCP connections relayed in userspace, and new TCP connections and UDP flows steered by nftables in kernel mode",
            d.connections.clone(),
        );
        r.register(
            "ferry_forwarder_active_connections",
            "TCP connections being relayed now (userspace path), by Service",
            d.active.clone(),
        );
        r.register(
            "ferry_forwarder_backend_connect_failures",
            "Connects to a backend that failed or timed out, by Service",
            d.connect_failures.clone(),
        );
        r.register(
            "ferry_forwarder_refused",
            "Connections and datagrams refused by loadBalancerSourceRanges, by Service",
            d.refused.clone(),
        );
        r.register(
            "ferry_forwarder_timeouts",
            "Connections closed for being idle or half-closed too long, by Service",
            d.timeouts.clone(),
        );
        r.register(
            "ferry_forwarder_udp_flows",
            "UDP flows in the flow table now, by Service",
            d.udp_flows.clone(),
        );
        r.register(
            "ferry_forwarder_udp_flows_evicted",
            "UDP flows evicted to make room for new ones at the flow table's limit, by Service",
            d.udp_evicted.clone(),
        );
        r.register(
            "ferry_forwarder_thread_connections",
            "TCP connections accepted by each userspace data-plane thread, labelled with the CPU it is pinned to (any: not pinned); how evenly the kernel spreads them",
            d.engine_connections.clone(),
        );
        let m = Self {
            dataplane: std::sync::Arc::new(d),
            vips_held: Gauge::default(),
            live_forwarders: Gauge::default(),
            peers: Family::default(),
            frontends: Gauge::default(),
            applies: Family::default(),
            announcements: Counter::default(),
            refused_vips: Gauge::default(),
            forwarding_failures: Family::default(),
            vip_owner: StateGauge::default(),
            vip_owner_changes: Family::default(),
            vip_unannounced: StateGauge::default(),
            backends: StateGauge::default(),
            registry: r,
        };
        let mut m = m;
        m.registry.register(
            "ferry_forwarder_vips_held",
            "VIPs this node holds and announces",
            m.vips_held.clone(),
        );
        m.registry.register(
            "ferry_forwarder_live_forwarders",
            "Forwarders with a fresh heartbeat, this one included",
            m.live_forwarders.clone(),
        );
        m.registry.register(
            "ferry_forwarder_peers",
            "Other forwarders by what this node's direct heartbeats say: heard (within the peer timeout), silent (heard before, not now), unheard (a live heartbeat Lease but never heard: judged by its Lease alone, so its VIPs move only when the Lease expires)",
            m.peers.clone(),
        );
        m.registry.register(
            "ferry_forwarder_frontends",
            "VIP ports this node forwards",
            m.frontends.clone(),
        );
        m.registry.register(
            "ferry_forwarder_plan_applies",
            "Changed plans applied to the node, by result (ok, partial, error)",
            m.applies.clone(),
        );
        m.registry.register(
            "ferry_forwarder_refused_vips",
            "VIPs this node cannot serve (their forwarding could not be set up) and leaves to others",
            m.refused_vips.clone(),
        );
        m.registry.register(
            "ferry_forwarder_forwarding_failures",
            "Times a Service's forwarding could not be set up on this node, by Service",
            m.forwarding_failures.clone(),
        );
        m.registry.register(
            "ferry_forwarder_announcements",
            "Gratuitous ARPs and unsolicited neighbour advertisements sent",
            m.announcements.clone(),
        );
        m.registry.register(
            "ferry_forwarder_vip_owner",
            "1 for each VIP (and Service on it) this node announces",
            m.vip_owner.family.clone(),
        );
        m.registry.register(
            "ferry_forwarder_vip_owner_changes",
            "VIPs this node took over from another node (or from none), by Service",
            m.vip_owner_changes.clone(),
        );
        m.registry.register(
            "ferry_forwarder_vip_unannounced",
            "1 for each VIP (and Service on it) that no node can announce, as this node sees it",
            m.vip_unannounced.family.clone(),
        );
        m.registry.register(
            "ferry_forwarder_backends",
            "Backends (nodeIP:nodePort or endpoint) of the Services this node forwards, by health state (healthy, unhealthy)",
            m.backends.family.clone(),
        );
        m
    }

    pub fn forwarding_failed(&self, service: &str) {
        self.forwarding_failures
            .get_or_create(&service_labels(service))
            .inc();
    }

    pub fn took_over(&self, service: &str) {
        self.vip_owner_changes
            .get_or_create(&service_labels(service))
            .inc();
    }

    /// The other forwarders by what the direct heartbeats say: `heard` within the peer
    /// timeout, `silent` (heard before, not now), `unheard` (a live Lease, never heard).
    pub fn set_peers(&self, heard: usize, silent: usize, unheard: usize) {
        for (state, n) in [("heard", heard), ("silent", silent), ("unheard", unheard)] {
            self.peers
                .get_or_create(&vec![("state", state.to_string())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn applied(&self, result: &str) {
        self.applies
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
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
        m.vips_held.set(2);
        m.applied("ok");
        m.dataplane.service("default/web").opened();
        m.set_peers(2, 1, 0);
        let text = m.encode();
        assert!(
            text.contains("ferry_forwarder_peers{state=\"heard\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ferry_forwarder_peers{state=\"silent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_forwarder_peers{state=\"unheard\"} 0"),
            "{text}"
        );
        assert!(text.contains("ferry_forwarder_vips_held 2"), "{text}");
        assert!(text.contains("ferry_forwarder_plan_applies_total{result=\"ok\"} 1"));
        assert!(text.contains(
            "ferry_forwarder_connections_total{namespace=\"default\",service=\"web\"} 1"
        ));
        assert!(text.contains(
            "ferry_forwarder_active_connections{namespace=\"default\",service=\"web\"} 1"
        ));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn state_gauges_drop_series_that_are_gone() {
        let m = Metrics::new();
        let owner = |vip: &str| {
            let mut l = service_labels("default/web");
            l.insert(0, ("vip", vip.to_string()));
            l
        };
        m.vip_owner
            .set([(owner("192.0.2.1"), 1), (owner("192.0.2.2"), 1)]);
        m.vip_owner.set([(owner("192.0.2.2"), 1)]);
        let text = m.encode();
        assert!(!text.contains("192.0.2.1"), "{text}");
        assert!(text.contains(
            "ferry_forwarder_vip_owner{vip=\"192.0.2.2\",namespace=\"default\",service=\"web\"} 1"
        ), "{text}");
        m.vip_owner.set([]);
        assert!(!m.encode().contains("ferry_forwarder_vip_owner{"));
    }
}
