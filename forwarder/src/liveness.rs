//! Which forwarders are alive, from two signals: the heartbeat Leases as the API shows them
//! (`heartbeat::Liveness`) and the peers' direct heartbeats over the node network
//! (`membership`). Pure: the planner hands in both and the time.
//!
//! - **A peer it hears is alive**, whatever the API says: a forwarder cut off from the API
//!   keeps serving (fail static), and its peers keep it.
//! - **While the API view is fresh** (this node sees its own Lease renewals come back through
//!   the watch), a peer that has gone silent is alive only while the API keeps showing its
//!   Lease *being renewed*: a renewal seen within the renewal window (one and a half renewal
//!   intervals, timed by this process's clock when the watch delivered it). Renewals that go
//!   on mean the API still reaches the node, so it is the traffic between nodes (a firewall on
//!   the peer port), not the node, that is down; every node then counts the same nodes alive,
//!   so each VIP keeps one owner. A node that is gone stops both at once, and is dead as soon
//!   as it is silent *and* its renewals are overdue — well before its Lease expires, which is
//!   what bounds failover below a second. A peer never heard at all (peer traffic blocked from
//!   the start, or direct heartbeats off) is judged by its Lease alone, as before.
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

/// What the direct heartbeats say about the peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    /// Heard within the timeout, and this node.
    pub heard: BTreeSet<String>,
    /// Heard once, but not within the timeout.
    pub silent: BTreeSet<String>,
}

impl Peers {
    /// Sorts the peers in `heard` (when each was last heard) by whether that was within
    /// `timeout` before `now`; `me` counts as heard.
    pub fn at(
        me: &str,
        heard: &HashMap<String, Instant>,
        timeout: Duration,
        now: Instant,
    ) -> Peers {
        let mut peers = Peers::default();
        for (node, at) in heard {
            if now.saturating_duration_since(*at) < timeout {
                peers.heard.insert(node.clone());
            } else {
                peers.silent.insert(node.clone());
            }
        }
        peers.silent.remove(me);
        peers.heard.insert(me.to_string());
        peers
    }
}

/// How long after its last renewal was seen a silent peer's Lease still speaks for it: one
/// and a half renewal intervals, so one renewal late by half an interval is not a failure,
/// and never longer than the Lease itself.
pub fn renewal_window(renew_interval: Duration, lease_duration: Duration) -> Duration {
    (renew_interval * 3 / 2).min(lease_duration)
}

/// Decides who is alive. `trusted` is the live set of the last verdict that was not frozen
/// (empty before the first); `window` is the `renewal_window`.
pub fn decide(
    me: &str,
    now: Instant,
    api: &heartbeat::Liveness,
    peers: &Peers,
    window: Duration,
    trusted: &BTreeSet<String>,
) -> Verdict {
    let heard = &peers.heard;
    let api_fresh = api.is_live(me, now);
    if api_fresh {
        let mut live: BTreeSet<String> = api
            .live(now)
            .into_iter()
            .filter(|n| !peers.silent.contains(n) || api.renewed_within(n, window, now))
            .collect();
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

    /// Direct heartbeats: `heard` within the timeout, `silent` once but no longer.
    fn peers(heard: &[&str], silent: &[&str]) -> Peers {
        Peers {
            heard: set(heard),
            silent: set(silent),
        }
    }

    const WINDOW: Duration = Duration::from_millis(750);

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
        // c was never heard (peer traffic blocked from the start) but renews: alive.
        let v = decide(
            "a",
            t0,
            &l,
            &peers(&["a", "b"], &[]),
            WINDOW,
            &BTreeSet::new(),
        );
        assert!(v.api_fresh && !v.frozen);
        assert_eq!(v.live, set(&["a", "b", "c"]));
    }

    /// `nodes` renewing at `t0` and every 500 ms until `until` (not after), as the watch
    /// delivers them.
    fn renewing(
        nodes: &[&str],
        stopped: &[&str],
        t0: Instant,
        until: Duration,
    ) -> heartbeat::Liveness {
        let wall = jiff::Timestamp::now();
        let mut l = heartbeat::Liveness::default();
        let mut at = Duration::ZERO;
        while at <= until {
            let w = wall + jiff::SignedDuration::try_from(at).unwrap();
            let leases: Vec<_> = nodes
                .iter()
                .map(|n| {
                    let renewed = if stopped.contains(n) { wall } else { w };
                    lease(n, renewed)
                })
                .collect();
            l.observe(&leases, t0 + at, w);
            at += Duration::from_millis(500);
        }
        l
    }

    #[test]
    fn a_silent_peer_that_keeps_renewing_stays_alive() {
        // c's peer port was blocked a while ago; the API shows its renewals going on.
        let t0 = Instant::now();
        let l = renewing(&["a", "b", "c"], &[], t0, Duration::from_secs(10));
        let now = t0 + Duration::from_millis(10_300);
        let v = decide(
            "a",
            now,
            &l,
            &peers(&["a", "b"], &["c"]),
            WINDOW,
            &BTreeSet::new(),
        );
        assert!(v.api_fresh);
        assert_eq!(v.live, set(&["a", "b", "c"]), "no VIP moves for a firewall");
    }

    #[test]
    fn a_silent_peer_whose_renewals_stopped_is_dead_before_its_lease_expires() {
        // c is gone at t0: silent, and its last renewal is the one seen at t0.
        let t0 = Instant::now();
        let l = renewing(&["a", "b", "c"], &["c"], t0, Duration::from_secs(1));
        // Its 2-s Lease is still fresh 800 ms on, but its renewals are overdue.
        let now = t0 + Duration::from_millis(800);
        assert!(l.is_live("c", now), "the Lease alone would keep c");
        let v = decide(
            "a",
            now,
            &l,
            &peers(&["a", "b"], &["c"]),
            WINDOW,
            &BTreeSet::new(),
        );
        assert_eq!(v.live, set(&["a", "b"]), "c's VIPs move");
        // Within the window its last renewal still speaks for it.
        let now = t0 + Duration::from_millis(700);
        let v = decide(
            "a",
            now,
            &l,
            &peers(&["a", "b"], &["c"]),
            WINDOW,
            &BTreeSet::new(),
        );
        assert_eq!(v.live, set(&["a", "b", "c"]));
    }

    #[test]
    fn the_renewal_window_is_one_and_a_half_intervals_within_the_lease() {
        let ms = Duration::from_millis;
        assert_eq!(renewal_window(ms(500), Duration::from_secs(2)), ms(750));
        assert_eq!(renewal_window(ms(1900), Duration::from_secs(2)), ms(2000));
    }

    #[test]
    fn an_api_outage_moves_nothing_while_every_peer_is_heard() {
        let (l, t0) = api(&["a", "b", "c"]);
        let later = t0 + Duration::from_secs(60);
        let v = decide(
            "a",
            later,
            &l,
            &peers(&["a", "b", "c"], &[]),
            WINDOW,
            &set(&["a", "b", "c"]),
        );
        assert!(!v.api_fresh && !v.frozen);
        assert_eq!(v.live, set(&["a", "b", "c"]));
    }

    #[test]
    fn a_node_lost_during_an_outage_is_dead_to_a_majority() {
        let (l, t0) = api(&["a", "b", "c"]);
        let later = t0 + Duration::from_secs(60);
        let v = decide(
            "a",
            later,
            &l,
            &peers(&["a", "b"], &[]),
            WINDOW,
            &set(&["a", "b", "c"]),
        );
        assert_eq!(v.live, set(&["a", "b"]), "c's VIPs move");
    }

    #[test]
    fn a_node_cut_off_from_api_and_peers_changes_nothing() {
        let (l, t0) = api(&["a", "b", "c"]);
        let later = t0 + Duration::from_secs(60);
        let v = decide(
            "a",
            later,
            &l,
            &peers(&["a"], &[]),
            WINDOW,
            &set(&["a", "b", "c"]),
        );
        assert!(v.frozen);
        assert_eq!(v.live, set(&["a", "b", "c"]), "no VIP grabbed or given up");
        // Two nodes, one gone while the API is down: no majority, no failover.
        let (l, t0) = api(&["a", "b"]);
        let v = decide(
            "a",
            t0 + Duration::from_secs(60),
            &l,
            &peers(&["a"], &[]),
            WINDOW,
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
        let v = decide(
            "a",
            t1,
            &l,
            &peers(&["a", "b"], &[]),
            WINDOW,
            &set(&["a", "b"]),
        );
        assert!(v.api_fresh);
        assert_eq!(v.live, set(&["a", "b"]));
    }

    #[test]
    fn only_recent_heartbeats_count_and_older_ones_make_a_peer_silent() {
        let t0 = Instant::now();
        let heard: HashMap<String, Instant> = [
            ("b".to_string(), t0),
            ("c".to_string(), t0 + Duration::from_millis(900)),
        ]
        .into();
        let now = t0 + Duration::from_millis(1200);
        assert_eq!(
            Peers::at("a", &heard, Duration::from_secs(1), now),
            peers(&["a", "c"], &["b"])
        );
    }
}
