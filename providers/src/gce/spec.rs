//! What a Service's GCE balancer should be, from its `DesiredLoadBalancer` and where the
//! cluster lives; the provider compares it with what exists. The mapping follows the
//! upstream GCE cloud provider, with its known defects fixed:
//!
//! - The address is a regional static Address named for the Service and kept for its
//!   life (upstream demotes it to ephemeral, and a recreated balancer gets a new IP). A
//!   requested address (`spec.loadBalancerIP`) must be one reserved in the region; the
//!   provider checks that it is free or already this Service's, and never deletes it.
//! - A target pool balances only IPv4 and only TCP and UDP: an IPv6-only Service, SCTP, or
//!   an internal balancer is refused with a reason rather than half made.
//! - TCP and UDP on one port number are two forwarding rules on the one address. A target
//!   pool's rule takes a port range, not a list, so the range spans the Service's lowest to
//!   highest port; the firewall rule opens exactly the Service's ports, so nothing in
//!   between reaches a node.
//! - Every resource carries ferry's two ownership marks (`ownership`), in its description
//!   (target pools and firewall rules have no labels), so orphan collection can prove what
//!   is this cluster's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::ownership::{marks, resource_hash};
use crate::{
    ClusterIdentity, DesiredLoadBalancer, IpFamily, IpFamilyPolicy, LoadBalancerId, NodeTarget,
    Protocol, ProviderError, SessionAffinity, TrafficPolicy,
};

/// `Premium` (the default) or `Standard`, as on GKE.
pub const NETWORK_TIER_ANNOTATION: &str = "cloud.google.com/network-tier";
/// Annotations that ask for an internal balancer, which a target pool cannot be.
pub const INTERNAL_ANNOTATIONS: [&str; 2] = [
    "networking.gke.io/load-balancer-type",
    "cloud.google.com/load-balancer-type",
];
/// The prefixes of the annotations GKE users have on Services.
pub const GKE_PREFIXES: [&str; 2] = ["cloud.google.com/", "networking.gke.io/"];
/// Annotations under those prefixes that other GKE controllers own (network endpoint
/// groups, backend configs): not the balancer's, so not worth a notice.
const OTHER_CONTROLLERS: [&str; 5] = [
    "cloud.google.com/neg",
    "cloud.google.com/neg-status",
    "cloud.google.com/backend-config",
    "cloud.google.com/app-protocols",
    "cloud.google.com/service-name",
];

/// kube-proxy's health endpoint, which a `Cluster` Service's health check asks.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;
/// Where GCE's legacy HTTP health checks of target pools come from.
pub const HEALTH_CHECK_RANGES: [&str; 3] = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkTier {
    Premium,
    Standard,
}

impl NetworkTier {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Premium => "PREMIUM",
            Self::Standard => "STANDARD",
        }
    }
}

/// The project and region the cluster's balancers live in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub project: String,
    pub region: String,
}

/// A Compute Engine instance, from a node's `spec.providerID` (`gce://<project>/<zone>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceRef {
    pub project: String,
    pub zone: String,
    pub name: String,
}

impl InstanceRef {
    /// The instance's URL relative to the API root, as target pools list their instances.
    pub fn path(&self) -> String {
        format!(
            "projects/{}/zones/{}/instances/{}",
            self.project, self.zone, self.name
        )
    }

    /// The region of the instance's zone (`us-central1-a` is in `us-central1`).
    pub fn region(&self) -> &str {
        self.zone
            .rsplit_once('-')
            .map_or(self.zone.as_str(), |(region, _)| region)
    }
}

/// The instance a node's `spec.providerID` names, if it names a Compute Engine instance.
pub fn instance_of(provider_id: &str) -> Option<InstanceRef> {
    let rest = provider_id.strip_prefix("gce://")?;
    let mut parts = rest.split('/');
    let (project, zone, name) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    };
    (parts.next().is_none() && valid(project) && valid(zone) && valid(name)).then(|| InstanceRef {
        project: project.to_string(),
        zone: zone.to_string(),
        name: name.to_string(),
    })
}

/// One forwarding rule: a protocol on the balancer's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePlan {
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// `low-high`, the API's `portRange`.
    pub port_range: String,
}

/// A firewall rule admitting `source_ranges` to the nodes on exactly these ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallPlan {
    pub name: String,
    pub source_ranges: Vec<String>,
    /// Per protocol (`tcp`, `udp`), the ports, ascending.
    pub allowed: BTreeMap<&'static str, Vec<u16>>,
}

/// The target pool's legacy HTTP health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckPlan {
    pub name: String,
    pub port: u16,
    pub path: &'static str,
}

/// Everything a Service's balancer consists of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `ferry-<16 hex>`: the address, target pool and health check are named this; rules
    /// and firewall rules add a suffix.
    pub name: String,
    /// ferry's ownership marks as JSON, the description of every resource.
    pub description: String,
    pub tier: NetworkTier,
    /// A user-reserved address the Service asks for.
    pub requested_ip: Option<IpAddr>,
    pub rules: Vec<RulePlan>,
    /// `NONE` or `CLIENT_IP`.
    pub session_affinity: &'static str,
    pub instances: BTreeSet<InstanceRef>,
    /// Nodes that cannot be in the pool, and why (logged by the provider).
    pub skipped: Vec<(String, String)>,
    /// Annotations under GKE's prefixes that this provider does not act on.
    pub notices: Vec<String>,
    pub health_check: HealthCheckPlan,
    pub firewall: FirewallPlan,
    pub health_firewall: FirewallPlan,
}

/// The name every resource of `uid`'s balancer starts with (a GCE name: a lowercase letter,
/// then lowercase letters, digits and dashes, at most 63 characters; this is 22).
pub fn base_name(cluster_id: &str, uid: &str) -> String {
    format!("ferry-{}", resource_hash(cluster_id, uid))
}

/// The ownership marks as a resource description.
pub fn description(cluster: &ClusterIdentity, id: &LoadBalancerId) -> String {
    serde_json::to_string(&marks(cluster, id)).unwrap_or_default()
}

/// The marks a description carries (none when it is not ferry's JSON).
pub fn marks_of(description: &str) -> BTreeMap<String, String> {
    serde_json::from_str(description).unwrap_or_default()
}

fn invalid(reason: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::invalid(reason, message)
}

fn tier_of(desired: &DesiredLoadBalancer) -> Result<NetworkTier, ProviderError> {
    match desired
        .annotations
        .get(NETWORK_TIER_ANNOTATION)
        .map(|s| s.trim())
    {
        None | Some("") => Ok(NetworkTier::Premium),
        Some(t) if t.eq_ignore_ascii_case("premium") => Ok(NetworkTier::Premium),
        Some(t) if t.eq_ignore_ascii_case("standard") => Ok(NetworkTier::Standard),
        Some(other) => Err(invalid(
            "InvalidAnnotation",
            format!("annotation {NETWORK_TIER_ANNOTATION}: {other:?} is not Premium or Standard"),
        )),
    }
}

/// The balancer `desired` should have in `location`.
pub fn plan(
    desired: &DesiredLoadBalancer,
    cluster: &ClusterIdentity,
    location: &Location,
) -> Result<Plan, ProviderError> {
    for key in INTERNAL_ANNOTATIONS {
        match desired.annotations.get(key).map(|v| v.trim()) {
            None => {}
            Some(v) if v.eq_ignore_ascii_case("external") => {}
            Some(v) if v.eq_ignore_ascii_case("internal") => {
                return Err(invalid(
                    "InternalNotSupported",
                    format!("annotation {key}: ferry's GCE provider makes external balancers only"),
                ));
            }
            // A typo must not silently make public what was meant to be internal.
            Some(other) => {
                return Err(invalid(
                    "InvalidAnnotation",
                    format!("annotation {key}: {other:?} is not Internal or External"),
                ));
            }
        }
    }
    let notices: Vec<String> = desired
        .annotations
        .keys()
        .filter(|k| GKE_PREFIXES.iter().any(|p| k.starts_with(p)))
        .filter(|k| {
            *k != NETWORK_TIER_ANNOTATION
                && !INTERNAL_ANNOTATIONS.contains(&k.as_str())
                && !OTHER_CONTROLLERS.contains(&k.as_str())
        })
        .map(|k| format!("annotation {k} is not acted on by ferry's GCE provider"))
        .collect();
    let tier = tier_of(desired)?;
    let has_v4 = desired.ip_families.is_empty() || desired.ip_families.contains(&IpFamily::V4);
    let needs_v6 = desired.ip_families.contains(&IpFamily::V6)
        && desired.ip_family_policy == IpFamilyPolicy::RequireDualStack;
    if !has_v4 || needs_v6 {
        return Err(invalid(
            "UnsupportedIPFamily",
            "a GCE target-pool balancer is IPv4 only; the Service asks for IPv6",
        ));
    }
    let requested_ip = match desired.requested_ips.as_slice() {
        [] => None,
        [ip @ IpAddr::V4(_)] => Some(*ip),
        _ => {
            return Err(invalid(
                "InvalidLoadBalancerIP",
                "a GCE target-pool balancer has one IPv4 address; the Service asks for another",
            ));
        }
    };
    if desired.ports.is_empty() {
        return Err(invalid("NoPorts", "the Service has no ports"));
    }

    let name = base_name(&cluster.id, &desired.id.uid);
    let mut by_protocol: BTreeMap<&'static str, BTreeSet<u16>> = BTreeMap::new();
    for p in &desired.ports {
        let protocol = match p.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => {
                return Err(invalid(
                    "UnsupportedProtocol",
                    format!(
                        "port {}: a GCE target-pool balancer forwards TCP and UDP, not SCTP",
                        p.port
                    ),
                ));
            }
        };
        by_protocol.entry(protocol).or_default().insert(p.port);
    }
    let rules = by_protocol
        .iter()
        .filter_map(|(protocol, ports)| {
            let (low, high) = (ports.first()?, ports.last()?);
            Some(RulePlan {
                name: format!("{name}-{}", protocol.to_ascii_lowercase()),
                protocol,
                port_range: format!("{low}-{high}"),
            })
        })
        .collect();

    let mut instances = BTreeSet::new();
    let mut skipped = Vec::new();
    for node in &desired.targets {
        match target(node, location) {
            Ok(i) => {
                instances.insert(i);
            }
            Err(why) => skipped.push((node.name.clone(), why)),
        }
    }

    let health_check = match desired.traffic_policy {
        TrafficPolicy::Cluster => HealthCheckPlan {
            name: name.clone(),
            port: KUBE_PROXY_HEALTH_PORT,
            path: "/healthz",
        },
        TrafficPolicy::Local {
            health_check_node_port: Some(port),
        } => HealthCheckPlan {
            name: name.clone(),
            port,
            path: "/healthz",
        },
        TrafficPolicy::Local {
            health_check_node_port: None,
        } => {
            return Err(invalid(
                "NoHealthCheckNodePort",
                "externalTrafficPolicy Local without spec.healthCheckNodePort",
            ));
        }
    };

    let source_ranges: Vec<String> = if desired.source_ranges.is_empty() {
        vec!["0.0.0.0/0".into()]
    } else {
        let v4: Vec<String> = desired
            .source_ranges
            .iter()
            .filter(|r| matches!(r, ipnet::IpNet::V4(_)))
            .map(|r| r.trunc().to_string())
            .collect();
        if v4.is_empty() {
            // Never open to everyone what the Service restricts.
            return Err(invalid(
                "InvalidSourceRanges",
                "loadBalancerSourceRanges has no IPv4 range, and this balancer is IPv4",
            ));
        }
        v4
    };
    let allowed = by_protocol
        .into_iter()
        .map(|(p, ports)| {
            let p = if p == "TCP" { "tcp" } else { "udp" };
            (p, ports.into_iter().collect())
        })
        .collect();

    Ok(Plan {
        description: description(cluster, &desired.id),
        tier,
        requested_ip,
        rules,
        session_affinity: match desired.session_affinity {
            SessionAffinity::None => "NONE",
            SessionAffinity::ClientIp { .. } => "CLIENT_IP",
        },
        instances,
        skipped,
        notices,
        firewall: FirewallPlan {
            name: format!("{name}-fw"),
            source_ranges,
            allowed,
        },
        health_firewall: FirewallPlan {
            name: format!("{name}-hc"),
            source_ranges: HEALTH_CHECK_RANGES.iter().map(|r| r.to_string()).collect(),
            allowed: BTreeMap::from([("tcp", vec![health_check.port])]),
        },
        health_check,
        name,
    })
}

/// The instance `node` is, if it can be in a target pool in `location`.
fn target(node: &NodeTarget, location: &Location) -> Result<InstanceRef, String> {
    let Some(id) = node.provider_id.as_deref() else {
        return Err("no spec.providerID".into());
    };
    let Some(instance) = instance_of(id) else {
        return Err(format!(
            "spec.providerID {id:?} names no Compute Engine instance"
        ));
    };
    if instance.project != location.project {
        return Err(format!(
            "instance in project {:?}, balancers in {:?}",
            instance.project, location.project
        ));
    }
    if instance.region() != location.region {
        return Err(format!(
            "instance in zone {:?}, outside region {:?}",
            instance.zone, location.region
        ));
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired;
    use crate::fixtures::service;

    fn cluster() -> ClusterIdentity {
        ClusterIdentity {
            id: "prod".into(),
            uid: "uid-of-prod".into(),
        }
    }

    fn here() -> Location {
        Location {
            project: "proj".into(),
            region: "us-central1".into(),
        }
    }

    fn node(name: &str, provider_id: Option<&str>) -> NodeTarget {
        NodeTarget {
            name: name.into(),
            internal_ips: vec!["10.0.0.1".parse().unwrap()],
            external_ips: vec![],
            provider_id: provider_id.map(str::to_string),
            zone: None,
        }
    }

    fn planned(
        svc: crate::fixtures::ServiceBuilder,
        nodes: &[NodeTarget],
    ) -> Result<Plan, ProviderError> {
        plan(&desired(&svc.build(), nodes).unwrap(), &cluster(), &here())
    }

    fn reason(r: Result<Plan, ProviderError>) -> &'static str {
        r.expect_err("refused").reason()
    }

    #[test]
    fn a_service_becomes_an_address_a_pool_a_check_rules_and_firewalls() {
        let p = planned(
            service("web").lb().port(80, 30080).port(443, 30443),
            &[node("a", Some("gce://proj/us-central1-a/node-a"))],
        )
        .unwrap();
        assert_eq!(p.name, base_name("prod", "uid-web"));
        assert!(p.name.len() <= 63 && p.name.starts_with("ferry-"));
        assert_eq!(
            p.rules,
            vec![RulePlan {
                name: format!("{}-tcp", p.name),
                protocol: "TCP",
                port_range: "80-443".into(),
            }]
        );
        assert_eq!(
            p.firewall.allowed,
            BTreeMap::from([("tcp", vec![80, 443])]),
            "exactly the Service's ports, not the rule's range"
        );
        assert_eq!(p.firewall.source_ranges, ["0.0.0.0/0"]);
        assert_eq!(p.health_check.port, KUBE_PROXY_HEALTH_PORT);
        assert_eq!(
            p.health_firewall.allowed,
            BTreeMap::from([("tcp", vec![10256])])
        );
        assert_eq!(p.session_affinity, "NONE");
        assert_eq!(p.tier, NetworkTier::Premium);
        assert_eq!(
            p.instances
                .iter()
                .map(InstanceRef::path)
                .collect::<Vec<_>>(),
            ["projects/proj/zones/us-central1-a/instances/node-a"]
        );
        let marks = marks_of(&p.description);
        assert_eq!(
            crate::ownership::owner(&cluster(), &marks),
            crate::ownership::Mark::Ours(
                desired(&service("web").lb().port(80, 30080).build(), &[])
                    .unwrap()
                    .id
            )
        );
    }

    #[test]
    fn tcp_and_udp_on_one_port_are_two_rules_on_one_address() {
        let p = planned(service("dns").lb().port(53, 30053).udp_port(53, 30053), &[]).unwrap();
        let rules: Vec<_> = p
            .rules
            .iter()
            .map(|r| (r.protocol, r.port_range.as_str()))
            .collect();
        assert_eq!(rules, [("TCP", "53-53"), ("UDP", "53-53")]);
        assert_eq!(
            p.firewall.allowed,
            BTreeMap::from([("tcp", vec![53]), ("udp", vec![53])])
        );
    }

    #[test]
    fn local_services_are_checked_on_their_health_check_node_port() {
        let p = planned(service("web").lb().port(80, 30080).local(32000), &[]).unwrap();
        assert_eq!(
            (p.health_check.port, p.health_check.path),
            (32000, "/healthz")
        );
        assert_eq!(
            p.health_firewall.allowed,
            BTreeMap::from([("tcp", vec![32000])])
        );
    }

    #[test]
    fn affinity_tier_source_ranges_and_the_requested_address_are_honoured() {
        let p = planned(
            service("web")
                .lb()
                .port(80, 30080)
                .client_ip_affinity(600)
                .annotate(NETWORK_TIER_ANNOTATION, "Standard")
                .source_range("198.51.100.7/24")
                .load_balancer_ip("203.0.113.9"),
            &[],
        )
        .unwrap();
        assert_eq!(p.session_affinity, "CLIENT_IP");
        assert_eq!(p.tier, NetworkTier::Standard);
        assert_eq!(p.firewall.source_ranges, ["198.51.100.0/24"]);
        assert_eq!(p.requested_ip, Some("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn what_a_target_pool_cannot_do_is_refused_with_a_reason() {
        assert_eq!(
            reason(planned(service("s").lb().sctp_port(9, 30009), &[])),
            "UnsupportedProtocol"
        );
        assert_eq!(
            reason(planned(
                service("i")
                    .lb()
                    .port(80, 30080)
                    .annotate("networking.gke.io/load-balancer-type", "Internal"),
                &[]
            )),
            "InternalNotSupported"
        );
        assert_eq!(
            reason(planned(
                service("t")
                    .lb()
                    .port(80, 30080)
                    .annotate(NETWORK_TIER_ANNOTATION, "gold"),
                &[]
            )),
            "InvalidAnnotation"
        );
        assert_eq!(
            reason(planned(
                service("r")
                    .lb()
                    .port(80, 30080)
                    .source_range("2001:db8::/64"),
                &[]
            )),
            "InvalidSourceRanges",
            "an IPv6-only restriction never becomes open to all"
        );
        assert_eq!(
            reason(planned(service("d").lb().port(80, 30080).dual_stack(), &[])),
            "UnsupportedIPFamily"
        );
    }

    #[test]
    fn nodes_outside_the_project_or_region_or_not_instances_are_skipped_with_why() {
        let p = planned(
            service("web").lb().port(80, 30080),
            &[
                node("a", Some("gce://proj/us-central1-b/a")),
                node("b", Some("gce://other/us-central1-b/b")),
                node("c", Some("gce://proj/europe-west1-b/c")),
                node("d", Some("aws:///us-east-1a/i-0abc")),
                node("e", None),
            ],
        )
        .unwrap();
        assert_eq!(p.instances.len(), 1);
        let skipped: Vec<_> = p.skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(skipped, ["b", "c", "d", "e"]);
        assert!(p.skipped[0].1.contains("project"), "{:?}", p.skipped);
        assert!(p.skipped[1].1.contains("region"), "{:?}", p.skipped);
    }

    #[test]
    fn gke_annotations_are_acted_on_refused_or_noticed_never_silently_dropped() {
        let with =
            |k: &str, v: &str| planned(service("web").lb().port(80, 30080).annotate(k, v), &[]);
        assert!(with("networking.gke.io/load-balancer-type", "External").is_ok());
        assert_eq!(
            reason(with("cloud.google.com/load-balancer-type", "Internl")),
            "InvalidAnnotation",
            "a typo must not make public what was meant to be internal"
        );
        let p = with(
            "networking.gke.io/internal-load-balancer-allow-global-access",
            "true",
        )
        .unwrap();
        assert_eq!(p.notices.len(), 1);
        assert!(
            p.notices[0].contains("allow-global-access"),
            "{:?}",
            p.notices
        );
        // Other GKE controllers' annotations, and others' prefixes, are not the balancer's.
        assert!(
            with("cloud.google.com/neg", "{\"ingress\":true}")
                .unwrap()
                .notices
                .is_empty()
        );
        assert!(with("example.com/team", "web").unwrap().notices.is_empty());
    }

    #[test]
    fn provider_ids_parse_only_when_whole() {
        let i = instance_of("gce://my-proj/europe-west4-c/gke-pool-1-abcd").unwrap();
        assert_eq!(i.region(), "europe-west4");
        assert_eq!(i.name, "gke-pool-1-abcd");
        for bad in [
            "gce://p/z",
            "gce://p/z/n/extra",
            "gce:///z/n",
            "aws:///z/i-1",
            "gce://p/z/n?x",
        ] {
            assert_eq!(instance_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_description_that_is_not_ferrys_json_has_no_marks() {
        assert!(marks_of("").is_empty());
        assert!(marks_of("Created by kubernetes").is_empty());
        assert!(marks_of("{\"kubernetes.io/service-name\": 3}").is_empty());
    }
}
