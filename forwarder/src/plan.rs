//! The pure heart of the forwarder: from what the Kubernetes API says (Services, Nodes,
//! EndpointSlices, the local pools, which forwarders are alive) to what this node must do —
//! which VIPs it holds and which ports it forwards where. No I/O and no clock: the shell
//! observes, calls `plan`, and hands the result to the announcer and the data plane.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_model::announce::{self, Candidacy};
use ferry_model::class::ClassFilter;
use ferry_model::desired::proxy_protocol_of;
use ferry_model::desired::{desired, id_of};
use ferry_model::eligibility::eligible_targets;
use ferry_model::ingress::status_ingress;
use ferry_model::pools::Pool;
use ferry_model::{
    DesiredLoadBalancer, IpFamily, NodeTarget, Protocol, SessionAffinity, TrafficPolicy,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use ferry_model::announce::SERVICE_NAME_LABEL;

/// How a backend's health is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealthCheck {
    /// None possible: a UDP NodePort that does not answer gives no signal, so it is assumed up.
    None,
    /// A TCP connect to the backend itself.
    Connect,
    /// `GET /healthz` on the node's `healthCheckNodePort` (kube-proxy answers 200 while the
    /// node has local endpoints), for `externalTrafficPolicy: Local`.
    Http { ip: IpAddr, port: u16 },
}

/// One VIP port this node forwards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// `nodeIP:nodePort` of every node that may receive the traffic, sorted.
    pub backends: Vec<SocketAddr>,
    pub health: HealthCheck,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity: Option<Duration>,
    /// Prepend a PROXY protocol v2 header (TCP, userspace path).
    pub proxy_protocol: bool,
    /// `loadBalancerSourceRanges`; empty admits everyone.
    pub source_ranges: Vec<IpNet>,
    /// `externalTrafficPolicy: Local`: only this node serves, and the client's address is kept.
    pub local: bool,
}

impl Frontend {
    /// A frontend of `default/web` with nothing but its address, port, protocol and
    /// backends, for tests.
    #[cfg(test)]
    pub fn for_test(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend {
            service: "default/web".into(),
            vip: vip
                .parse()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            port,
            protocol,
            backends: backends.iter().filter_map(|b| b.parse().ok()).collect(),
            health: HealthCheck::Connect,
            affinity: None,
            proxy_protocol: false,
            source_ranges: vec![],
            local: false,
        }
    }

    /// The key a listener is bound by.
    pub fn key(&self) -> (IpAddr, u16, Protocol) {
        (self.vip, self.port, self.protocol)
    }

    pub fn admits(&self, client: &IpAddr) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|r| r.contains(client))
    }
}

/// What this node must do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePlan {
    /// VIPs this node holds (and announces); every other pool address must be withdrawn.
    pub announce: BTreeSet<IpAddr>,
    /// Ports forwarded on the VIPs held (Services in `Proxy` mode), sorted.
    pub frontends: Vec<Frontend>,
    /// The owner of every VIP ferry serves, for logs and metrics.
    pub owners: BTreeMap<IpAddr, String>,
    /// The Services on every VIP ferry serves, owned or not.
    pub claimants: BTreeMap<IpAddr, Vec<Claimant>>,
    /// The VIPs no node can announce, and why.
    pub unowned: BTreeMap<IpAddr, String>,
    /// Ports of the Services on the VIPs held here that are not forwarded, and why, by
    /// Service (`namespace/name`).
    pub port_problems: BTreeMap<String, BTreeSet<String>>,
    /// Every (VIP, protocol, port) a Service serves on the VIPs held here, in either mode:
    /// traffic to a held VIP on any other port is dropped (`guard`).
    pub exposed: BTreeSet<(IpAddr, Protocol, u16)>,
}

/// One Service on a VIP.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claimant {
    /// `namespace/name`.
    pub service: String,
    /// `ipMode: Proxy`: the forwarder carries the traffic; otherwise it only announces.
    pub forward: bool,
}

/// Something the shell should log once: a Service or address that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Notice {
    pub service: String,
    pub message: String,
}

/// Everything `plan` reads.
pub struct ClusterView<'a> {
    pub node_name: &'a str,
    pub class: &'a ClassFilter,
    pub services: &'a [Arc<Service>],
    pub nodes: &'a [Arc<Node>],
    pub slices: &'a [Arc<EndpointSlice>],
    /// The valid local pools; addresses outside them are not ferry's to announce.
    pub pools: &'a [Pool],
    /// Nodes whose forwarder heartbeat is fresh.
    pub live: &'a BTreeSet<String>,
    /// VIPs each node has said it cannot serve (its forwarding for them could not be set
    /// up): it is no candidate for them, so they go to another node.
    pub refused: &'a BTreeMap<String, BTreeSet<IpAddr>>,
}

/// One Service's claim on one VIP.
struct Claim {
    service: String,
    desired: DesiredLoadBalancer,
    forward: bool,
    proxy_protocol: bool,
}

/// Where a Service port without a NodePort (`allocateLoadBalancerNodePorts: false`) is
/// served: straight at its ready endpoints, `address:targetPort` from the EndpointSlices
/// (only this node's with `local`), which also saves the NodePort hop.
fn endpoint_backends(
    slices: &[Arc<EndpointSlice>],
    desired: &DesiredLoadBalancer,
    port: &ferry_model::PortSpec,
    local_node: Option<&str>,
) -> Vec<SocketAddr> {
    let wanted_name = port.name.clone().unwrap_or_default();
    let mut out: Vec<SocketAddr> = slices
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(desired.id.namespace.as_str())
                && s.labels().get(SERVICE_NAME_LABEL) == Some(&desired.id.name)
        })
        .flat_map(|s| {
            let target = s.ports.iter().flatten().find(|p| {
                p.name.clone().unwrap_or_default() == wanted_name
                    && p.protocol.as_deref().unwrap_or("TCP") == port.protocol.as_str()
            });
            let target = target
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok());
            s.endpoints
                .iter()
                .flatten()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .filter(|e| local_node.is_none_or(|me| e.node_name.as_deref() == Some(me)))
                .flat_map(|e| e.addresses.iter())
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .filter_map(move |ip| Some(SocketAddr::new(ip, target?)))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The node's address in `vip`'s family, or its first address when it has none.
fn node_ip_for(node: &NodeTarget, vip: &IpAddr) -> Option<IpAddr> {
    let family = IpFamily::of(vip);
    node.internal_ips
        .iter()
        .find(|ip| IpFamily::of(ip) == family)
        .or_else(|| node.internal_ips.first())
        .copied()
}

/// Why no node can announce `vip`, from every eligible node's standing.
fn no_owner(vip: &IpAddr, standings: &[announce::NodeStanding]) -> String {
    if standings.is_empty() {
        return format!("no node can announce {vip}: no eligible node");
    }
    let mut by_reason: BTreeMap<announce::Standing, usize> = BTreeMap::new();
    for s in standings {
        *by_reason.entry(s.standing).or_default() += 1;
    }
    let reasons: Vec<String> = by_reason
        .into_iter()
        .map(|(standing, n)| {
            let nodes = if n == 1 { "node" } else { "nodes" };
            match standing {
                announce::Standing::NoLiveForwarder => {
                    format!("{n} {nodes} without a live forwarder")
                }
                announce::Standing::Refused => {
                    format!(
                        "{n} {nodes} whose forwarder cannot serve it (see ForwardingFailed Events)"
                    )
                }
                announce::Standing::NoLocalEndpoints => {
                    format!("{n} {nodes} without a ready endpoint (externalTrafficPolicy: Local)")
                }
                announce::Standing::Candidate => format!("{n} {nodes} that could"),
            }
        })
        .collect();
    format!("no node can announce {vip}: {}", reasons.join(", "))
}

/// This node's plan.
pub fn plan(view: &ClusterView<'_>) -> (NodePlan, Vec<Notice>) {
    let targets = eligible_targets(view.nodes.iter().map(Arc::as_ref), |t| {
        !t.internal_ips.is_empty()
    });
    let mut notices = Vec::new();
    let mut claims: BTreeMap<IpAddr, Vec<Claim>> = BTreeMap::new();
    for svc in view.services {
        if !view.class.owns(svc) || svc.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // Kubernetes' default ipMode is VIP: only `Proxy` asks ferry to carry the traffic.
        let ingress: Vec<(IpAddr, bool)> = status_ingress(svc)
            .into_iter()
            .map(|(ip, mode)| (ip, mode == Some("Proxy")))
            .collect();
        if ingress.is_empty() {
            continue;
        }
        let id = id_of(svc);
        let service = id.to_string();
        let desired = match desired(svc, &targets) {
            Ok(d) => d,
            Err(err) => {
                notices.push(Notice {
                    service,
                    message: format!("not served: {err}"),
                });
                continue;
            }
        };
        let proxy_protocol = proxy_protocol_of(&desired.annotations).unwrap_or_else(|err| {
            notices.push(Notice {
                service: service.clone(),
                message: format!("{err}; forwarding without it"),
            });
            false
        });
        for (ip, forward) in ingress {
            if !view.pools.iter().any(|p| p.contains(&ip)) {
                notices.push(Notice {
                    service: service.clone(),
                    message: format!("ingress {ip} is in no local LoadBalancerPool; ignored"),
                });
                continue;
            }
            claims.entry(ip).or_default().push(Claim {
                service: service.clone(),
                desired: desired.clone(),
                forward,
                proxy_protocol,
            });
        }
    }

    let me = targets.iter().find(|t| t.name == view.node_name);
    let mut out = NodePlan::default();
    for (vip, claims) in claims {
        out.claimants.insert(
            vip,
            claims
                .iter()
                .map(|c| Claimant {
                    service: c.service.clone(),
                    forward: c.forward,
                })
                .collect(),
        );
        // With `Local`, only nodes with ready endpoints of every `Local` Service on the VIP.
        let local_endpoints = claims
            .iter()
            .filter(|c| matches!(c.desired.traffic_policy, TrafficPolicy::Local { .. }))
            .map(|c| {
                announce::nodes_with_ready_endpoints(
                    view.slices,
                    &c.desired.id.namespace,
                    &c.desired.id.name,
                )
            })
            .reduce(|a, b| a.intersection(&b).cloned().collect());
        let standings = announce::standings(
            &vip,
            &targets,
            &Candidacy {
                live: view.live,
                refused: view.refused,
                local_endpoints: local_endpoints.as_ref(),
            },
        );
        let Some(owner) = announce::owner_of(&standings) else {
            let why = no_owner(&vip, &standings);
            for claim in &claims {
                notices.push(Notice {
                    service: claim.service.clone(),
                    message: why.clone(),
                });
            }
            out.unowned.insert(vip, why);
            continue;
        };
        out.owners.insert(vip, owner.to_string());
        if owner != view.node_name {
            continue;
        }
        let Some(me) = me else { continue };
        out.announce.insert(vip);
        for claim in &claims {
            out.exposed.extend(
                claim
                    .desired
                    .ports
                    .iter()
                    .map(|p| (vip, p.protocol, p.port)),
            );
        }
        for claim in claims.iter().filter(|c| c.forward) {
            let before = notices.len();
            out.frontends.extend(frontends_of(
                claim,
                vip,
                me,
                &targets,
                view.slices,
                &mut notices,
            ));
            // What `frontends_of` noticed is about ports of this Service it does not forward.
            for n in notices.iter().skip(before) {
                out.port_problems
                    .entry(n.service.clone())
                    .or_default()
                    .insert(n.message.clone());
            }
        }
    }
    out.frontends.sort();
    notices.sort();
    notices.dedup();
    (out, notices)
}

fn frontends_of(
    claim: &Claim,
    vip: IpAddr,
    me: &NodeTarget,
    targets: &[NodeTarget],
    slices: &[Arc<EndpointSlice>],
    notices: &mut Vec<Notice>,
) -> Vec<Frontend> {
    let d = &claim.desired;
    let (local, health) = match d.traffic_policy {
        TrafficPolicy::Local {
            health_check_node_port: Some(port),
        } => (
            true,
            node_ip_for(me, &vip).map(|ip| HealthCheck::Http { ip, port }),
        ),
        TrafficPolicy::Local { .. } => (true, Some(HealthCheck::Connect)),
        TrafficPolicy::Cluster => (false, Some(HealthCheck::Connect)),
    };
    let Some(health) = health else {
        return Vec::new();
    };
    let nodes: Vec<&NodeTarget> = if local {
        vec![me]
    } else {
        targets.iter().collect()
    };
    let affinity = match d.session_affinity {
        SessionAffinity::ClientIp { timeout } => Some(timeout),
        SessionAffinity::None => None,
    };
    let mut out = Vec::new();
    for port in &d.ports {
        if port.protocol == Protocol::Sctp {
            notices.push(Notice {
                service: claim.service.clone(),
                message: format!(
                    "port {}/SCTP is not forwarded (TCP and UDP only)",
                    port.port
                ),
            });
            continue;
        }
        let backends = match port.node_port {
            Some(node_port) => {
                let mut backends: Vec<SocketAddr> = nodes
                    .iter()
                    .filter_map(|n| node_ip_for(n, &vip))
                    .map(|ip| SocketAddr::new(ip, node_port))
                    .collect();
                backends.sort();
                backends.dedup();
                backends
            }
            None => {
                let backends =
                    endpoint_backends(slices, d, port, local.then_some(me.name.as_str()));
                if backends.is_empty() {
                    notices.push(Notice {
                        service: claim.service.clone(),
                        message: format!(
                            "port {}/{} has no NodePort (allocateLoadBalancerNodePorts: false) and no ready endpoints{} to send it to",
                            port.port,
                            port.protocol,
                            if local { " on this node" } else { "" }
                        ),
                    });
                    continue;
                }
                backends
            }
        };
        // Endpoints are checked themselves; a NodePort through the check the policy asks.
        let health = if port.node_port.is_none() {
            HealthCheck::Connect
        } else {
            health
        };
        out.push(Frontend {
            service: claim.service.clone(),
            vip,
            port: port.port,
            protocol: port.protocol,
            backends,
            health: if port.protocol == Protocol::Udp && health == HealthCheck::Connect {
                HealthCheck::None
            } else {
                health
            },
            affinity,
            proxy_protocol: claim.proxy_protocol && port.protocol == Protocol::Tcp,
            source_ranges: d.source_ranges.clone(),
            local,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::fixtures::{ServiceBuilder, endpoint_slice, node, service};

    const VIP: &str = "192.0.2.10";

    struct World {
        services: Vec<Arc<Service>>,
        nodes: Vec<Arc<Node>>,
        slices: Vec<Arc<EndpointSlice>>,
        pools: Vec<Pool>,
        live: BTreeSet<String>,
        refused: BTreeMap<String, BTreeSet<IpAddr>>,
        class: ClassFilter,
    }

    fn world(services: Vec<Service>) -> World {
        World {
            services: services.into_iter().map(Arc::new).collect(),
            nodes: ["n1", "n2", "n3"]
                .iter()
                .enumerate()
                .map(|(i, n)| Arc::new(node(n).ip(&format!("10.0.0.{}", i + 1)).build()))
                .collect(),
            slices: Vec::new(),
            pools: vec![Pool::new("default", &["192.0.2.0/24"]).unwrap()],
            live: ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect(),
            refused: BTreeMap::new(),
            class: ClassFilter {
                class: "ferry.dev/local".into(),
                default_class: true,
            },
        }
    }

    impl World {
        fn plan_for(&self, node: &str) -> (NodePlan, Vec<Notice>) {
            plan(&ClusterView {
                node_name: node,
                class: &self.class,
                services: &self.services,
                nodes: &self.nodes,
                slices: &self.slices,
                pools: &self.pools,
                live: &self.live,
                refused: &self.refused,
            })
        }

        /// The nodes that would hold `vip`, computed independently on each node.
        fn holders(&self, vip: &str) -> Vec<String> {
            let vip: IpAddr = vip.parse().unwrap();
            ["n1", "n2", "n3"]
                .iter()
                .filter(|n| self.plan_for(n).0.announce.contains(&vip))
                .map(|n| n.to_string())
                .collect()
        }
    }

    fn web() -> ServiceBuilder {
        service("web").lb().port(80, 30080).ingress(VIP, "Proxy")
    }

    #[test]
    fn exactly_one_node_holds_a_vip_and_forwards_to_every_node() {
        let w = world(vec![web().build()]);
        let holders = w.holders(VIP);
        assert_eq!(holders.len(), 1, "{holders:?}");
        let (p, notices) = w.plan_for(&holders[0]);
        assert!(notices.is_empty(), "{notices:?}");
        assert_eq!(p.frontends.len(), 1);
        let f = &p.frontends[0];
        assert_eq!((f.port, f.protocol, f.local), (80, Protocol::Tcp, false));
        let backends: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
        assert_eq!(
            backends,
            ["10.0.0.1:30080", "10.0.0.2:30080", "10.0.0.3:30080"]
        );
        assert_eq!(p.owners[&VIP.parse::<IpAddr>().unwrap()], holders[0]);
    }

    #[test]
    fn a_dead_forwarder_loses_its_vips_to_a_live_one() {
        let mut w = world(vec![web().build()]);
        let first = w.holders(VIP).remove(0);
        w.live.remove(&first);
        let second = w.holders(VIP);
        assert_eq!(second.len(), 1);
        assert_ne!(second[0], first);
        // The dead node still receives traffic as a backend: its NodePort does not need a
        // forwarder, and health checks take it out if it is really gone.
        let (p, _) = w.plan_for(&second[0]);
        assert_eq!(p.frontends[0].backends.len(), 3);
    }

    #[test]
    fn a_node_that_cannot_serve_a_vip_hands_it_to_another() {
        let mut w = world(vec![web().build()]);
        let first = w.holders(VIP).remove(0);
        w.refused.insert(
            first.clone(),
            BTreeSet::from([VIP.parse::<IpAddr>().unwrap()]),
        );
        let second = w.holders(VIP);
        assert_eq!(second.len(), 1, "still exactly one holder");
        assert_ne!(second[0], first);
        // Everyone refusing: nobody holds it, and the Service is told why.
        for n in ["n1", "n2", "n3"] {
            w.refused
                .insert(n.into(), BTreeSet::from([VIP.parse::<IpAddr>().unwrap()]));
        }
        assert!(w.holders(VIP).is_empty());
        let (_, notices) = w.plan_for("n1");
        let why = format!(
            "no node can announce {VIP}: 3 nodes whose forwarder cannot serve it (see ForwardingFailed Events)"
        );
        assert!(notices.iter().any(|n| n.message == why), "{notices:?}");
        let (p, _) = w.plan_for("n2");
        assert_eq!(p.unowned.get(&VIP.parse::<IpAddr>().unwrap()), Some(&why));
        // One node without a live forwarder besides: both reasons are counted.
        w.live.remove("n3");
        let (_, notices) = w.plan_for("n1");
        assert!(
            notices.iter().any(|n| n.message.ends_with(
                "1 node without a live forwarder, 2 nodes whose forwarder cannot serve it (see ForwardingFailed Events)"
            )),
            "{notices:?}"
        );
    }

    #[test]
    fn vip_mode_is_announced_but_not_forwarded() {
        let w = world(vec![
            service("web")
                .lb()
                .port(80, 30080)
                .ingress(VIP, "VIP")
                .build(),
        ]);
        let holder = w.holders(VIP).remove(0);
        let (p, _) = w.plan_for(&holder);
        assert!(p.announce.contains(&VIP.parse().unwrap()));
        assert!(p.frontends.is_empty());
    }

    #[test]
    fn local_policy_is_held_only_by_a_node_with_ready_endpoints_and_forwards_to_itself() {
        let mut w = world(vec![web().local(31999).build()]);
        assert!(w.holders(VIP).is_empty());
        let (_, notices) = w.plan_for("n1");
        assert!(
            notices[0]
                .message
                .contains("3 nodes without a ready endpoint (externalTrafficPolicy: Local)"),
            "{notices:?}"
        );
        w.slices = vec![Arc::new(endpoint_slice(
            "web",
            &[("10.244.2.5", "n2", true), ("10.244.3.5", "n3", false)],
        ))];
        assert_eq!(w.holders(VIP), ["n2"]);
        let (p, _) = w.plan_for("n2");
        let f = &p.frontends[0];
        assert!(f.local);
        assert_eq!(
            f.backends,
            ["10.0.0.2:30080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            f.health,
            HealthCheck::Http {
                ip: "10.0.0.2".parse().unwrap(),
                port: 31999
            }
        );
    }

    #[test]
    fn tcp_and_udp_on_one_port_and_several_ports() {
        let w = world(vec![
            service("dns")
                .lb()
                .port(53, 30053)
                .udp_port(53, 30053)
                .port(8080, 30081)
                .ingress(VIP, "Proxy")
                .build(),
        ]);
        let holder = w.holders(VIP).remove(0);
        let keys: Vec<_> = w
            .plan_for(&holder)
            .0
            .frontends
            .iter()
            .map(Frontend::key)
            .collect();
        let vip: IpAddr = VIP.parse().unwrap();
        assert_eq!(
            keys,
            [
                (vip, 53, Protocol::Tcp),
                (vip, 53, Protocol::Udp),
                (vip, 8080, Protocol::Tcp)
            ]
        );
    }

    #[test]
    fn affinity_proxy_protocol_and_source_ranges_reach_the_frontend() {
        let w = world(vec![
            web()
                .client_ip_affinity(60)
                .source_range("198.51.100.0/24")
                .annotate("ferry.dev/proxy-protocol", "v2")
                .build(),
        ]);
        let holder = w.holders(VIP).remove(0);
        let f = w.plan_for(&holder).0.frontends.remove(0);
        assert_eq!(f.affinity, Some(Duration::from_secs(60)));
        assert!(f.proxy_protocol);
        assert!(f.admits(&"198.51.100.7".parse().unwrap()));
        assert!(!f.admits(&"203.0.113.7".parse().unwrap()));
    }

    #[test]
    fn an_address_in_no_pool_is_ignored_with_a_notice() {
        let w = world(vec![
            service("web")
                .lb()
                .port(80, 30080)
                .ingress("203.0.113.9", "Proxy")
                .build(),
        ]);
        for n in ["n1", "n2", "n3"] {
            let (p, notices) = w.plan_for(n);
            assert!(p.announce.is_empty());
            assert_eq!(notices.len(), 1);
            assert!(notices[0].message.contains("no local LoadBalancerPool"));
        }
    }

    #[test]
    fn other_classes_deleting_and_unready_services_are_not_served() {
        let w = world(vec![
            service("theirs")
                .lb()
                .class("example.com/lb")
                .port(80, 30080)
                .ingress(VIP, "Proxy")
                .build(),
            service("gone")
                .lb()
                .port(80, 30081)
                .ingress("192.0.2.11", "Proxy")
                .deleting()
                .build(),
            service("pending").lb().port(80, 30082).build(),
        ]);
        for n in ["n1", "n2", "n3"] {
            assert_eq!(w.plan_for(n), (NodePlan::default(), vec![]));
        }
    }

    #[test]
    fn excluded_nodes_neither_hold_vips_nor_receive_traffic() {
        let mut w = world(vec![web().build()]);
        w.nodes[0] = Arc::new(
            node("n1")
                .ip("10.0.0.1")
                .label(ferry_model::eligibility::EXCLUDE_LABEL, "")
                .build(),
        );
        let holder = w.holders(VIP).remove(0);
        assert_ne!(holder, "n1");
        let f = w.plan_for(&holder).0.frontends.remove(0);
        assert_eq!(f.backends.len(), 2);
    }

    #[test]
    fn shared_vips_have_one_owner_for_all_their_services() {
        let w = world(vec![
            web().annotate("ferry.dev/allow-shared-ip", "k").build(),
            service("dns")
                .lb()
                .udp_port(53, 30053)
                .annotate("ferry.dev/allow-shared-ip", "k")
                .ingress(VIP, "Proxy")
                .build(),
        ]);
        let holders = w.holders(VIP);
        assert_eq!(holders.len(), 1);
        assert_eq!(w.plan_for(&holders[0]).0.frontends.len(), 2);
    }

    #[test]
    fn a_service_without_node_ports_is_served_straight_at_its_ready_endpoints() {
        let mut w = world(vec![
            service("web")
                .lb()
                .port(80, 0)
                .ingress(VIP, "Proxy")
                .build(),
        ]);
        let mut slice = endpoint_slice(
            "web",
            &[
                ("10.244.1.5", "n1", true),
                ("10.244.2.5", "n2", true),
                ("10.244.3.5", "n3", false),
            ],
        );
        slice.ports = Some(vec![k8s_openapi::api::discovery::v1::EndpointPort {
            name: Some("tcp-80".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]);
        w.slices = vec![Arc::new(slice)];
        let holder = w.holders(VIP).remove(0);
        let (p, notices) = w.plan_for(&holder);
        assert!(notices.is_empty(), "{notices:?}");
        let backends: Vec<String> = p.frontends[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            backends,
            ["10.244.1.5:8080", "10.244.2.5:8080"],
            "ready ones only"
        );
        assert_eq!(p.frontends[0].health, HealthCheck::Connect);
    }

    #[test]
    fn sctp_and_missing_node_ports_are_skipped_with_a_notice() {
        let w = world(vec![
            service("web")
                .lb()
                .sctp_port(9, 30009)
                .port(80, 0)
                .ingress(VIP, "Proxy")
                .build(),
        ]);
        let holder = w.holders(VIP).remove(0);
        let (p, notices) = w.plan_for(&holder);
        assert!(p.frontends.is_empty());
        assert_eq!(notices.len(), 2, "{notices:?}");
    }
}
