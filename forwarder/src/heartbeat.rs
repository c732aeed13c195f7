//! Forwarder heartbeats: each forwarder renews a Lease named for its node, and every forwarder
//! tracks which of those Leases are fresh. A node whose forwarder stops renewing loses its
//! VIPs once its Lease expires, which bounds failover time.
//!
//! `watch` keeps the liveness current from the Lease watch itself, timing every renewal as it
//! arrives, and wakes the planner only when the set of live nodes changes; expiries are the
//! planner's to notice at `Liveness::next_expiry`. So renewals (two per node per second by
//! default) do not make every forwarder re-plan.
//!
//! Freshness is judged by this process's own monotonic clock (when did the renew time last
//! change?), as client-go's leader election does, so clock skew between nodes cannot keep a
//! dead node alive. Only a Lease seen for the first time is judged by the wall clock.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Label on every heartbeat Lease, so forwarders watch only those.
pub const HEARTBEAT_LABEL: &str = "ferry.dev/forwarder-heartbeat";
/// Annotation on a heartbeat Lease: the VIPs its node cannot serve, comma-separated (the
/// same news the direct heartbeats carry, for peers that cannot hear it).
pub const REFUSED_ANNOTATION: &str = "ferry.dev/refused-vips";
const FIELD_MANAGER: &str = "ferry-forwarder";

/// The heartbeat Lease's name for `node`.
pub fn lease_name(node: &str) -> String {
    format!("ferry-forwarder-{node}")
}

/// Which forwarders are alive, from the Leases they renew.
#[derive(Debug, Default)]
pub struct Liveness {
    /// Node → (renew time as last seen, when it was last seen to change, lease duration).
    seen: HashMap<String, (Option<jiff::Timestamp>, Instant, Duration)>,
    /// Node → the VIPs its Lease says it cannot serve.
    refused: HashMap<String, BTreeSet<std::net::IpAddr>>,
}

fn node_of(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|s| !s.is_empty())
}

impl Liveness {
    /// Takes in the current Leases (all of them: nodes without one are forgotten); `now` and
    /// `wall` are this process's clocks.
    pub fn observe(&mut self, leases: &[Arc<Lease>], now: Instant, wall: jiff::Timestamp) {
        let mut present = BTreeSet::new();
        for lease in leases {
            if let Some(node) = self.record(lease, now, wall) {
                present.insert(node.to_string());
            }
        }
        self.seen.retain(|node, _| present.contains(node));
        self.refused.retain(|node, _| present.contains(node));
    }

    /// Takes in one Lease created or renewed; returns whether its node went from dead to live
    /// or back.
    pub fn renewed(&mut self, lease: &Lease, now: Instant, wall: jiff::Timestamp) -> bool {
        let Some(node) = node_of(lease) else {
            return false;
        };
        let before = self.is_live(node, now);
        self.record(lease, now, wall);
        before != self.is_live(node, now)
    }

    /// Forgets a deleted Lease's node; returns whether that node was live.
    pub fn deleted(&mut self, lease: &Lease, now: Instant) -> bool {
        let Some(node) = node_of(lease) else {
            return false;
        };
        let was_live = self.is_live(node, now);
        self.seen.remove(node);
        self.refused.remove(node);
        was_live
    }

    /// Whether `node`'s Lease was seen renewed within its duration.
    pub fn is_live(&self, node: &str, now: Instant) -> bool {
        self.seen
            .get(node)
            .is_some_and(|(renew, changed, duration)| {
                renew.is_some() && now.saturating_duration_since(*changed) < *duration
            })
    }

    /// Whether `node`'s Lease was seen renewed within `window` before `now` (by when this
    /// process saw the renew time change, not by the time it names).
    pub fn renewed_within(&self, node: &str, window: Duration, now: Instant) -> bool {
        self.renewed_at(node)
            .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    /// When `node`'s Lease was last seen renewed.
    pub fn renewed_at(&self, node: &str) -> Option<Instant> {
        self.seen
            .get(node)
            .and_then(|(renew, changed, _)| renew.map(|_| *changed))
    }

    /// Notes `lease`'s renew time; returns its node.
    fn record<'l>(
        &mut self,
        lease: &'l Lease,
        now: Instant,
        wall: jiff::Timestamp,
    ) -> Option<&'l str> {
        let node = node_of(lease)?;
        let refused: BTreeSet<std::net::IpAddr> = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REFUSED_ANNOTATION))
            .map(|v| {
                v.split(',')
                    .filter_map(|ip| ip.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        self.refused.insert(node.to_string(), refused);
        let spec = lease.spec.as_ref();
        let renew = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let duration = Duration::from_secs(
            spec.and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0),
        );
        match self.seen.get_mut(node) {
            Some((last, changed, d)) => {
                if *last != renew {
                    *last = renew;
                    *changed = now;
                }
                *d = duration;
            }
            None => {
                // First sight: trust the wall clock once, so a Lease left behind by a dead
                // node is not taken as fresh for a whole duration after a restart. A renew
                // time in our future (a clock ahead of ours) counts as just now.
                let age = renew.map_or(duration, |r| {
                    Duration::try_from(wall.duration_since(r)).unwrap_or(Duration::ZERO)
                });
                let changed = now.checked_sub(age.min(duration)).unwrap_or(now);
                self.seen
                    .insert(node.to_string(), (renew, changed, duration));
            }
        }
        Some(node)
    }

    /// Nodes whose forwarder renewed within its Lease's duration.
    pub fn live(&self, now: Instant) -> BTreeSet<String> {
        self.seen
            .keys()
            .filter(|node| self.is_live(node, now))
            .cloned()
            .collect()
    }

    /// The VIPs `node`'s Lease says it cannot serve.
    pub fn refused(&self, node: &str) -> BTreeSet<std::net::IpAddr> {
        self.refused.get(node).cloned().unwrap_or_default()
    }

    /// Every node with a heartbeat Lease: the forwarders there are (or were).
    pub fn known(&self) -> BTreeSet<String> {
        self.seen.keys().cloned().collect()
    }

    /// When the next live node would expire if it stopped renewing now.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.seen
            .values()
            .map(|(_, changed, duration)| *changed + *duration)
            .filter(|at| *at > now)
            .min()
    }
}

/// Watches the heartbeat Leases into `liveness`, timing each renewal when it arrives, and
/// pokes `changed` only when a node comes alive or its Lease goes: renewals of live nodes
/// (two per node per second by default) do not make the forwarder re-plan. Expiry is the
/// planner's to notice, at `Liveness::next_expiry`.
pub fn watch(
    api: Api<Lease>,
    liveness: Arc<Mutex<Liveness>>,
    changed: Arc<Notify>,
) -> Store<Lease> {
    let config = watcher::Config::default().labels(HEARTBEAT_LABEL);
    crate::watches::watch_filtered(
        api,
        config,
        changed,
        "heartbeat Leases",
        move |event, store| {
            let (now, wall) = (Instant::now(), jiff::Timestamp::now());
            let mut liveness = liveness.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                watcher::Event::Apply(lease) | watcher::Event::InitApply(lease) => {
                    liveness.renewed(lease, now, wall)
                }
                watcher::Event::Delete(lease) => liveness.deleted(lease, now),
                watcher::Event::InitDone => {
                    // A relist: Leases deleted while the watch was down are gone from it.
                    let before = liveness.live(now);
                    liveness.observe(&store.state(), now, wall);
                    before != liveness.live(now)
                }
                watcher::Event::Init => false,
            }
        },
    )
}

/// Renews this node's heartbeat Lease.
pub struct Heartbeat {
    api: Api<Lease>,
    node: String,
    duration: Duration,
    /// This node's refused VIPs, written into the Lease.
    refused: crate::membership::Refused,
}

impl Heartbeat {
    pub fn new(
        client: Client,
        namespace: &str,
        node: &str,
        duration: Duration,
        refused: crate::membership::Refused,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            node: node.to_string(),
            duration,
            refused,
        }
    }

    /// Writes the Lease with a fresh renew time (creating it if needed).
    pub async fn renew(&self) -> Result<(), kube::Error> {
        let seconds = i32::try_from(self.duration.as_secs_f64().ceil() as u64)
            .unwrap_or(i32::MAX)
            .max(1);
        let refused: Vec<String> = self
            .refused
            .lock()
            .map(|r| r.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(&self.node)),
                labels: Some([(HEARTBEAT_LABEL.to_string(), "true".to_string())].into()),
                annotations: Some([(REFUSED_ANNOTATION.to_string(), refused.join(","))].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                lease_duration_seconds: Some(seconds),
                renew_time: Some(MicroTime(jiff::Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        let mut value = serde_json::to_value(&lease).map_err(kube::Error::SerdeError)?;
        value["apiVersion"] = "coordination.k8s.io/v1".into();
        value["kind"] = "Lease".into();
        let (name, params, patch) = (
            lease_name(&self.node),
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(value),
        );
        let write = self.api.patch(&name, &params, &patch);
        // A renewal that hangs (an API server stopped mid-call) must not hold up the next.
        match tokio::time::timeout(self.call_timeout(), write).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(kube::Error::Service(
                "renewing the heartbeat Lease timed out".into(),
            )),
        }
    }

    /// The bound on one Lease call: the Lease's duration, at most 5 s.
    fn call_timeout(&self) -> Duration {
        self.duration.min(Duration::from_secs(5))
    }

    /// Renews every `interval` until `stop` fires, logging (not failing) on API errors: a
    /// missed renewal only costs this node its VIPs, and the next one restores them.
    pub async fn run(&self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            match self.renew().await {
                Ok(()) if failing => {
                    info!(node = %self.node, "heartbeat renewed again");
                    failing = false;
                }
                Ok(()) => {}
                Err(err) if !failing => {
                    warn!(node = %self.node, error = %err, "cannot renew the heartbeat Lease");
                    failing = true;
                }
                Err(err) => debug!(error = %err, "heartbeat still failing"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = crate::stopped(&mut stop) => return,
            }
        }
    }

    /// Deletes the Lease so other forwarders take this node's VIPs over at once.
    pub async fn release(&self) {
        let (name, params) = (lease_name(&self.node), DeleteParams::default());
        let delete = self.api.delete(&name, &params);
        match tokio::time::timeout(self.call_timeout(), delete).await {
            Ok(Ok(_)) => info!(node = %self.node, "heartbeat Lease released"),
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
            Ok(Err(err)) => warn!(error = %err, "cannot release the heartbeat Lease"),
            Err(_) => warn!("releasing the heartbeat Lease timed out; it will expire"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, renew: jiff::Timestamp, seconds: i32) -> Arc<Lease> {
        Arc::new(Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(node)),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(seconds),
                renew_time: Some(MicroTime(renew)),
                ..LeaseSpec::default()
            }),
        })
    }

    #[test]
    fn a_renewing_node_stays_live_and_a_silent_one_expires() {
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut l = Liveness::default();
        l.observe(&[lease("a", wall, 2), lease("b", wall, 2)], t0, wall);
        assert_eq!(l.live(t0).len(), 2);
        // a renews at +1.5 s, b does not.
        let t1 = t0 + Duration::from_millis(1500);
        let w1 = wall + jiff::SignedDuration::from_millis(1500);
        l.observe(&[lease("a", w1, 2), lease("b", wall, 2)], t1, w1);
        let t2 = t0 + Duration::from_millis(2100);
        assert_eq!(l.live(t2), BTreeSet::from(["a".to_string()]));
        assert_eq!(l.next_expiry(t2), Some(t1 + Duration::from_secs(2)));
    }

    #[test]
    fn a_stale_lease_seen_at_start_is_not_live() {
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut l = Liveness::default();
        let old = wall - jiff::SignedDuration::from_secs(30);
        l.observe(&[lease("dead", old, 2)], t0, wall);
        assert!(l.live(t0).is_empty());
    }

    #[test]
    fn a_skewed_clock_does_not_keep_a_dead_node_alive() {
        // The dead node's clock ran an hour ahead: its renew time is in our future.
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let future = wall + jiff::SignedDuration::from_secs(3600);
        let mut l = Liveness::default();
        l.observe(&[lease("skewed", future, 2)], t0, wall);
        assert!(l.live(t0).contains("skewed"));
        l.observe(
            &[lease("skewed", future, 2)],
            t0 + Duration::from_secs(1),
            wall,
        );
        assert!(l.live(t0 + Duration::from_secs(3)).is_empty());
    }

    #[test]
    fn only_coming_alive_or_going_counts_as_a_change() {
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut l = Liveness::default();
        assert!(l.renewed(&lease("a", wall, 2), t0, wall), "a new live node");
        // Renewals of a live node change nothing the planner cares about, but they move
        // its expiry.
        let t1 = t0 + Duration::from_millis(500);
        let w1 = wall + jiff::SignedDuration::from_millis(500);
        assert!(!l.renewed(&lease("a", w1, 2), t1, w1));
        assert_eq!(l.next_expiry(t1), Some(t1 + Duration::from_secs(2)));
        // Silent past its duration, then renewing again: alive once more.
        let t3 = t1 + Duration::from_secs(3);
        let w3 = w1 + jiff::SignedDuration::from_secs(3);
        assert!(l.live(t3).is_empty());
        assert!(l.renewed(&lease("a", w3, 2), t3, w3));
        assert!(
            l.deleted(&lease("a", w3, 2), t3),
            "a live node's Lease went"
        );
        assert!(!l.deleted(&lease("a", w3, 2), t3));
        // A Lease left by a dead node is no change either.
        let old = w3 - jiff::SignedDuration::from_secs(30);
        assert!(!l.renewed(&lease("dead", old, 2), t3, w3));
    }

    #[test]
    fn a_deleted_lease_is_not_live() {
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut l = Liveness::default();
        l.observe(&[lease("a", wall, 2)], t0, wall);
        l.observe(&[], t0, wall);
        assert!(l.live(t0).is_empty());
    }
}
