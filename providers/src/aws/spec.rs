//! From a `DesiredLoadBalancer` and its annotations to the NLB it should be (`BalancerSpec`):
//! names, tags, target groups (one per Service port number; TCP_UDP when a number carries
//! both), listeners, health checks, attributes and security-group rules. Pure, so every
//! mapping rule is a unit test; `converge` turns the spec into API calls.
//!
//! Names are deterministic (a hash of the cluster id and the Service UID) and fit AWS's
//! 32-character limit, so ferry finds its own resources by name after a restart and never
//! creates a second balancer for one Service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::options::{
    self, AddressType, AwsOptions, HealthPort, HealthProtocol, PREFIX, Scheme, SubnetChoice,
};
use crate::{
    ClusterIdentity, DesiredLoadBalancer, IpFamily, IpFamilyPolicy, LoadBalancerId, Protocol,
    ProviderError, TrafficPolicy,
};

/// Tag keys on everything ferry creates: the ownership marks every cloud provider shares.
pub use crate::ownership::{
    Mark, TAG_CLUSTER, TAG_CLUSTER_UID, TAG_NAME, TAG_NAMESPACE, TAG_UID, owner,
};

/// On the balancer only: the subnet:allocation pairs it was created with (they cannot change
/// in place). Never in `BalancerSpec::tags`, whose ferry.dev/ keys users cannot set.
pub const TAG_EIPS: &str = "ferry.dev/eip-allocations";

/// kube-proxy's health endpoint, used for UDP-only ports of `Cluster` Services (a TCP check
/// on a UDP NodePort would never pass).
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TgProtocol {
    Tcp,
    Udp,
    TcpUdp,
}

impl TgProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::TcpUdp => "TCP_UDP",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "TCP_UDP" => Some(Self::TcpUdp),
            _ => None,
        }
    }

    /// The IP protocols a security group must open for it.
    pub fn ip_protocols(self) -> &'static [&'static str] {
        match self {
            Self::Tcp => &["tcp"],
            Self::Udp => &["udp"],
            Self::TcpUdp => &["tcp", "udp"],
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::TcpUdp => "tcpudp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub protocol: HealthProtocol,
    /// `traffic-port` or a port number, as ELBv2 spells it.
    pub port: String,
    pub path: Option<String>,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetGroupSpec {
    pub name: String,
    /// The Service port: the listener's port and the group's (immutable) port.
    pub port: u16,
    pub protocol: TgProtocol,
    /// Every target is registered at this port.
    pub node_port: u16,
    pub health: HealthCheck,
    /// Attributes ferry sets; attributes not named here are left as they are.
    pub attributes: BTreeMap<String, String>,
}

/// One security-group ingress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub protocol: &'static str,
    pub port: u16,
    pub cidr: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancerSpec {
    /// The balancer's name, which its security group shares.
    pub name: String,
    /// Every target group of this Service, current or stale, starts with this.
    pub target_group_prefix: String,
    pub scheme: Scheme,
    pub address_type: AddressType,
    pub subnets: SubnetChoice,
    /// Allocation ids from the annotation.
    pub eip_allocations: Vec<String>,
    /// `spec.loadBalancerIP`, to be matched to an allocation.
    pub requested_ip: Option<IpAddr>,
    pub target_groups: Vec<TargetGroupSpec>,
    pub rules: BTreeSet<Rule>,
    pub cross_zone: bool,
    pub tags: BTreeMap<String, String>,
}

use crate::ownership::resource_hash as hash;

/// `ferry-` and 16 hex digits: 22 characters.
pub fn balancer_name(cluster_id: &str, uid: &str) -> String {
    format!("ferry-{}", hash(cluster_id, uid))
}

/// `ferry-` and 12 hex digits and `-`: every target group of the Service starts with it.
pub fn target_group_prefix(cluster_id: &str, uid: &str) -> String {
    format!("ferry-{}-", &hash(cluster_id, uid)[..12])
}

/// At most 31 characters: `ferry-<12 hex>-<port>-<tcp|udp|tcpudp>`.
pub fn target_group_name(cluster_id: &str, uid: &str, port: u16, protocol: TgProtocol) -> String {
    format!(
        "{}{port}-{}",
        target_group_prefix(cluster_id, uid),
        protocol.short()
    )
}

/// The EC2 instance id in a node's `spec.providerID` (`aws:///us-east-1a/i-0abc`).
pub fn instance_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-") && id.len() > 2 && id[2..].chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(id)
}

/// The tags of every resource ferry creates for `id`.
pub fn tags(
    cluster: &ClusterIdentity,
    id: &LoadBalancerId,
    additional: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut tags = additional.clone();
    tags.insert(
        format!("kubernetes.io/cluster/{}", cluster.id),
        "owned".into(),
    );
    tags.extend(crate::ownership::marks(cluster, id));
    tags
}

fn health_check(
    desired: &DesiredLoadBalancer,
    protocol: TgProtocol,
    o: &options::HealthOverrides,
) -> HealthCheck {
    let (mut proto, mut port, mut path, healthy, unhealthy) = match desired.traffic_policy {
        TrafficPolicy::Local {
            health_check_node_port: Some(p),
        } => (
            HealthProtocol::Http,
            p.to_string(),
            Some("/healthz".to_string()),
            2,
            2,
        ),
        _ if protocol == TgProtocol::Udp => (
            HealthProtocol::Http,
            KUBE_PROXY_HEALTH_PORT.to_string(),
            Some("/healthz".to_string()),
            3,
            3,
        ),
        _ => (HealthProtocol::Tcp, "traffic-port".to_string(), None, 3, 3),
    };
    if let Some(p) = o.protocol {
        proto = p;
    }
    match o.port {
        Some(HealthPort::TrafficPort) => port = "traffic-port".into(),
        Some(HealthPort::Port(p)) => port = p.to_string(),
        None => {}
    }
    if proto == HealthProtocol::Tcp {
        path = None;
    } else if let Some(p) = &o.path {
        path = Some(p.clone());
    } else if path.is_none() {
        path = Some("/healthz".into());
    }
    HealthCheck {
        protocol: proto,
        port,
        path,
        interval_seconds: o.interval_seconds.unwrap_or(10),
        timeout_seconds: o.timeout_seconds.unwrap_or(6),
        healthy_threshold: o.healthy_threshold.unwrap_or(healthy),
        unhealthy_threshold: o.unhealthy_threshold.unwrap_or(unhealthy),
    }
}

/// The NLB `desired` should be, for `cluster`.
pub fn plan(
    desired: &DesiredLoadBalancer,
    cluster: &ClusterIdentity,
) -> Result<BalancerSpec, ProviderError> {
    let cluster_id = cluster.id.as_str();
    let o: AwsOptions = options::parse(&desired.annotations)?;
    let uid = &desired.id.uid;

    // Port number → (protocols, NodePort).
    let mut by_port: BTreeMap<u16, (BTreeSet<Protocol>, u16)> = BTreeMap::new();
    for p in &desired.ports {
        if p.protocol == Protocol::Sctp {
            return Err(ProviderError::invalid(
                "UnsupportedProtocol",
                format!(
                    "port {} is SCTP; Network Load Balancers forward TCP and UDP only",
                    p.port
                ),
            ));
        }
        let Some(node_port) = p.node_port else {
            return Err(ProviderError::invalid(
                "NodePortsRequired",
                format!(
                    "port {}/{} has no NodePort; instance targets need allocateLoadBalancerNodePorts: true",
                    p.port, p.protocol
                ),
            ));
        };
        let entry = by_port
            .entry(p.port)
            .or_insert_with(|| (BTreeSet::new(), node_port));
        if entry.1 != node_port {
            return Err(ProviderError::invalid(
                "UnsupportedPortMapping",
                format!(
                    "port {} uses NodePort {} for one protocol and {node_port} for the other; a TCP_UDP target group needs one",
                    p.port, entry.1
                ),
            ));
        }
        entry.0.insert(p.protocol);
    }
    if by_port.is_empty() {
        return Err(ProviderError::invalid(
            "NoPorts",
            "the Service has no ports to balance",
        ));
    }

    let address_type = o.address_type.unwrap_or(
        if desired.ip_family_policy != IpFamilyPolicy::SingleStack
            && desired.ip_families.contains(&IpFamily::V6)
            && desired.ip_families.contains(&IpFamily::V4)
        {
            AddressType::Dualstack
        } else {
            AddressType::Ipv4
        },
    );

    let requested_ip = match desired.requested_ips.as_slice() {
        [] => None,
        [ip @ IpAddr::V4(_)] => Some(*ip),
        _ => {
            return Err(ProviderError::invalid(
                "UnsupportedLoadBalancerIP",
                "an NLB takes one IPv4 Elastic IP through spec.loadBalancerIP; use the eip-allocations annotation for one per subnet",
            ));
        }
    };
    if requested_ip.is_some() && !o.eip_allocations.is_empty() {
        return Err(ProviderError::invalid(
            options::INVALID_ANNOTATION,
            format!(
                "spec.loadBalancerIP and annotation {PREFIX}eip-allocations both ask for addresses; use one"
            ),
        ));
    }
    if requested_ip.is_some() && o.scheme == Scheme::Internal {
        return Err(ProviderError::invalid(
            "UnsupportedLoadBalancerIP",
            "spec.loadBalancerIP names an Elastic IP, which needs an internet-facing balancer",
        ));
    }

    let mut attributes = o.target_group_attributes.clone();
    attributes
        .entry("proxy_protocol_v2.enabled".into())
        .or_insert_with(|| o.proxy_protocol.to_string());

    let target_groups: Vec<TargetGroupSpec> = by_port
        .iter()
        .map(|(port, (protocols, node_port))| {
            let protocol = match (
                protocols.contains(&Protocol::Tcp),
                protocols.contains(&Protocol::Udp),
            ) {
                (true, true) => TgProtocol::TcpUdp,
                (false, true) => TgProtocol::Udp,
                _ => TgProtocol::Tcp,
            };
            TargetGroupSpec {
                name: target_group_name(cluster_id, uid, *port, protocol),
                port: *port,
                protocol,
                node_port: *node_port,
                health: health_check(desired, protocol, &o.health),
                attributes: attributes.clone(),
            }
        })
        .collect();

    let mut cidrs: Vec<String> = desired
        .source_ranges
        .iter()
        .map(|n| n.to_string())
        .collect();
    if cidrs.is_empty() {
        cidrs.push("0.0.0.0/0".into());
        if address_type == AddressType::Dualstack {
            cidrs.push("::/0".into());
        }
    }
    let rules = target_groups
        .iter()
        .flat_map(|tg| {
            tg.protocol.ip_protocols().iter().flat_map(|proto| {
                cidrs.iter().map(|cidr| Rule {
                    protocol: proto,
                    port: tg.port,
                    cidr: cidr.clone(),
                })
            })
        })
        .collect();

    let tags = tags(cluster, &desired.id, &o.additional_tags);
    Ok(BalancerSpec {
        name: balancer_name(cluster_id, uid),
        target_group_prefix: target_group_prefix(cluster_id, uid),
        scheme: o.scheme,
        address_type,
        subnets: o.subnets,
        eip_allocations: o.eip_allocations,
        requested_ip,
        target_groups,
        rules,
        cross_zone: o.cross_zone,
        tags,
    })
}

/// The targets of every target group: each node's instance at the NodePort.
pub fn targets(desired: &DesiredLoadBalancer, node_port: u16) -> BTreeSet<(String, u16)> {
    desired
        .targets
        .iter()
        .filter_map(|t| t.provider_id.as_deref().and_then(instance_id))
        .map(|id| (id.to_string(), node_port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired;
    use crate::fixtures::service;
    use crate::{NodeTarget, PortSpec};

    fn cluster(id: &str) -> ClusterIdentity {
        ClusterIdentity {
            id: id.into(),
            uid: format!("uid-of-{id}"),
        }
    }

    fn node(name: &str, provider_id: &str) -> NodeTarget {
        NodeTarget {
            name: name.into(),
            internal_ips: vec!["10.0.0.1".parse().unwrap()],
            external_ips: vec![],
            provider_id: Some(provider_id.into()),
            zone: None,
        }
    }

    fn web() -> DesiredLoadBalancer {
        let svc = service("web").lb().port(80, 30080).port(443, 30443).build();
        desired(&svc, &[node("a", "aws:///us-east-1a/i-0aaa")]).unwrap()
    }

    #[test]
    fn names_are_stable_short_and_distinct_per_cluster_and_service() {
        let n = balancer_name("prod", "7c9e6679-7425-40de-944b-e07fc1f90ae7");
        assert_eq!(
            n,
            balancer_name("prod", "7c9e6679-7425-40de-944b-e07fc1f90ae7")
        );
        // Pinned: a change here would orphan every balancer ferry has created.
        assert_eq!(n, "ferry-3fd0e07185fe95fa");
        assert_ne!(
            n,
            balancer_name("staging", "7c9e6679-7425-40de-944b-e07fc1f90ae7")
        );
        assert_ne!(n, balancer_name("prod", "another-uid"));
        let tg = target_group_name("prod", "u", 65535, TgProtocol::TcpUdp);
        assert!(tg.len() <= 32, "{tg} is {} characters", tg.len());
        assert!(tg.starts_with(&target_group_prefix("prod", "u")));
        assert!(
            tg.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && !tg.ends_with('-'),
            "{tg}"
        );
    }

    #[test]
    fn instance_ids_come_from_provider_ids() {
        assert_eq!(
            instance_id("aws:///us-east-1a/i-0abc123"),
            Some("i-0abc123")
        );
        assert_eq!(instance_id("aws:///i-0abc123"), Some("i-0abc123"));
        assert_eq!(instance_id("gce://p/z/i-1"), None);
        assert_eq!(instance_id("aws:///us-east-1a/"), None);
        assert_eq!(instance_id("aws:///us-east-1a/i-"), None);
    }

    #[test]
    fn one_target_group_and_listener_per_port_number_tcp_udp_when_both() {
        let svc = service("dns")
            .lb()
            .udp_port(53, 30053)
            .port(53, 30053)
            .udp_port(5353, 30353)
            .port(80, 30080)
            .build();
        let d = desired(&svc, &[]).unwrap();
        let s = plan(&d, &cluster("c")).unwrap();
        let got: Vec<_> = s
            .target_groups
            .iter()
            .map(|t| (t.port, t.protocol, t.node_port))
            .collect();
        assert_eq!(
            got,
            [
                (53, TgProtocol::TcpUdp, 30053),
                (80, TgProtocol::Tcp, 30080),
                (5353, TgProtocol::Udp, 30353)
            ]
        );
        // TCP ports check the traffic port; UDP-only ports ask kube-proxy.
        assert_eq!(s.target_groups[1].health.port, "traffic-port");
        assert_eq!(s.target_groups[1].health.protocol, HealthProtocol::Tcp);
        assert_eq!(s.target_groups[2].health.port, "10256");
        assert_eq!(s.target_groups[2].health.path.as_deref(), Some("/healthz"));
        // Everyone may reach every listener when no source ranges are given.
        assert!(s.rules.contains(&Rule {
            protocol: "udp",
            port: 53,
            cidr: "0.0.0.0/0".into()
        }));
        assert_eq!(s.rules.len(), 4);
    }

    #[test]
    fn local_policy_checks_the_health_check_node_port_over_http() {
        let svc = service("web").lb().port(80, 30080).local(32000).build();
        let s = plan(&desired(&svc, &[]).unwrap(), &cluster("c")).unwrap();
        let h = &s.target_groups[0].health;
        assert_eq!(
            (h.protocol, h.port.as_str(), h.path.as_deref()),
            (HealthProtocol::Http, "32000", Some("/healthz"))
        );
    }

    #[test]
    fn annotations_override_health_checks_and_attributes() {
        let mut d = web();
        for (k, v) in [
            ("healthcheck-protocol", "TCP"),
            ("healthcheck-port", "8080"),
            ("healthcheck-path", "/ignored-for-tcp"),
            ("healthcheck-interval", "30"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=5",
            ),
            ("proxy-protocol", "*"),
        ] {
            d.annotations.insert(format!("{PREFIX}{k}"), v.into());
        }
        let s = plan(&d, &cluster("c")).unwrap();
        let tg = &s.target_groups[0];
        assert_eq!(tg.health.protocol, HealthProtocol::Tcp);
        assert_eq!(tg.health.port, "8080");
        assert_eq!(tg.health.path, None);
        assert_eq!(tg.health.interval_seconds, 30);
        assert_eq!(tg.attributes["deregistration_delay.timeout_seconds"], "5");
        assert_eq!(tg.attributes["proxy_protocol_v2.enabled"], "true");
        // Without the annotation, PROXY protocol is turned off explicitly.
        assert_eq!(
            plan(&web(), &cluster("c")).unwrap().target_groups[0].attributes["proxy_protocol_v2.enabled"],
            "false"
        );
    }

    #[test]
    fn source_ranges_become_security_group_rules() {
        let svc = service("web")
            .lb()
            .port(80, 30080)
            .source_range("203.0.113.0/24")
            .source_range("198.51.100.7/32")
            .build();
        let s = plan(&desired(&svc, &[]).unwrap(), &cluster("c")).unwrap();
        let cidrs: Vec<_> = s.rules.iter().map(|r| r.cidr.as_str()).collect();
        assert_eq!(cidrs, ["198.51.100.7/32", "203.0.113.0/24"]);
    }

    #[test]
    fn every_resource_is_tagged_with_the_cluster_and_the_service() {
        let mut d = web();
        d.annotations.insert(
            format!("{PREFIX}additional-resource-tags"),
            "team=web".into(),
        );
        let s = plan(&d, &cluster("prod")).unwrap();
        assert_eq!(s.tags["kubernetes.io/cluster/prod"], "owned");
        assert_eq!(s.tags[TAG_CLUSTER], "prod");
        assert_eq!(s.tags[TAG_NAME], d.id.name);
        assert_eq!(s.tags[TAG_UID], d.id.uid);
        assert_eq!(s.tags["team"], "web");
        assert_eq!(s.tags[TAG_CLUSTER_UID], "uid-of-prod");
        assert_eq!(owner(&cluster("prod"), &s.tags), Mark::Ours(d.id.clone()));
        assert_eq!(owner(&cluster("staging"), &s.tags), Mark::NotOurs);
        // The same --cluster-id copied to another cluster: its identity differs.
        let twin = ClusterIdentity {
            id: "prod".into(),
            uid: "uid-of-the-twin".into(),
        };
        assert_eq!(
            owner(&twin, &s.tags),
            Mark::Foreign {
                id: d.id.clone(),
                cluster_uid: Some("uid-of-prod".into())
            }
        );
        let mut legacy = s.tags.clone();
        legacy.remove(TAG_CLUSTER_UID);
        assert!(matches!(
            owner(&cluster("prod"), &legacy),
            Mark::Foreign {
                cluster_uid: None,
                ..
            }
        ));
    }

    #[test]
    fn what_an_nlb_cannot_do_is_refused_with_a_reason() {
        let reason = |d: &DesiredLoadBalancer| match plan(d, &cluster("c")) {
            Err(ProviderError::InvalidInput { reason, .. }) => reason,
            other => panic!("expected InvalidInput, got {other:?}"),
        };
        let mut d = web();
        d.ports.push(PortSpec {
            name: None,
            protocol: Protocol::Sctp,
            port: 9,
            node_port: Some(30009),
        });
        assert_eq!(reason(&d), "UnsupportedProtocol");
        let mut d = web();
        d.ports[0].node_port = None;
        assert_eq!(reason(&d), "NodePortsRequired");
        let mut d = web();
        d.ports.push(PortSpec {
            name: None,
            protocol: Protocol::Udp,
            port: 80,
            node_port: Some(31111),
        });
        assert_eq!(reason(&d), "UnsupportedPortMapping");
        let mut d = web();
        d.requested_ips = vec!["2001:db8::1".parse().unwrap()];
        assert_eq!(reason(&d), "UnsupportedLoadBalancerIP");
        let mut d = web();
        d.annotations
            .insert(format!("{PREFIX}healthcheck-port"), "none".into());
        assert_eq!(reason(&d), "InvalidAnnotation");
    }

    #[test]
    fn dual_stack_services_get_dualstack_balancers() {
        let mut d = web();
        assert_eq!(
            plan(&d, &cluster("c")).unwrap().address_type,
            AddressType::Ipv4
        );
        d.ip_families = vec![IpFamily::V4, IpFamily::V6];
        d.ip_family_policy = IpFamilyPolicy::PreferDualStack;
        let s = plan(&d, &cluster("c")).unwrap();
        assert_eq!(s.address_type, AddressType::Dualstack);
        assert!(s.rules.iter().any(|r| r.cidr == "::/0"));
    }

    #[test]
    fn targets_are_instances_at_the_node_port() {
        let mut d = web();
        d.targets.push(node("b", "aws:///us-east-1b/i-0bbb"));
        d.targets.push(NodeTarget {
            provider_id: None,
            ..node("c", "")
        });
        let t = targets(&d, 30080);
        assert_eq!(
            t.into_iter().collect::<Vec<_>>(),
            [("i-0aaa".to_string(), 30080), ("i-0bbb".to_string(), 30080)]
        );
    }
}
