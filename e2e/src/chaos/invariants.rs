//! What must hold once a chaos run has settled, as pure checks over a snapshot of the
//! cluster (and of the cloud), so they carry their own unit tests:
//!
//! - no address is shown by two Services that may not share it (at any moment: the watcher
//!   applies `shared_wrongly` to every update);
//! - every requested address is honoured, or refused with a condition while another Service
//!   holds it;
//! - every live Service of a served class is converged (ingress and condition True) by the
//!   instance of its class, with that instance's record and finalizer;
//! - every deleted Service is gone (its finalizer released) and nothing is left in the cloud
//!   for it; pools count exactly what live Services show;
//! - nothing of a class no instance serves is touched, and another cluster's balancer
//!   survives.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

pub const FINALIZER: &str = "ferry.dev/load-balancer";
pub const RECORD: &str = "ferry.dev/provisioned-by";
pub const READY: &str = "ferry.dev/LoadBalancerReady";
pub const SHARING: &str = "ferry.dev/allow-shared-ip";

/// What a Service shows, as far as address sharing goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shown {
    pub ips: BTreeSet<String>,
    /// Being deleted (its finalizer still held): for the record in a violation.
    pub deleting: bool,
    pub key: Option<String>,
    pub ports: BTreeSet<(String, i32)>,
}

impl Shown {
    pub fn of(svc: &Service) -> Self {
        Self {
            ips: ips(svc),
            deleting: svc.metadata.deletion_timestamp.is_some(),
            key: svc.annotations().get(SHARING).cloned(),
            ports: svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|p| {
                    p.iter()
                        .map(|p| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn may_share_with(&self, other: &Shown) -> bool {
        self.key.is_some() && self.key == other.key && self.ports.is_disjoint(&other.ports)
    }
}

/// The addresses a Service publishes.
pub fn ips(svc: &Service) -> BTreeSet<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
}

fn hostname(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.hostname.clone())
}

/// ferry's condition: (status, reason).
pub fn condition(svc: &Service) -> Option<(String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Pairs of Services in `all` (name → what it shows) that show one address without being
/// allowed to share it.
pub fn shared_wrongly(all: &BTreeMap<String, Shown>) -> Vec<String> {
    let mut out = Vec::new();
    let list: Vec<_> = all.iter().collect();
    for (i, (a, sa)) in list.iter().enumerate() {
        for (b, sb) in list.iter().skip(i + 1) {
            if let Some(ip) = sa.ips.intersection(&sb.ips).next()
                && !sa.may_share_with(sb)
            {
                let state = |s: &Shown| if s.deleting { " (being deleted)" } else { "" };
                out.push(format!(
                    "{ip} shown by both {a}{} and {b}{}",
                    state(sa),
                    state(sb)
                ));
            }
        }
    }
    out
}

/// Which instance should serve a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The instance under test: its class and whether it publishes hostnames (a cloud).
    Tested { hostnames: bool },
    /// The neighbour instance.
    Neighbour,
    /// No ferry instance: untouched.
    Untouched,
}

/// What the harness asked of one Service.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub name: String,
    pub alive: bool,
    pub expect: Expect,
    pub requested: Option<String>,
}

/// A settled cluster as the harness reads it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Services of the run's namespace.
    pub services: Vec<Service>,
    /// Pool name → (its prefix as text, `status.allocated`).
    pub pools: BTreeMap<String, (String, Option<i64>)>,
    /// Cloud runs: UIDs that still have a ferry balancer, target group or security group of
    /// this cluster (both marks).
    pub cloud_owners: Option<BTreeSet<String>>,
    /// Cloud runs: whether another cluster's balancer (same id, other identity) survives.
    pub foreign_survives: Option<bool>,
}

/// Every invariant `snapshot` breaks, given what was asked (`wanted`) and the classes of
/// the two instances.
pub fn check(snapshot: &Snapshot, wanted: &[Wanted], tested: &str, neighbour: &str) -> Vec<String> {
    let mut out = Vec::new();
    let by_name: BTreeMap<String, &Service> = snapshot
        .services
        .iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let shown: BTreeMap<String, Shown> = snapshot
        .services
        .iter()
        .map(|s| (s.name_any(), Shown::of(s)))
        .collect();
    out.extend(shared_wrongly(&shown));
    for w in wanted {
        let Some(svc) = by_name.get(&w.name) else {
            if w.alive {
                out.push(format!("{} vanished", w.name));
            }
            continue;
        };
        if !w.alive {
            out.push(format!(
                "{} was deleted but is still there (finalizers {:?})",
                w.name,
                svc.finalizers()
            ));
            continue;
        }
        let record = svc.annotations().get(RECORD).cloned();
        let finalized = svc.finalizers().iter().any(|f| f == FINALIZER);
        let cond = condition(svc);
        let ready = cond.as_ref().is_some_and(|c| c.0 == "True");
        match w.expect {
            Expect::Untouched => {
                if finalized || record.is_some() || !ips(svc).is_empty() || cond.is_some() {
                    out.push(format!(
                        "{} is of a class nobody serves but was touched (finalizer {finalized}, record {record:?}, ingress {:?}, condition {cond:?})",
                        w.name,
                        ips(svc)
                    ));
                }
            }
            Expect::Tested { .. } | Expect::Neighbour => {
                let class = if w.expect == Expect::Neighbour {
                    neighbour
                } else {
                    tested
                };
                if !finalized || record.as_deref() != Some(class) {
                    out.push(format!(
                        "{}: finalizer {finalized} and record {record:?}, expected {class:?}",
                        w.name
                    ));
                }
                let published = match w.expect {
                    Expect::Tested { hostnames: true } => hostname(svc).is_some(),
                    _ => !ips(svc).is_empty(),
                };
                match &w.requested {
                    Some(ip) => {
                        let held_elsewhere = shown
                            .iter()
                            .any(|(n, s)| *n != w.name && s.ips.contains(ip));
                        let has_it = ips(svc).contains(ip) && ready;
                        let refused =
                            cond.as_ref().is_some_and(|c| c.0 == "False") && ips(svc).is_empty();
                        if !(has_it || (refused && held_elsewhere)) {
                            out.push(format!(
                                "{} asked for {ip}: shows {:?} with condition {cond:?} (held elsewhere: {held_elsewhere})",
                                w.name,
                                ips(svc)
                            ));
                        }
                    }
                    None if !(ready && published) => out.push(format!(
                        "{} not converged: ingress {:?} / {:?}, condition {cond:?}",
                        w.name,
                        ips(svc),
                        hostname(svc)
                    )),
                    None => {}
                }
            }
        }
    }
    // Pools count exactly the distinct addresses live Services show from them.
    for (pool, (prefix, allocated)) in &snapshot.pools {
        let shown_here: BTreeSet<&String> = shown
            .values()
            .flat_map(|s| s.ips.iter())
            .filter(|ip| ip.starts_with(prefix.as_str()))
            .collect();
        let want = i64::try_from(shown_here.len()).unwrap_or(i64::MAX);
        if *allocated != Some(want) {
            out.push(format!(
                "pool {pool} says {allocated:?} allocated; live Services show {want}"
            ));
        }
    }
    if let Some(owners) = &snapshot.cloud_owners {
        let live: BTreeSet<String> = wanted
            .iter()
            .filter(|w| w.alive && matches!(w.expect, Expect::Tested { hostnames: true }))
            .filter_map(|w| by_name.get(&w.name).and_then(|s| s.uid()))
            .collect();
        for uid in owners.difference(&live) {
            out.push(format!(
                "cloud resources left for {uid}, which is not a live Service of the cloud class"
            ));
        }
    }
    if snapshot.foreign_survives == Some(false) {
        out.push("another cluster's balancer (same --cluster-id) was deleted".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};

    fn svc(name: &str, ip: Option<&str>, key: Option<&str>, port: i32) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                annotations: Some(
                    key.map(|k| (SHARING.to_string(), k.to_string()))
                        .into_iter()
                        .chain([(RECORD.to_string(), "ferry.dev/local".to_string())])
                        .collect(),
                ),
                finalizers: Some(vec![FINALIZER.into()]),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(vec![ServicePort {
                    port,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: ip.map(|ip| {
                        vec![LoadBalancerIngress {
                            ip: Some(ip.into()),
                            ..LoadBalancerIngress::default()
                        }]
                    }),
                }),
                conditions: Some(vec![Condition {
                    type_: READY.into(),
                    status: if ip.is_some() { "True" } else { "False" }.into(),
                    reason: if ip.is_some() {
                        "LoadBalancerEnsured"
                    } else {
                        "IPInUse"
                    }
                    .into(),
                    message: String::new(),
                    observed_generation: None,
                    last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
                }]),
            }),
        }
    }

    fn wanted(name: &str, requested: Option<&str>) -> Wanted {
        Wanted {
            name: name.into(),
            alive: true,
            expect: Expect::Tested { hostnames: false },
            requested: requested.map(String::from),
        }
    }

    fn snapshot(services: Vec<Service>) -> Snapshot {
        Snapshot {
            services,
            ..Snapshot::default()
        }
    }

    #[test]
    fn one_address_on_two_services_is_caught_unless_they_may_share() {
        let s = snapshot(vec![
            svc("a", Some("10.0.0.1"), None, 80),
            svc("b", Some("10.0.0.1"), None, 81),
        ]);
        let v = check(
            &s,
            &[wanted("a", None), wanted("b", None)],
            "ferry.dev/local",
            "x",
        );
        assert_eq!(v.len(), 1, "{v:?}");
        let s = snapshot(vec![
            svc("a", Some("10.0.0.1"), Some("k"), 80),
            svc("b", Some("10.0.0.1"), Some("k"), 81),
        ]);
        assert!(
            check(
                &s,
                &[wanted("a", None), wanted("b", None)],
                "ferry.dev/local",
                "x"
            )
            .is_empty()
        );
        let s = snapshot(vec![
            svc("a", Some("10.0.0.1"), Some("k"), 80),
            svc("b", Some("10.0.0.1"), Some("k"), 80),
        ]);
        assert_eq!(
            check(
                &s,
                &[wanted("a", None), wanted("b", None)],
                "ferry.dev/local",
                "x"
            )
            .len(),
            1
        );
    }

    #[test]
    fn a_refused_request_is_fine_only_while_someone_else_holds_the_address() {
        let held = snapshot(vec![
            svc("holder", Some("10.0.0.5"), None, 80),
            svc("asker", None, None, 81),
        ]);
        let w = [wanted("holder", None), wanted("asker", Some("10.0.0.5"))];
        assert!(check(&held, &w, "ferry.dev/local", "x").is_empty());
        let free = snapshot(vec![svc("asker", None, None, 81)]);
        let v = check(
            &free,
            &[wanted("asker", Some("10.0.0.5"))],
            "ferry.dev/local",
            "x",
        );
        assert_eq!(
            v.len(),
            1,
            "a free requested address must be honoured: {v:?}"
        );
    }

    #[test]
    fn leftovers_and_pool_counts_are_caught() {
        let mut s = snapshot(vec![svc("a", Some("10.0.0.1"), None, 80)]);
        s.pools.insert("p".into(), ("10.0.0.".into(), Some(2)));
        let mut gone = wanted("b", None);
        gone.alive = false;
        s.services.push(svc("b", None, None, 80));
        let v = check(&s, &[wanted("a", None), gone], "ferry.dev/local", "x");
        assert!(v.iter().any(|v| v.contains("still there")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("pool p")), "{v:?}");
    }
}
