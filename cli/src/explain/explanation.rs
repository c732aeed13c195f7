//! The pure part of `ferry explain`: from the objects fetched from the API (and the wall
//! clock's reading) to an `Explanation`, with the forwarder's own reasoning about who
//! announces each VIP (`ferry_model::announce`, used exactly as the forwarder's planner uses
//! it). No I/O here; `observe` fetches and `render` prints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ferry_crds::LoadBalancerPool;
use ferry_model::announce::{self, Candidacy, Standing};
use ferry_model::class::{ClassFilter, DEFAULT_LOCAL_CLASS, FINALIZER, provisioned_by};
use ferry_model::desired::{
    IPS_ANNOTATION, METALLB_IPS_ANNOTATION, METALLB_LEGACY_IPS_ANNOTATION, desired, id_of,
};
use ferry_model::eligibility::{eligible_targets, ineligibility};
use ferry_model::ingress::status_ingress;
use ferry_model::pools;
use ferry_model::{DesiredLoadBalancer, TrafficPolicy};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use serde::Serialize;

/// Annotation on a heartbeat Lease listing the VIPs its node cannot serve (written by the
/// forwarder's heartbeat).
pub const REFUSED_ANNOTATION: &str = "ferry.dev/refused-vips";
/// Prefix of every forwarder heartbeat Lease's name; the rest is the node's name.
pub const LEASE_PREFIX: &str = "ferry-forwarder-";
/// Conditions with this type prefix are ferry's.
const CONDITION_PREFIX: &str = "ferry.dev/";

/// Everything `explain` reads, already fetched.
pub struct Observed {
    pub service: Service,
    /// Every Service in the cluster (to find the others sharing a VIP).
    pub services: Vec<Service>,
    pub pools: Vec<LoadBalancerPool>,
    pub nodes: Vec<Node>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// The heartbeat Leases in the forwarders' namespace.
    pub leases: Vec<Lease>,
    /// The Service's events, any order.
    pub events: Vec<EventLine>,
    /// This machine's wall clock.
    pub now: jiff::Timestamp,
}

/// A user's view of one LoadBalancer Service. Serialized as `ferry explain -o json`; field
/// names are part of the CLI's interface.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `namespace/name`.
    pub service: String,
    pub ownership: Ownership,
    pub allocation: Allocation,
    pub traffic_policy: String,
    pub ports: Vec<PortLine>,
    /// Every node, in name order, with its eligibility and forwarder.
    pub nodes: Vec<NodeLine>,
    /// Per published address: the pool and, for local pools, who announces it.
    pub vips: Vec<VipLine>,
    /// Conditions whose type starts with `ferry.dev/`.
    pub conditions: Vec<ConditionLine>,
    /// The last few events, newest last.
    pub events: Vec<EventLine>,
    /// What stands in the way, in a few words each; empty when nothing does.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ownership {
    /// `spec.loadBalancerClass`; `None` means the cluster's default implementation.
    pub load_balancer_class: Option<String>,
    /// The `ferry.dev/provisioned-by` annotation: the class of the instance that provisioned.
    pub provisioned_by: Option<String>,
    /// Whether ferry's finalizer is on the Service.
    pub finalizer: bool,
    /// Whether a ferry instance serves this class (it names `ferry.dev/…`, or a pool names it,
    /// or the Service names no class and ferry is the default implementation).
    pub ferrys: bool,
    /// In words.
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// Addresses asked for, each with where it was asked (`spec.loadBalancerIP` or the
    /// annotation's key).
    pub requested: Vec<Requested>,
    /// A pool asked for by annotation.
    pub requested_pool: Option<String>,
    pub sharing_key: Option<String>,
    /// `status.loadBalancer.ingress`.
    pub given: Vec<Given>,
    /// The pools that serve this Service's class, with their free addresses.
    pub candidate_pools: Vec<PoolLine>,
    /// Why the Service cannot be served as written, if it cannot.
    pub invalid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Requested {
    pub ip: String,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Given {
    /// The address or hostname.
    pub address: String,
    pub ip_mode: Option<String>,
    /// The `LoadBalancerPool` that contains it, if any.
    pub pool: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolLine {
    pub name: String,
    pub addresses: Vec<String>,
    /// From the pool's status, when the operator has written it.
    pub available: Option<i64>,
    pub total: Option<i64>,
    /// Whether the pool is usable (its ranges are valid and overlap no older pool).
    pub valid: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortLine {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: String,
    pub node_port: Option<i32>,
    /// `status.loadBalancer.ingress[].ports[].error`, with the ingress address.
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeLine {
    pub name: String,
    pub eligible: bool,
    /// Why not, when not.
    pub ineligible: Option<String>,
    pub forwarder: Forwarder,
    /// With `externalTrafficPolicy: Local`: whether it has a ready endpoint of the Service.
    pub ready_endpoints: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Forwarder {
    /// Whether its heartbeat Lease is fresh by this machine's clock.
    pub alive: bool,
    /// Seconds since the Lease was last renewed, by this machine's clock.
    pub renewed_seconds_ago: Option<i64>,
    pub lease_duration_seconds: Option<i32>,
    /// The VIPs it said it cannot serve.
    pub refused: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VipLine {
    pub address: String,
    pub pool: Option<String>,
    /// Who serves it: `ferry forwarder` for local pools, else the cloud provider.
    pub served_by: String,
    /// Eligible nodes in rendezvous order with their standing (local pools only).
    pub standings: Vec<StandingLine>,
    /// The node that announces it, if any.
    pub owner: Option<String>,
    /// The other Services sharing it (`namespace/name`).
    pub shared_with: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StandingLine {
    pub node: String,
    /// `candidate`, or why not.
    pub standing: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionLine {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// RFC 3339, as the API gave it (the last time it was seen).
    pub time: Option<String>,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    /// Occurrences (a series' count).
    pub count: i32,
}

/// How many events `explain` shows.
pub const EVENTS_SHOWN: usize = 6;

/// Whether a ferry instance serves `class` (a `ferry.dev/` class, or one a pool names).
fn is_ferry_class(class: &str, pools: &[LoadBalancerPool]) -> bool {
    class.starts_with("ferry.dev/")
        || pools
            .iter()
            .any(|p| p.spec.load_balancer_classes.iter().any(|c| c == class))
}

fn ownership(svc: &Service, pools: &[LoadBalancerPool]) -> Ownership {
    let class = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.clone());
    let provisioned = provisioned_by(svc).map(str::to_string);
    let finalizer = svc.finalizers().iter().any(|f| f == FINALIZER);
    let ferrys = class.as_deref().is_none_or(|c| is_ferry_class(c, pools));
    let serving = match &class {
        Some(c) if ferrys => format!("class {c} (a ferry instance)"),
        Some(c) => format!("not ferry's (class {c})"),
        None => match &provisioned {
            Some(p) => format!("no class: the cluster's default implementation, ferry ({p})"),
            None => "no class: the cluster's default implementation (ferry if an instance runs with --default-class=true)".to_string(),
        },
    };
    let record = match (&provisioned, finalizer) {
        (Some(p), true) => format!("provisioned by {p}, finalizer held"),
        (Some(p), false) => format!("provisioned by {p}, finalizer missing"),
        (None, true) => "finalizer held, no provisioned-by record".to_string(),
        (None, false) => "not provisioned by ferry".to_string(),
    };
    let mismatch = match (&provisioned, &class) {
        (Some(p), Some(c)) if p != c => {
            format!("; {p} still holds it and must clean up before {c} takes over")
        }
        _ => String::new(),
    };
    Ownership {
        load_balancer_class: class,
        provisioned_by: provisioned,
        finalizer,
        ferrys,
        summary: format!("{serving}; {record}{mismatch}"),
    }
}

/// The class a ferry instance would serve this Service as, for pool matching.
fn effective_class(o: &Ownership) -> String {
    o.load_balancer_class
        .clone()
        .unwrap_or_else(|| DEFAULT_LOCAL_CLASS.to_string())
}

fn requested(svc: &Service) -> Vec<Requested> {
    let mut out = Vec::new();
    if let Some(ip) = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|s| !s.trim().is_empty())
    {
        out.push(Requested {
            ip: ip.trim().to_string(),
            source: "spec.loadBalancerIP".into(),
        });
    }
    for key in [
        IPS_ANNOTATION,
        METALLB_IPS_ANNOTATION,
        METALLB_LEGACY_IPS_ANNOTATION,
    ] {
        if let Some(v) = svc.annotations().get(key) {
            out.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|ip| Requested {
                        ip: ip.to_string(),
                        source: key.to_string(),
                    }),
            );
        }
    }
    out
}

fn given(svc: &Service, set: &pools::PoolSet) -> Vec<Given> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    ingress
        .iter()
        .filter_map(|i| {
            let address = i.ip.clone().or_else(|| i.hostname.clone())?;
            let pool = address
                .parse::<IpAddr>()
                .ok()
                .and_then(|ip| pool_of(&ip, set));
            Some(Given {
                address,
                ip_mode: i.ip_mode.clone(),
                pool,
            })
        })
        .collect()
}

/// The valid pool (of any class) holding `ip`.
fn pool_of(ip: &IpAddr, set: &pools::PoolSet) -> Option<String> {
    set.valid
        .iter()
        .find(|p| p.contains(ip))
        .map(|p| p.name.clone())
}

fn candidate_pools(all: &[LoadBalancerPool], class: &str, set: &pools::PoolSet) -> Vec<PoolLine> {
    let mut out: Vec<PoolLine> = all
        .iter()
        .filter(|p| pools::serves(p, class))
        .map(|p| PoolLine {
            name: p.name_any(),
            addresses: p.spec.addresses.clone(),
            available: p.status.as_ref().map(|s| s.available),
            total: p.status.as_ref().map(|s| s.total),
            valid: set.valid.iter().any(|v| v.name == p.name_any()),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn ports(svc: &Service) -> Vec<PortLine> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let errors = ingress
                .iter()
                .flat_map(|i| {
                    let at =
                        i.ip.clone()
                            .or_else(|| i.hostname.clone())
                            .unwrap_or_default();
                    i.ports
                        .iter()
                        .flatten()
                        .filter(|s| s.port == p.port && s.protocol == protocol)
                        .filter_map(move |s| s.error.as_ref().map(|e| format!("{at}: {e}")))
                        .collect::<Vec<_>>()
                })
                .collect();
            PortLine {
                name: p.name.clone(),
                port: p.port,
                protocol,
                node_port: p.node_port,
                errors,
            }
        })
        .collect()
}

/// A heartbeat Lease's node, renew time and duration, and refused VIPs.
struct Heartbeat {
    renewed_seconds_ago: Option<i64>,
    duration: Option<i32>,
    alive: bool,
    refused: BTreeSet<IpAddr>,
}

/// The heartbeats by node. A CLI sees a Lease once, so it can only compare the renew time
/// with its own wall clock (the forwarders time renewals on their monotonic clocks).
fn heartbeats(leases: &[Lease], now: jiff::Timestamp) -> BTreeMap<String, Heartbeat> {
    let mut out = BTreeMap::new();
    for lease in leases {
        let name = lease.name_any();
        let Some(from_name) = name.strip_prefix(LEASE_PREFIX) else {
            continue;
        };
        let spec = lease.spec.as_ref();
        let node = spec
            .and_then(|s| s.holder_identity.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| from_name.to_string());
        let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let duration = spec.and_then(|s| s.lease_duration_seconds);
        let age = renewed.map(|r| now.as_second() - r.as_second());
        let alive = match (renewed, duration) {
            (Some(r), Some(d)) => now.as_millisecond() < r.as_millisecond() + i64::from(d) * 1000,
            _ => false,
        };
        let refused = lease
            .annotations()
            .get(REFUSED_ANNOTATION)
            .map(|v| {
                v.split(',')
                    .filter_map(|ip| ip.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            node,
            Heartbeat {
                renewed_seconds_ago: age,
                duration,
                alive,
                refused,
            },
        );
    }
    out
}

fn conditions(svc: &Service) -> Vec<ConditionLine> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_.starts_with(CONDITION_PREFIX))
        .map(|c| ConditionLine {
            type_: c.type_,
            status: c.status,
            reason: c.reason,
            message: c.message,
        })
        .collect()
}

fn traffic_policy_of(d: Option<&DesiredLoadBalancer>, svc: &Service) -> String {
    match d.map(|d| d.traffic_policy) {
        Some(TrafficPolicy::Local { .. }) => "Local".into(),
        Some(TrafficPolicy::Cluster) => "Cluster".into(),
        None => svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.clone())
            .unwrap_or_else(|| "Cluster".into()),
    }
}

/// Turns what was fetched into the explanation.
pub fn explain(o: &Observed) -> Explanation {
    let svc = &o.service;
    let id = id_of(svc);
    let ownership = ownership(svc, &o.pools);
    let class = effective_class(&ownership);
    let filter = ClassFilter {
        class: class.clone(),
        default_class: true,
    };
    let set = pools::validate(&o.pools);
    // The forwarder's targets: eligible nodes with an InternalIP.
    let targets = eligible_targets(o.nodes.iter(), |t| !t.internal_ips.is_empty());
    let wanted = desired(svc, &targets);
    let d = wanted.as_ref().ok();
    let mut problems = Vec::new();
    if !ownership.ferrys {
        problems.push(ownership.summary.clone());
    }
    if let Err(e) = &wanted {
        problems.push(format!("not served as written: {e}"));
    }

    let beats = heartbeats(&o.leases, o.now);
    let local = matches!(
        d.map(|d| d.traffic_policy),
        Some(TrafficPolicy::Local { .. })
    );
    let with_endpoints = announce::nodes_with_ready_endpoints(&o.slices, &id.namespace, &id.name);
    let mut node_lines: Vec<NodeLine> = o
        .nodes
        .iter()
        .map(|n| {
            let name = n.name_any();
            let why = ineligibility(n);
            let beat = beats.get(&name);
            NodeLine {
                eligible: why.is_none(),
                ineligible: why.map(|w| w.describe().to_string()),
                forwarder: Forwarder {
                    alive: beat.is_some_and(|b| b.alive),
                    renewed_seconds_ago: beat.and_then(|b| b.renewed_seconds_ago),
                    lease_duration_seconds: beat.and_then(|b| b.duration),
                    refused: beat
                        .map(|b| b.refused.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                },
                ready_endpoints: local.then(|| with_endpoints.contains(&name)),
                name,
            }
        })
        .collect();
    node_lines.sort_by(|a, b| a.name.cmp(&b.name));

    let live: BTreeSet<String> = beats
        .iter()
        .filter(|(_, b)| b.alive)
        .map(|(n, _)| n.clone())
        .collect();
    let refused: BTreeMap<String, BTreeSet<IpAddr>> = beats
        .iter()
        .filter(|(_, b)| !b.refused.is_empty())
        .map(|(n, b)| (n.clone(), b.refused.clone()))
        .collect();
    // Only the pools of this Service's class are the forwarder's to announce.
    let local_pools = pools::validate_for(&o.pools, &class).valid;

    let given = given(svc, &set);
    let mut vips = Vec::new();
    for (vip, _) in status_ingress(svc) {
        let pool = pool_of(&vip, &set);
        let in_local = local_pools.iter().any(|p| p.contains(&vip));
        // The Services on this VIP as the forwarder sees them: same class, not deleting.
        let claimants: Vec<&Service> = o
            .services
            .iter()
            .filter(|s| filter.owns(s) && s.metadata.deletion_timestamp.is_none())
            .filter(|s| status_ingress(s).iter().any(|(ip, _)| *ip == vip))
            .collect();
        let shared_with: Vec<String> = claimants
            .iter()
            .map(|s| id_of(s).to_string())
            .filter(|s| *s != id.to_string())
            .collect();
        if !in_local || !ownership.ferrys {
            vips.push(VipLine {
                address: vip.to_string(),
                served_by: if pool.is_some() {
                    "another ferry instance's pool".into()
                } else {
                    "the cloud provider (no LoadBalancerPool holds it)".into()
                },
                pool,
                standings: Vec::new(),
                owner: None,
                shared_with,
            });
            continue;
        }
        // As the forwarder's planner: with `Local`, the nodes with ready endpoints of every
        // `Local` Service on the VIP.
        let local_endpoints = claimants
            .iter()
            .filter_map(|s| desired(s, &targets).ok())
            .filter(|d| matches!(d.traffic_policy, TrafficPolicy::Local { .. }))
            .map(|d| announce::nodes_with_ready_endpoints(&o.slices, &d.id.namespace, &d.id.name))
            .reduce(|a, b| a.intersection(&b).cloned().collect());
        let standings = announce::standings(
            &vip,
            &targets,
            &Candidacy {
                live: &live,
                refused: &refused,
                local_endpoints: local_endpoints.as_ref(),
            },
        );
        let owner = announce::owner_of(&standings).map(str::to_string);
        if owner.is_none() {
            let why = if targets.is_empty() {
                "no eligible node".to_string()
            } else if standings
                .iter()
                .all(|s| s.standing == Standing::NoLiveForwarder)
            {
                "no live forwarder".to_string()
            } else if local_endpoints.is_some() {
                "no live forwarder on a node with ready endpoints".to_string()
            } else {
                "no live forwarder that can serve it".to_string()
            };
            problems.push(format!("no node announces {vip}: {why}"));
        }
        vips.push(VipLine {
            address: vip.to_string(),
            pool,
            served_by: "ferry forwarder".into(),
            standings: standings
                .iter()
                .map(|s| StandingLine {
                    node: s.node.clone(),
                    standing: s.standing.describe().to_string(),
                })
                .collect(),
            owner,
            shared_with,
        });
    }

    let candidate_pools = candidate_pools(&o.pools, &class, &set);
    if ownership.ferrys && given.is_empty() {
        let why = if candidate_pools.is_empty() {
            format!("no address: no LoadBalancerPool serves class {class}")
        } else if candidate_pools
            .iter()
            .all(|p| !p.valid || p.available == Some(0))
        {
            format!("no address: every LoadBalancerPool of class {class} is full or invalid")
        } else {
            "no address yet (see the conditions and events)".to_string()
        };
        problems.push(why);
    }
    let conditions = conditions(svc);
    for c in &conditions {
        if c.status != "True" {
            problems.push(format!("{} is {}: {}", c.type_, c.status, c.message));
        }
    }
    let ports = ports(svc);
    for p in &ports {
        for e in &p.errors {
            problems.push(format!("port {}/{}: {e}", p.port, p.protocol));
        }
    }
    let mut events = o.events.clone();
    events.sort_by(|a, b| a.time.cmp(&b.time));
    let skip = events.len().saturating_sub(EVENTS_SHOWN);
    let events = events.split_off(skip);

    Explanation {
        service: id.to_string(),
        allocation: Allocation {
            requested: requested(svc),
            requested_pool: d.and_then(|d| d.requested_pool.clone()),
            sharing_key: d.and_then(|d| d.sharing_key.clone()),
            given,
            candidate_pools,
            invalid: wanted.as_ref().err().map(ToString::to_string),
        },
        ownership,
        traffic_policy: traffic_policy_of(d, svc),
        ports,
        nodes: node_lines,
        vips,
        conditions,
        events,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::{LoadBalancerPoolSpec, LoadBalancerPoolStatus};
    use ferry_model::fixtures::{endpoint_slice, node, service};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, PortStatus, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};

    const NOW: i64 = 1_800_000_000;

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(NOW).unwrap()
    }

    fn pool(name: &str, addresses: &[&str], available: Option<i64>) -> LoadBalancerPool {
        let mut p = LoadBalancerPool::new(name, LoadBalancerPoolSpec::with_addresses(addresses));
        p.status = available.map(|available| LoadBalancerPoolStatus {
            total: 2,
            allocated: 2 - available,
            available,
            ..LoadBalancerPoolStatus::default()
        });
        p
    }

    /// A heartbeat of `node` renewed `ago` seconds before now, lasting 15 s.
    fn heartbeat(node: &str, ago: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(format!("{LEASE_PREFIX}{node}")),
                namespace: Some("ferry-system".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(jiff::Timestamp::from_second(NOW - ago).unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    fn observed(svc: Service) -> Observed {
        Observed {
            services: vec![svc.clone()],
            service: svc,
            pools: vec![pool("lan", &["192.0.2.10-192.0.2.11"], Some(1))],
            nodes: vec![
                node("n1").ip("10.0.0.1").build(),
                node("n2").ip("10.0.0.2").build(),
            ],
            slices: vec![],
            leases: vec![heartbeat("n1", 1), heartbeat("n2", 2)],
            events: vec![],
            now: now(),
        }
    }

    fn healthy() -> Service {
        service("web")
            .lb()
            .port(80, 30080)
            .finalized()
            .ingress("192.0.2.10", "Proxy")
            .build()
    }

    #[test]
    fn a_healthy_service_names_its_pool_and_the_forwarders_owner() {
        let e = explain(&observed(healthy()));
        assert_eq!(e.problems, Vec::<String>::new());
        assert!(e.ownership.ferrys);
        assert!(e.ownership.finalizer);
        assert_eq!(e.allocation.given.len(), 1);
        assert_eq!(e.allocation.given[0].pool.as_deref(), Some("lan"));
        let vip = &e.vips[0];
        assert_eq!(vip.served_by, "ferry forwarder");
        // The same owner as the forwarders compute.
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(vip.owner.as_deref(), announce::owner(&ip, ["n1", "n2"]));
        assert_eq!(vip.standings.len(), 2);
        assert_eq!(vip.standings[0].node, vip.owner.clone().unwrap());
        assert!(e.nodes.iter().all(|n| n.eligible && n.forwarder.alive));
        assert_eq!(e.nodes[0].forwarder.renewed_seconds_ago, Some(1));
        assert_eq!(e.ports[0].node_port, Some(30080));
    }

    #[test]
    fn a_stale_heartbeat_is_a_dead_forwarder_and_nobody_announces() {
        let mut o = observed(healthy());
        o.leases = vec![heartbeat("n1", 60), heartbeat("n2", 16)];
        let e = explain(&o);
        assert!(e.nodes.iter().all(|n| !n.forwarder.alive));
        assert_eq!(e.vips[0].owner, None);
        assert!(
            e.vips[0]
                .standings
                .iter()
                .all(|s| s.standing == "no live forwarder")
        );
        assert!(
            e.problems
                .iter()
                .any(|p| p == "no node announces 192.0.2.10: no live forwarder"),
            "{:?}",
            e.problems
        );
        // One live forwarder is enough, and it is the owner.
        o.leases = vec![heartbeat("n1", 60), heartbeat("n2", 3)];
        assert_eq!(explain(&o).vips[0].owner.as_deref(), Some("n2"));
    }

    #[test]
    fn local_policy_needs_a_node_with_ready_endpoints() {
        let svc = service("web")
            .lb()
            .port(80, 30080)
            .local(30500)
            .ingress("192.0.2.10", "Proxy")
            .build();
        let mut o = observed(svc);
        let e = explain(&o);
        assert_eq!(e.traffic_policy, "Local");
        assert_eq!(e.vips[0].owner, None);
        assert!(e.nodes.iter().all(|n| n.ready_endpoints == Some(false)));
        assert!(e.problems.iter().any(|p| p.contains("ready endpoints")));
        o.slices = vec![Arc::new(endpoint_slice(
            "web",
            &[("10.1.0.5", "n1", true), ("10.1.0.6", "n2", false)],
        ))];
        let e = explain(&o);
        assert_eq!(e.vips[0].owner.as_deref(), Some("n1"));
        assert_eq!(e.problems, Vec::<String>::new());
    }

    #[test]
    fn the_json_structure_is_the_documented_one() {
        let v = serde_json::to_value(explain(&observed(healthy()))).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "allocation",
                "conditions",
                "events",
                "nodes",
                "ownership",
                "ports",
                "problems",
                "service",
                "trafficPolicy",
                "vips"
            ]
        );
        assert_eq!(v["vips"][0]["servedBy"], "ferry forwarder");
        assert_eq!(v["nodes"][0]["forwarder"]["leaseDurationSeconds"], 15);
        assert_eq!(v["allocation"]["given"][0]["ipMode"], "Proxy");
    }

    #[test]
    fn another_class_is_not_ferrys() {
        let svc = service("web")
            .lb()
            .class("example.com/lb")
            .port(80, 0)
            .build();
        let e = explain(&observed(svc));
        assert!(!e.ownership.ferrys);
        assert!(
            e.ownership
                .summary
                .contains("not ferry's (class example.com/lb)"),
            "{}",
            e.ownership.summary
        );
        assert_eq!(e.problems.len(), 1, "{:?}", e.problems);
    }

    #[test]
    fn no_pool_and_a_full_pool_say_why_there_is_no_address() {
        let svc = service("web").lb().port(80, 30080).build();
        let mut o = observed(svc);
        o.pools.clear();
        let e = explain(&o);
        assert!(
            e.problems
                .contains(&"no address: no LoadBalancerPool serves class ferry.dev/local".into()),
            "{:?}",
            e.problems
        );
        o.pools = vec![pool("lan", &["192.0.2.10-192.0.2.11"], Some(0))];
        let e = explain(&o);
        assert!(
            e.problems.iter().any(|p| p.contains("full")),
            "{:?}",
            e.problems
        );
        assert_eq!(e.allocation.candidate_pools[0].available, Some(0));
    }

    #[test]
    fn an_address_outside_every_pool_is_the_clouds() {
        let svc = service("web")
            .lb()
            .class("ferry.dev/aws")
            .port(80, 30080)
            .ingress("198.51.100.7", "Proxy")
            .build();
        let e = explain(&observed(svc));
        assert!(e.vips[0].served_by.contains("cloud provider"));
        assert!(e.vips[0].standings.is_empty());
    }

    #[test]
    fn ineligible_nodes_refusals_port_errors_conditions_and_events_are_shown() {
        let mut svc = healthy();
        svc.status = Some(ServiceStatus {
            load_balancer: Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("192.0.2.10".into()),
                    ip_mode: Some("Proxy".into()),
                    ports: Some(vec![PortStatus {
                        port: 80,
                        protocol: "TCP".into(),
                        error: Some("ListenFailed".into()),
                    }]),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            conditions: Some(vec![
                Condition {
                    type_: "ferry.dev/Announced".into(),
                    status: "False".into(),
                    reason: "NoLiveForwarder".into(),
                    message: "nobody".into(),
                    last_transition_time: Time(now()),
                    observed_generation: None,
                },
                Condition {
                    type_: "example.com/Other".into(),
                    status: "False".into(),
                    reason: "X".into(),
                    message: "x".into(),
                    last_transition_time: Time(now()),
                    observed_generation: None,
                },
            ]),
        });
        let mut o = observed(svc);
        o.nodes.push(node("n3").build());
        let mut refusing = heartbeat("n1", 1);
        refusing.metadata.annotations = Some(BTreeMap::from([(
            REFUSED_ANNOTATION.to_string(),
            "192.0.2.10".to_string(),
        )]));
        o.leases = vec![refusing, heartbeat("n2", 1)];
        o.events = (0..8)
            .map(|i| EventLine {
                time: Some(format!("2027-01-01T00:00:0{i}Z")),
                type_: "Normal".into(),
                reason: format!("R{i}"),
                message: "m".into(),
                count: 1,
            })
            .rev()
            .collect();
        let e = explain(&o);
        let n3 = e.nodes.iter().find(|n| n.name == "n3").unwrap();
        assert_eq!(n3.ineligible.as_deref(), Some("no InternalIP address"));
        assert_eq!(e.vips[0].owner.as_deref(), Some("n2"));
        assert_eq!(e.ports[0].errors, vec!["192.0.2.10: ListenFailed"]);
        assert_eq!(e.conditions.len(), 1);
        assert_eq!(e.events.len(), EVENTS_SHOWN);
        assert_eq!(e.events.last().unwrap().reason, "R7");
        assert!(e.problems.iter().any(|p| p.contains("ListenFailed")));
        assert!(
            e.problems
                .iter()
                .any(|p| p.contains("ferry.dev/Announced is False"))
        );
        let text = super::super::render::render(&e);
        assert!(text.contains("ineligible: no InternalIP address"), "{text}");
        assert!(text.contains("refuses 192.0.2.10"), "{text}");
    }
}
