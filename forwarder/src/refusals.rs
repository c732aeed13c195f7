//! The VIPs this node cannot serve: their forwarding could not be set up here (a host
//! process holds a port the listener needs, nftables refused the rules). The node is no
//! candidate for them while they stay here, and says so to its peers (in its direct
//! heartbeats and its Lease), so another node takes them over instead of this one holding a
//! VIP it black-holes. A refusal is lifted once the forwarding could be set up: a listener
//! that could not bind is probed every few seconds without taking the VIP (`Dataplane::probe`);
//! rules nftables refused are tried again after a growing delay.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::dataplane::{Failure, FailureKind};
use crate::membership::Refused;
use crate::plan::Frontend;

/// How often a listener that could not bind is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// The delay before rules nftables refused are tried again, the `attempts`-th time.
pub fn kernel_retry_delay(attempts: u32) -> Duration {
    (Duration::from_secs(10) * (1u32 << attempts.saturating_sub(1).min(5)))
        .min(Duration::from_secs(300))
}

#[derive(Clone, Debug)]
pub struct Refusal {
    /// The frontends of the VIP that could not be set up, to probe.
    pub frontends: Vec<Frontend>,
    pub error: String,
    pub kind: FailureKind,
    pub attempts: u32,
    pub retry_at: Instant,
}

#[derive(Debug, Default)]
pub struct Refusals {
    by_vip: BTreeMap<IpAddr, Refusal>,
    /// Failures of rules nftables refused, per VIP, kept while it is tried again.
    kernel_attempts: BTreeMap<IpAddr, u32>,
    /// What the peers are told.
    shared: Refused,
}

impl Refusals {
    pub fn new(shared: Refused) -> Self {
        Self {
            shared,
            ..Self::default()
        }
    }

    /// Takes in the failures of an apply; returns those that are news (a VIP not refused
    /// before), for Events.
    pub fn record(&mut self, failures: &[Failure], now: Instant) -> Vec<Failure> {
        let mut news = Vec::new();
        for f in failures {
            let vip = f.frontend.vip;
            if let Some(r) = self.by_vip.get_mut(&vip) {
                r.frontends.push(f.frontend.clone());
                continue;
            }
            let attempts = match f.kind {
                FailureKind::Kernel => {
                    let n = self.kernel_attempts.entry(vip).or_insert(0);
                    *n += 1;
                    *n
                }
                FailureKind::Bind => 1,
            };
            let delay = match f.kind {
                FailureKind::Bind => PROBE_EVERY,
                FailureKind::Kernel => kernel_retry_delay(attempts),
            };
            self.by_vip.insert(
                vip,
                Refusal {
                    frontends: vec![f.frontend.clone()],
                    error: f.error.clone(),
                    kind: f.kind,
                    attempts,
                    retry_at: now + delay,
                },
            );
            news.push(f.clone());
        }
        self.publish();
        news
    }

    /// The VIPs applied without failure: a rule refused before is forgiven.
    pub fn succeeded(&mut self, vips: impl IntoIterator<Item = IpAddr>) {
        for vip in vips {
            if !self.by_vip.contains_key(&vip) {
                self.kernel_attempts.remove(&vip);
            }
        }
    }

    /// Refusals whose check is due.
    pub fn due(&self, now: Instant) -> Vec<(IpAddr, Refusal)> {
        self.by_vip
            .iter()
            .filter(|(_, r)| r.retry_at <= now)
            .map(|(vip, r)| (*vip, r.clone()))
            .collect()
    }

    /// The VIP can be served again (a probe bound, or its rules are to be tried again).
    pub fn lift(&mut self, vip: &IpAddr) {
        self.by_vip.remove(vip);
        self.publish();
    }

    /// A probe failed: look again later.
    pub fn defer(&mut self, vip: &IpAddr, now: Instant) {
        if let Some(r) = self.by_vip.get_mut(vip) {
            r.attempts += 1;
            r.retry_at = now + PROBE_EVERY;
        }
    }

    pub fn vips(&self) -> BTreeSet<IpAddr> {
        self.by_vip.keys().copied().collect()
    }

    pub fn next_retry(&self) -> Option<Instant> {
        self.by_vip.values().map(|r| r.retry_at).min()
    }

    fn publish(&self) {
        if let Ok(mut shared) = self.shared.lock() {
            *shared = self.vips();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::Protocol;

    fn failure(vip: &str, kind: FailureKind) -> Failure {
        Failure {
            frontend: Frontend::for_test(vip, 80, Protocol::Tcp, &[]),
            error: "address in use".into(),
            kind,
        }
    }

    #[test]
    fn a_refusal_is_news_once_shared_with_peers_and_lifted_when_cleared() {
        let shared = Refused::default();
        let mut r = Refusals::new(shared.clone());
        let t0 = Instant::now();
        let f = failure("192.0.2.1", FailureKind::Bind);
        assert_eq!(r.record(std::slice::from_ref(&f), t0).len(), 1);
        assert!(r.record(&[f], t0).is_empty(), "no news the second time");
        let vip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(*shared.lock().unwrap(), BTreeSet::from([vip]));
        assert!(r.due(t0).is_empty());
        assert_eq!(r.due(t0 + PROBE_EVERY).len(), 1);
        r.defer(&vip, t0 + PROBE_EVERY);
        assert_eq!(r.next_retry(), Some(t0 + PROBE_EVERY * 2));
        r.lift(&vip);
        assert!(shared.lock().unwrap().is_empty());
    }

    #[test]
    fn refused_rules_are_tried_again_later_each_time() {
        let mut r = Refusals::new(Refused::default());
        let t0 = Instant::now();
        let vip: IpAddr = "192.0.2.2".parse().unwrap();
        r.record(&[failure("192.0.2.2", FailureKind::Kernel)], t0);
        assert_eq!(r.next_retry(), Some(t0 + Duration::from_secs(10)));
        r.lift(&vip);
        r.record(&[failure("192.0.2.2", FailureKind::Kernel)], t0);
        assert_eq!(r.next_retry(), Some(t0 + Duration::from_secs(20)));
        r.lift(&vip);
        r.succeeded([vip]);
        r.record(&[failure("192.0.2.2", FailureKind::Kernel)], t0);
        assert_eq!(
            r.next_retry(),
            Some(t0 + Duration::from_secs(10)),
            "forgiven once it applied"
        );
        assert_eq!(kernel_retry_delay(20), Duration::from_secs(300));
    }
}
