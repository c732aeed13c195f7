//! Address pools: what a usable pool is, and which `LoadBalancerPool` objects make one, with
//! a verdict per pool. Shared by the local provider (which allocates from them) and the
//! forwarder (which announces only addresses inside them).
//! A malformed pool, or one overlapping an older pool, is not used (the older one keeps
//! working) and gets a condition saying why; it never stops the operator.
//!
//! Each pool serves the classes it names (`spec.loadBalancerClasses`, default
//! `ferry.dev/local`). Overlap is judged across every pool, whichever class it serves, so two
//! instances can never both hand out one address; an instance then keeps only its own pools
//! and leaves the others (and their status) alone.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferry_crds::{IpMode, LoadBalancerPool};
use kube::ResourceExt;
use kube::core::Selector;

use crate::ranges::{AddressRange, RangeError};

/// A usable pool, already validated.
#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<AddressRange>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    pub service_selector: Option<Selector>,
    pub namespace_selector: Option<Selector>,
    pub ip_mode: IpMode,
}

impl Pool {
    pub fn new(name: &str, ranges: &[&str]) -> Result<Self, RangeError> {
        Ok(Self {
            name: name.to_string(),
            ranges: ranges.iter().map(|r| r.parse()).collect::<Result<_, _>>()?,
            auto_assign: true,
            avoid_buggy_ips: false,
            service_selector: None,
            namespace_selector: None,
            ip_mode: IpMode::Proxy,
        })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Assignable addresses (saturating for huge IPv6 ranges).
    pub fn total(&self) -> u128 {
        self.ranges.iter().fold(0u128, |acc, r| {
            let buggy = if self.avoid_buggy_ips {
                r.buggy_count()
            } else {
                0
            };
            acc.saturating_add(r.len() - buggy)
        })
    }
}

/// Whether a pool is usable, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    fn ready() -> Self {
        Self {
            ready: true,
            reason: "Valid",
            message: "all address ranges are valid".to_string(),
        }
    }

    fn not_ready(reason: &'static str, message: String) -> Self {
        Self {
            ready: false,
            reason,
            message,
        }
    }
}

/// The result of validating every pool at once.
#[derive(Debug, Default)]
pub struct PoolSet {
    pub valid: Vec<Pool>,
    /// Pools that exist but are not used, with the ranges that did parse.
    pub unready: Vec<(String, Vec<AddressRange>)>,
    pub verdicts: BTreeMap<String, Verdict>,
    /// Pools of other classes (after `validate_for`), with their ranges: never allocated
    /// from, only named when a Service asks for one of their addresses.
    pub foreign: Vec<(String, Vec<AddressRange>)>,
}

/// Whether `pool` serves `class`.
pub fn serves(pool: &LoadBalancerPool, class: &str) -> bool {
    if pool.spec.load_balancer_classes.is_empty() {
        return class == crate::class::DEFAULT_LOCAL_CLASS;
    }
    pool.spec.load_balancer_classes.iter().any(|c| c == class)
}

/// `validate`, then only the pools that serve `class`.
pub fn validate_for(pools: &[LoadBalancerPool], class: &str) -> PoolSet {
    let mut set = validate(pools);
    let ours: std::collections::BTreeSet<String> = pools
        .iter()
        .filter(|p| serves(p, class))
        .map(|p| p.name_any())
        .collect();
    let (valid, foreign_valid): (Vec<Pool>, Vec<Pool>) =
        set.valid.into_iter().partition(|p| ours.contains(&p.name));
    set.valid = valid;
    set.foreign = foreign_valid
        .into_iter()
        .map(|p| (p.name, p.ranges))
        .collect();
    let (unready, foreign_unready): (Vec<_>, Vec<_>) = set
        .unready
        .into_iter()
        .partition(|(name, _)| ours.contains(name));
    set.unready = unready;
    set.foreign.extend(foreign_unready);
    set.verdicts.retain(|name, _| ours.contains(name));
    set
}

fn selector(
    which: &str,
    s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Result<Option<Selector>, String> {
    match s {
        None => Ok(None),
        Some(s) => Selector::try_from(s.clone())
            .map(Some)
            .map_err(|e| format!("{which}: {e}")),
    }
}

/// Validates pools in age order (oldest first, then by name), so a new pool that overlaps
/// an existing one is the one refused.
pub fn validate(pools: &[LoadBalancerPool]) -> PoolSet {
    let mut ordered: Vec<&LoadBalancerPool> = pools.iter().collect();
    ordered.sort_by(|a, b| {
        a.creation_timestamp()
            .map(|t| t.0)
            .cmp(&b.creation_timestamp().map(|t| t.0))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let mut set = PoolSet::default();
    for obj in ordered {
        let name = obj.name_any();
        let mut parsed = Vec::new();
        let mut errors = Vec::new();
        for text in &obj.spec.addresses {
            match text.parse::<AddressRange>() {
                Ok(r) => parsed.push(r),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let verdict = if !errors.is_empty() {
            Verdict::not_ready("MalformedAddresses", errors.join("; "))
        } else if parsed.is_empty() {
            Verdict::not_ready("NoAddresses", "spec.addresses is empty".to_string())
        } else if let Some((a, b)) = first_overlap(&parsed, &parsed) {
            Verdict::not_ready(
                "OverlappingAddresses",
                format!("ranges {a} and {b} of this pool overlap"),
            )
        } else if let Some((pool, a, b)) = set.valid.iter().find_map(|p: &Pool| {
            first_overlap(&parsed, &p.ranges).map(|(a, b)| (p.name.clone(), a, b))
        }) {
            Verdict::not_ready(
                "OverlappingPool",
                format!("range {a} overlaps {b} of the older pool {pool:?}"),
            )
        } else {
            match (
                selector("serviceSelector", &obj.spec.service_selector),
                selector("namespaceSelector", &obj.spec.namespace_selector),
            ) {
                (Ok(service_selector), Ok(namespace_selector)) => {
                    set.valid.push(Pool {
                        name: name.clone(),
                        ranges: parsed.clone(),
                        auto_assign: obj.spec.auto_assign,
                        avoid_buggy_ips: obj.spec.avoid_buggy_ips,
                        service_selector,
                        namespace_selector,
                        ip_mode: obj.spec.ip_mode.unwrap_or(IpMode::Proxy),
                    });
                    Verdict::ready()
                }
                (Err(e), _) | (_, Err(e)) => Verdict::not_ready("InvalidSelector", e),
            }
        };
        if !verdict.ready {
            set.unready.push((name.clone(), parsed));
        }
        set.verdicts.insert(name, verdict);
    }
    set
}

/// The first pair of overlapping ranges between `a` and `b`; with `a == b`, distinct
/// positions only.
fn first_overlap(a: &[AddressRange], b: &[AddressRange]) -> Option<(AddressRange, AddressRange)> {
    let same = std::ptr::eq(a, b);
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            if (!same || i < j) && x.overlaps(y) {
                return Some((*x, *y));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::LoadBalancerPoolSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement, Time,
    };

    fn pool(name: &str, age_secs: i64, addresses: &[&str]) -> LoadBalancerPool {
        let mut p = LoadBalancerPool::new(name, LoadBalancerPoolSpec::with_addresses(addresses));
        p.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + age_secs).unwrap(),
        ));
        p
    }

    #[test]
    fn the_younger_of_two_overlapping_pools_is_refused() {
        let set = validate(&[
            pool("new", 10, &["192.0.2.128/25"]),
            pool("old", 0, &["192.0.2.0/24"]),
        ]);
        assert_eq!(set.valid.len(), 1);
        assert_eq!(set.valid[0].name, "old");
        let v = &set.verdicts["new"];
        assert!(!v.ready);
        assert_eq!(v.reason, "OverlappingPool");
        assert!(v.message.contains("\"old\""), "{}", v.message);
        assert!(set.verdicts["old"].ready);
    }

    #[test]
    fn malformed_pools_get_a_reason_and_are_not_used() {
        let set = validate(&[
            pool("typo", 0, &["192.0.2.0/24", "10.0.0.300/32"]),
            pool("empty", 1, &[]),
            pool("self", 2, &["10.1.0.0/24", "10.1.0.5-10.1.0.9"]),
            pool("good", 3, &["198.51.100.0/24"]),
        ]);
        assert_eq!(set.verdicts["typo"].reason, "MalformedAddresses");
        assert!(set.verdicts["typo"].message.contains("10.0.0.300/32"));
        assert_eq!(set.verdicts["empty"].reason, "NoAddresses");
        assert_eq!(set.verdicts["self"].reason, "OverlappingAddresses");
        assert_eq!(
            set.valid
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            vec!["good"]
        );
        // The malformed pool's good range is remembered so its holders keep their addresses.
        assert!(set.unready.iter().any(|(n, r)| n == "typo" && r.len() == 1));
    }

    #[test]
    fn an_instance_keeps_only_the_pools_of_its_class_and_overlap_spans_every_class() {
        let mut lan = pool("lan", 0, &["192.0.2.0/25"]);
        lan.spec.load_balancer_classes = vec!["example.com/lan".into()];
        let default = pool("default", 1, &["198.51.100.0/24"]);
        // Younger, of the default class, and overlapping the other class's pool.
        let sneaky = pool("sneaky", 2, &["192.0.2.64/26"]);

        let local = validate_for(
            &[lan.clone(), default.clone(), sneaky.clone()],
            "ferry.dev/local",
        );
        let names: Vec<_> = local.valid.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default"], "no class named: the default class only");
        assert_eq!(local.verdicts["sneaky"].reason, "OverlappingPool");
        assert!(
            !local.verdicts.contains_key("lan"),
            "another class's pool is left alone"
        );
        assert!(local.foreign.iter().any(|(n, _)| n == "lan"));

        let other = validate_for(&[lan, default, sneaky], "example.com/lan");
        let names: Vec<_> = other.valid.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["lan"]);
        assert_eq!(other.verdicts.keys().collect::<Vec<_>>(), ["lan"]);
    }

    #[test]
    fn a_bad_selector_is_a_condition() {
        let mut p = pool("sel", 0, &["192.0.2.0/24"]);
        p.spec.service_selector = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Sometimes".into(),
                values: None,
            }]),
            match_labels: None,
        });
        let set = validate(&[p]);
        assert_eq!(set.verdicts["sel"].reason, "InvalidSelector");
        assert!(set.valid.is_empty());
    }
}
