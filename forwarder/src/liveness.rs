//! Which forwarders are alive, from two signals: the heartbeat Leases as the API shows them
//! (`heartbeat::Liveness`) and the peers' direct heartbeats over the node network
//! (`membership`). Pure: the planner hands in both and the time.
//!
//! - **A peer it hears is alive**, whatever the API says: a forwarder cut off from the API
//!   keeps serving (fail static), and its peers keep it.
//! - **While the API view is fresh** (this node sees its own Lease renewals come back through
//!   the watch), a peer whose Lease is fresh is alive too, even unheard: the API still reaches
//!   it, so it is the traffic between nodes (a firewall on the peer port), not the node, that
//!   is down. Every node then counts the same nodes alive, so each VIP keeps one owner.
//! - **While it is stale** (the API server is down, slow, or its watches silent), what the API
//!   showed last is not evidence of anything: the peers it hears are alive, and one it stops
//!   hearing is dead, but only if it still hears a strict majority of the nodes alive when it
//!   last could trust its view. Without that majority it cannot tell "they are gone" from "I
//!   am cut off", so it changes nothing: it keeps the last trusted set, and with it every VIP
//!   where it was. (A two-node cluster therefore does not fail over while the API is down.)

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::heartbeat;

/// What `decide` concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The nodes whose forwarders count as alive.
    pub live: BTreeSet<String>,
    /// The API view could be trusted.
    pub api_fresh: bool,
    /// The API view was stale and too few peers were heard to change anything.
    pub frozen: bool,
}

/// The nodes heard within `timeout` before `now`, and `me`.
pub fn heard_within(
    me: &str,
    heard: &HashMap<String, Instant>,
    timeout: Duration,
    now: Instant,
) -> BTreeSet<String> {
    heard
        .iter()
        .filter(|(_, at)| now.saturating_duration_since(**at) < timeout)
        .map(|(n, _)| n.clone())
        .chain(std::iter::once(me.to_string()))
        .collect()
}

/// Decides who is alive. `trusted` is the live set of the last verdict that was not frozen
/// (empty before the first).
pub fn decide(
    me: &str,
    now: Instant,
    api: &heartbeat::Liveness,
    heard: &BTreeSet<String>,
    trusted: &BTreeSet<String>,
) -> Verdict {
    let api_fresh = api.is_live(me, now);
    if api_fresh {
        let mut live = api.live(now);
        live.extend(heard.iter().cloned());
        return Verdict {
            live,
            api_fresh,
            frozen: false,
        };
    }
    let expected: BTreeSet<&String> = trusted.iter().chain(heard.iter()).collect();
    let hearing = heard.iter().filter(|n| expected.contains(n)).count();
    if 2 * hearing > expected.len() {
        Verdict {
            live: heard.clone(),
            api_fresh,
            frozen: false,
        }
    } else {
        Verdict {
            live: trusted.clone(),
            api_fresh,
            frozen: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use std::sync::Arc;

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|s| s.to_string()).collect()
    }

    fn lease(node: &str, renew: jiff::Timestamp) -> Arc<Lease> {
        Arc::new(Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(2),
                renew_time: Some(MicroTime(renew)),
                ..LeaseSpec::default()
            }),
        })
    }

    /// The API view at `t0` with every node renewing, then `later` with no renewal seen.
    fn api(nodes: &[&str]) -> (heartbeat::Liveness, Instant) {
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut l = heartbeat::Liveness::default();
        let leases: Vec<_> = nodes.iter().map(|n| lease(n, wall)).collect();
        l.observe(&leases, t0, wall);
        (l, t0)
    }

    #[test]
    fn with_a_fresh_api_view_heard_or_renewing_is_alive() {
        let (l, t0) = api(&["a", "b", "c"]);
        // c is unheard (peer traffic blocked) but renews: alive, on every node alike.
        let v = decide("a", t0, &l, &set(&["a", "b"]), &BTreeSet::new());
        assert!(v.api_fresh && !v.frozen);
        assert_eq!(v.live, set(&["a", "b", "c"]));
    }

    #[test]
    fn an_api_outage_moves_nothing_while_every_peer_is_heard() {
        let (l, t0) = api(&["a", "b", "c"]);
        let later = t0 + Duration::from_secs(60);
        let v = decide(
            "a",
            later,
            &l,
            &set(&["a", "b", "c"]),
            &set(&["a", "b", "c"]),
        );
        assert!(!v.api_fresh && !v.frozen);
        assert_eq!(v.live, set(&["a", "b", "c"]));
    }

    #[test]
    fn a_node_lost_during_an_outage_is_dead_to_a_majority() {
        let (l, t0) = api(&["a", "b", "c"]);
        let later = t0 + Duration::from_secs(60);
        let v = decide("a", later, &l, &set(&["a", "b"]), &set(&["a", "b", "c"]));
        assert_eq!(v.live, set(&["a", "b"]), "c's VIPs move");
    }

    #[test]
    fn a_node_cut_off_from_api_and_peers_changes_nothing() {
        let (l, t0) = api(&["a", "b", "c"]);
        let later = t0 + Duration::from_secs(60);
        let v = decide("a", later, &l, &set(&["a"]), &set(&["a", "b", "c"]));
        assert!(v.frozen);
        assert_eq!(v.live, set(&["a", "b", "c"]), "no VIP grabbed or given up");
        // Two nodes, one gone while the API is down: no majority, no failover.
        let (l, t0) = api(&["a", "b"]);
        let v = decide(
            "a",
            t0 + Duration::from_secs(60),
            &l,
            &set(&["a"]),
            &set(&["a", "b"]),
        );
        assert!(v.frozen);
    }

    #[test]
    fn a_peer_that_lost_the_api_but_is_heard_stays_alive() {
        // b's Lease has gone stale (it cannot reach the API), a's view is fresh.
        let t0 = Instant::now();
        let wall = jiff::Timestamp::now();
        let mut l = heartbeat::Liveness::default();
        l.observe(&[lease("a", wall), lease("b", wall)], t0, wall);
        let t1 = t0 + Duration::from_secs(5);
        let w1 = wall + jiff::SignedDuration::from_secs(5);
        l.observe(&[lease("a", w1), lease("b", wall)], t1, w1);
        let v = decide("a", t1, &l, &set(&["a", "b"]), &set(&["a", "b"]));
        assert!(v.api_fresh);
        assert_eq!(v.live, set(&["a", "b"]));
    }

    #[test]
    fn only_recent_heartbeats_count() {
        let t0 = Instant::now();
        let heard: HashMap<String, Instant> = [
            ("b".to_string(), t0),
            ("c".to_string(), t0 + Duration::from_millis(900)),
        ]
        .into();
        let now = t0 + Duration::from_millis(1200);
        assert_eq!(
            heard_within("a", &heard, Duration::from_secs(1), now),
            set(&["a", "c"])
        );
    }
}
