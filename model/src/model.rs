//! The provider-neutral model: what the operator wants (`DesiredLoadBalancer`) and what a
//! provider reports (`ObservedLoadBalancer`). Plain values, no clients, no SDK types, so the
//! operator's pure functions and every provider's tests can build them directly.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

pub use ferry_crds::IpMode;
use ipnet::IpNet;

/// Identifies the balancer of one Service. The UID keeps a recreated Service from adopting
/// the balancer of its deleted namesake.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoadBalancerId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for LoadBalancerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The spelling Kubernetes uses (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Service port and the NodePort that serves it on every node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    /// `None` when the Service opts out of NodePorts (`allocateLoadBalancerNodePorts: false`).
    pub node_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum IpFamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// A node the balancer sends traffic to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeTarget {
    pub name: String,
    /// InternalIP addresses, in the order the node reports them.
    pub internal_ips: Vec<IpAddr>,
    /// ExternalIP addresses, for providers that target those.
    pub external_ips: Vec<IpAddr>,
    /// `spec.providerID`, e.g. `aws:///us-east-1a/i-0abc`, `gce://project/zone/name`.
    pub provider_id: Option<String>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    /// Any node forwards to any endpoint; the client source address may be lost.
    #[default]
    Cluster,
    /// Only nodes with local endpoints serve; they answer health checks on this NodePort.
    Local { health_check_node_port: Option<u16> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIp {
        timeout: Duration,
    },
}

/// The balancer a Service should have, computed purely from the Service and the Nodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DesiredLoadBalancer {
    pub id: LoadBalancerId,
    pub ports: Vec<PortSpec>,
    /// Eligible nodes, sorted by name.
    pub targets: Vec<NodeTarget>,
    /// Families in the Service's preference order.
    pub ip_families: Vec<IpFamily>,
    pub ip_family_policy: IpFamilyPolicy,
    /// Addresses the Service asks for (`spec.loadBalancerIP` or an annotation), at most one
    /// per family; empty means "any".
    pub requested_ips: Vec<IpAddr>,
    /// A named address pool the Service asks for, if any.
    pub requested_pool: Option<String>,
    /// Services with the same key may share an address when their ports do not overlap.
    pub sharing_key: Option<String>,
    /// `spec.loadBalancerSourceRanges`; empty means everyone.
    pub source_ranges: Vec<IpNet>,
    pub traffic_policy: TrafficPolicy,
    pub session_affinity: SessionAffinity,
    /// The Service's labels (for pool selectors).
    pub service_labels: BTreeMap<String, String>,
    /// The Service's annotations; each provider parses the ones it owns and refuses malformed
    /// values with `ProviderError::InvalidInput`.
    pub annotations: BTreeMap<String, String>,
}

impl DesiredLoadBalancer {
    /// Everything but the targets: when only this stays equal, a node change needs only a
    /// target update.
    pub fn without_targets(&self) -> DesiredLoadBalancer {
        DesiredLoadBalancer {
            targets: Vec::new(),
            ..self.clone()
        }
    }
}

/// One address (or DNS name) the balancer is reachable at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ingress {
    pub ip: Option<IpAddr>,
    pub hostname: Option<String>,
    /// `None` lets Kubernetes default to `VIP`.
    pub ip_mode: Option<IpMode>,
}

impl Ingress {
    pub fn ip(ip: IpAddr, ip_mode: IpMode) -> Self {
        Self {
            ip: Some(ip),
            hostname: None,
            ip_mode: Some(ip_mode),
        }
    }

    pub fn hostname(hostname: impl Into<String>) -> Self {
        Self {
            ip: None,
            hostname: Some(hostname.into()),
            ip_mode: None,
        }
    }
}

/// A port the provider could not serve, with a CamelCase reason
/// (`foo.example.com/CamelCase` for provider-specific ones).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortError {
    pub port: u16,
    pub protocol: Protocol,
    pub error: String,
}

/// What the provider has for a Service, as it should be published in its status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ObservedLoadBalancer {
    pub ingress: Vec<Ingress>,
    pub port_errors: Vec<PortError>,
    /// What the provider does not act on that the user should know (an annotation it
    /// ignores), one sentence each; the operator shows each as a Warning Event when the
    /// Service's balancer changes, never as a failure.
    pub notices: Vec<String>,
}

/// Which cluster a cloud resource belongs to, by two marks. `id` is the operator's free-text
/// `--cluster-id` (it names resources and can be copied to a second cluster by mistake);
/// `uid` is the cluster's identity read from its own API (the `kube-system` namespace's UID),
/// which a copied flag cannot forge. Orphan collection deletes only what carries both.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterIdentity {
    pub id: String,
    pub uid: String,
}

/// What a provider found of its own in the cloud, for orphan collection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// Balancers (or their leftovers) carrying both marks of this cluster, by Service.
    pub ours: Vec<LoadBalancerId>,
    /// Resources with this cluster's id but another cluster's identity, or none: never
    /// deleted, only reported.
    pub foreign: Vec<ForeignResource>,
}

/// A resource tagged with this cluster's id that this cluster cannot prove is its own.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ForeignResource {
    /// The Service its tags name.
    pub id: LoadBalancerId,
    /// What it is, for the log (`load balancer ferry-…`, `target group …`).
    pub resource: String,
    /// The identity it carries, if any.
    pub cluster_uid: Option<String>,
}
