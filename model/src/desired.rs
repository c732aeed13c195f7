//! The pure function at the heart of the operator: from a Service and the eligible nodes to
//! the `DesiredLoadBalancer`, or a reason the Service cannot be served as written. Generic
//! annotations (requested addresses, pool, sharing key, source ranges) are parsed here,
//! including the well-known MetalLB and upstream spellings; provider-specific ones are left
//! to the provider.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::{
    DesiredLoadBalancer, IpFamily, IpFamilyPolicy, LoadBalancerId, NodeTarget, PortSpec, Protocol,
    SessionAffinity, TrafficPolicy,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

pub const IPS_ANNOTATION: &str = "ferry.dev/load-balancer-ips";
pub const METALLB_IPS_ANNOTATION: &str = "metallb.io/loadBalancerIPs";
pub const SHARED_IP_ANNOTATION: &str = "ferry.dev/allow-shared-ip";
pub const METALLB_SHARED_IP_ANNOTATION: &str = "metallb.io/allow-shared-ip";
pub const POOL_ANNOTATION: &str = "ferry.dev/address-pool";
pub const METALLB_POOL_ANNOTATION: &str = "metallb.io/address-pool";
/// MetalLB's older prefix, still on many Services in the wild; read like `metallb.io/`.
pub const METALLB_LEGACY_IPS_ANNOTATION: &str = "metallb.universe.tf/loadBalancerIPs";
pub const METALLB_LEGACY_SHARED_IP_ANNOTATION: &str = "metallb.universe.tf/allow-shared-ip";
pub const METALLB_LEGACY_POOL_ANNOTATION: &str = "metallb.universe.tf/address-pool";
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// Why a Service cannot be served as written; `reason` is CamelCase for the condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidService {
    pub reason: &'static str,
    pub message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> InvalidService {
    InvalidService {
        reason,
        message: message.into(),
    }
}

/// Annotation asking the forwarder to prepend a PROXY protocol header to each forwarded
/// connection (`v2`), so a backend behind the userspace path learns the client's address.
pub const PROXY_PROTOCOL_ANNOTATION: &str = "ferry.dev/proxy-protocol";

/// Whether the Service asks for PROXY protocol v2 on forwarded connections.
pub fn proxy_protocol_of(annotations: &BTreeMap<String, String>) -> Result<bool, InvalidService> {
    match annotations.get(PROXY_PROTOCOL_ANNOTATION).map(|s| s.trim()) {
        None | Some("") | Some("none") => Ok(false),
        Some("v2") => Ok(true),
        Some(other) => Err(invalid(
            "InvalidAnnotation",
            format!(
                "annotation {PROXY_PROTOCOL_ANNOTATION}: {other:?} is not \"v2\" (or \"none\")"
            ),
        )),
    }
}

pub fn id_of(svc: &Service) -> LoadBalancerId {
    LoadBalancerId {
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
    }
}

/// The value of the first of `keys` present, refusing two spellings that disagree.
fn annotation<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&str],
) -> Result<Option<(&'a str, &'a str)>, InvalidService> {
    let mut found: Option<(&str, &str)> = None;
    for key in keys {
        if let Some((k, v)) = annotations.get_key_value(*key) {
            match found {
                Some((fk, fv)) if fv.trim() != v.trim() => {
                    return Err(invalid(
                        "ConflictingAnnotations",
                        format!("annotations {fk} and {k} disagree ({fv:?} vs {v:?})"),
                    ));
                }
                Some(_) => {}
                None => found = Some((k.as_str(), v.as_str())),
            }
        }
    }
    Ok(found)
}

fn non_empty(found: Option<(&str, &str)>) -> Result<Option<String>, InvalidService> {
    match found {
        None => Ok(None),
        Some((key, v)) if v.trim().is_empty() => Err(invalid(
            "InvalidAnnotation",
            format!("annotation {key} is empty"),
        )),
        Some((_, v)) => Ok(Some(v.trim().to_string())),
    }
}

fn requested_ips(svc: &Service, families: &[IpFamily]) -> Result<Vec<IpAddr>, InvalidService> {
    let annotations = svc.annotations();
    let from_annotation = match annotation(
        annotations,
        &[
            IPS_ANNOTATION,
            METALLB_IPS_ANNOTATION,
            METALLB_LEGACY_IPS_ANNOTATION,
        ],
    )? {
        None => None,
        Some((key, value)) => {
            let ips = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<IpAddr>().map_err(|_| {
                        invalid(
                            "InvalidAnnotation",
                            format!("annotation {key}: {s:?} is not an IP address"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ips.is_empty() {
                return Err(invalid(
                    "InvalidAnnotation",
                    format!("annotation {key} is empty"),
                ));
            }
            Some(ips)
        }
    };
    let from_spec = match svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(s) => Some(vec![s.parse::<IpAddr>().map_err(|_| {
            invalid(
                "InvalidLoadBalancerIP",
                format!("spec.loadBalancerIP {s:?} is not an IP address"),
            )
        })?]),
    };
    let ips = match (from_spec, from_annotation) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(
                "ConflictingIPRequest",
                format!(
                    "spec.loadBalancerIP {} and the load-balancer-ips annotation ({}) disagree",
                    a[0],
                    b.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ));
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => Vec::new(),
    };
    for (i, ip) in ips.iter().enumerate() {
        let family = IpFamily::of(ip);
        if !families.contains(&family) {
            return Err(invalid(
                "IPFamilyMismatch",
                format!(
                    "{ip} is an {family} address but the Service's ipFamilies are {}",
                    families
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ));
        }
        if ips[..i].iter().any(|other| IpFamily::of(other) == family) {
            return Err(invalid(
                "InvalidAnnotation",
                format!("more than one {family} address requested"),
            ));
        }
    }
    Ok(ips)
}

fn source_ranges(svc: &Service) -> Result<Vec<IpNet>, InvalidService> {
    let spec_ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default();
    let (what, texts): (String, Vec<String>) = if !spec_ranges.is_empty() {
        ("spec.loadBalancerSourceRanges".into(), spec_ranges)
    } else if let Some(v) = svc.annotations().get(SOURCE_RANGES_ANNOTATION) {
        (
            format!("annotation {SOURCE_RANGES_ANNOTATION}"),
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    } else {
        return Ok(Vec::new());
    };
    texts
        .iter()
        .map(|t| {
            t.trim()
                .parse::<IpNet>()
                .map_err(|_| invalid("InvalidSourceRange", format!("{what}: {t:?} is not a CIDR")))
        })
        .collect()
}

/// The desired balancer of a Service this operator owns.
pub fn desired(
    svc: &Service,
    targets: &[NodeTarget],
) -> Result<DesiredLoadBalancer, InvalidService> {
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| invalid("NoPorts", "the Service has no spec"))?;
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(invalid("NoPorts", "the Service has no ports"));
    }
    let ports = ports
        .iter()
        .map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => {
                    return Err(invalid(
                        "UnsupportedProtocol",
                        format!("port {}: unknown protocol {other:?}", p.port),
                    ));
                }
            };
            let port = u16::try_from(p.port)
                .map_err(|_| invalid("InvalidPort", format!("port {} is out of range", p.port)))?;
            let node_port = p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0);
            Ok(PortSpec {
                name: p.name.clone(),
                protocol,
                port,
                node_port,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut ip_families = Vec::new();
    for f in spec.ip_families.as_deref().unwrap_or_default() {
        let family = match f.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            other => {
                return Err(invalid(
                    "InvalidIPFamily",
                    format!("unknown IP family {other:?}"),
                ));
            }
        };
        if !ip_families.contains(&family) {
            ip_families.push(family);
        }
    }
    if ip_families.is_empty() {
        ip_families.push(IpFamily::V4);
    }
    let ip_family_policy = match spec.ip_family_policy.as_deref() {
        Some("PreferDualStack") => IpFamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => IpFamilyPolicy::RequireDualStack,
        _ => IpFamilyPolicy::SingleStack,
    };

    let requested_ips = requested_ips(svc, &ip_families)?;
    let annotations = svc.annotations();
    let sharing_key = non_empty(annotation(
        annotations,
        &[
            SHARED_IP_ANNOTATION,
            METALLB_SHARED_IP_ANNOTATION,
            METALLB_LEGACY_SHARED_IP_ANNOTATION,
        ],
    )?)?;
    let requested_pool = non_empty(annotation(
        annotations,
        &[
            POOL_ANNOTATION,
            METALLB_POOL_ANNOTATION,
            METALLB_LEGACY_POOL_ANNOTATION,
        ],
    )?)?;

    let traffic_policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local {
            health_check_node_port: spec
                .health_check_node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0),
        },
        _ => TrafficPolicy::Cluster,
    };
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIp {
            timeout: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
        },
        _ => SessionAffinity::None,
    };

    Ok(DesiredLoadBalancer {
        id: id_of(svc),
        ports,
        targets: targets.to_vec(),
        ip_families,
        ip_family_policy,
        requested_ips,
        requested_pool,
        sharing_key,
        source_ranges: source_ranges(svc)?,
        traffic_policy,
        session_affinity,
        service_labels: svc.labels().clone(),
        // ferry's own bookkeeping is not part of what the user asked for.
        annotations: annotations
            .iter()
            .filter(|(k, _)| k.as_str() != crate::class::PROVISIONED_BY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eligibility::target_of;
    use crate::fixtures::{node, service};

    fn reason(svc: &Service) -> &'static str {
        desired(svc, &[]).unwrap_err().reason
    }

    #[test]
    fn maps_ports_policy_affinity_and_targets() {
        let svc = service("web")
            .lb()
            .port(80, 30080)
            .udp_port(53, 30053)
            .local(32000)
            .client_ip_affinity(60)
            .source_range("192.0.2.0/24")
            .build();
        let targets = vec![target_of(&node("n1").ip("10.0.0.1").build()).unwrap()];
        let d = desired(&svc, &targets).unwrap();
        assert_eq!(d.id.name, "web");
        assert_eq!(d.ports.len(), 2);
        assert_eq!(d.ports[1].protocol, Protocol::Udp);
        assert_eq!(d.ports[1].node_port, Some(30053));
        assert_eq!(
            d.traffic_policy,
            TrafficPolicy::Local {
                health_check_node_port: Some(32000)
            }
        );
        assert_eq!(
            d.session_affinity,
            SessionAffinity::ClientIp {
                timeout: Duration::from_secs(60)
            }
        );
        assert_eq!(
            d.source_ranges,
            vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(d.targets, targets);
        assert_eq!(d.ip_families, vec![IpFamily::V4]);
    }

    #[test]
    fn requested_addresses_from_spec_and_both_annotation_spellings() {
        let s = service("a")
            .lb()
            .port(80, 1)
            .load_balancer_ip("192.0.2.5")
            .build();
        assert_eq!(
            desired(&s, &[]).unwrap().requested_ips,
            vec!["192.0.2.5".parse::<IpAddr>().unwrap()]
        );
        let s = service("a")
            .lb()
            .port(80, 1)
            .annotate(METALLB_IPS_ANNOTATION, "192.0.2.6")
            .build();
        assert_eq!(
            desired(&s, &[]).unwrap().requested_ips,
            vec!["192.0.2.6".parse::<IpAddr>().unwrap()]
        );
        let s = service("a")
            .lb()
            .port(80, 1)
            .dual_stack()
            .annotate(IPS_ANNOTATION, "192.0.2.7, 2001:db8::7")
            .build();
        assert_eq!(desired(&s, &[]).unwrap().requested_ips.len(), 2);
        let s = service("a")
            .lb()
            .port(80, 1)
            .annotate(SHARED_IP_ANNOTATION, "dns")
            .annotate(METALLB_POOL_ANNOTATION, "edge")
            .build();
        let d = desired(&s, &[]).unwrap();
        assert_eq!(d.sharing_key.as_deref(), Some("dns"));
        assert_eq!(d.requested_pool.as_deref(), Some("edge"));
        // MetalLB's older prefix means the same, and must agree with the newer one.
        let s = service("a")
            .lb()
            .port(80, 1)
            .annotate(METALLB_LEGACY_IPS_ANNOTATION, "192.0.2.8")
            .annotate(METALLB_LEGACY_SHARED_IP_ANNOTATION, "web")
            .annotate(METALLB_LEGACY_POOL_ANNOTATION, "lan")
            .build();
        let d = desired(&s, &[]).unwrap();
        assert_eq!(
            d.requested_ips,
            vec!["192.0.2.8".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(d.sharing_key.as_deref(), Some("web"));
        assert_eq!(d.requested_pool.as_deref(), Some("lan"));
        let s = service("a")
            .lb()
            .port(80, 1)
            .annotate(METALLB_LEGACY_POOL_ANNOTATION, "lan")
            .annotate(METALLB_POOL_ANNOTATION, "edge")
            .build();
        assert_eq!(reason(&s), "ConflictingAnnotations");
    }

    #[test]
    fn bad_input_has_a_reason_a_user_can_act_on() {
        assert_eq!(
            reason(&service("a").lb().load_balancer_ip("192.0.2.5").build()),
            "NoPorts"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .load_balancer_ip("not-an-ip")
                    .build()
            ),
            "InvalidLoadBalancerIP"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .load_balancer_ip("2001:db8::1")
                    .build()
            ),
            "IPFamilyMismatch"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .annotate(IPS_ANNOTATION, "10.0.0.1,banana")
                    .build()
            ),
            "InvalidAnnotation"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .annotate(IPS_ANNOTATION, "10.0.0.1,10.0.0.2")
                    .build()
            ),
            "InvalidAnnotation"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .annotate(SHARED_IP_ANNOTATION, " ")
                    .build()
            ),
            "InvalidAnnotation"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .annotate(SHARED_IP_ANNOTATION, "x")
                    .annotate(METALLB_SHARED_IP_ANNOTATION, "y")
                    .build()
            ),
            "ConflictingAnnotations"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .load_balancer_ip("10.0.0.1")
                    .annotate(IPS_ANNOTATION, "10.0.0.2")
                    .build()
            ),
            "ConflictingIPRequest"
        );
        assert_eq!(
            reason(
                &service("a")
                    .lb()
                    .port(80, 1)
                    .source_range("10.0.0.0/33")
                    .build()
            ),
            "InvalidSourceRange"
        );
        assert_eq!(
            reason(&service("a").lb().port(80, 1).protocol("QUIC").build()),
            "UnsupportedProtocol"
        );
        let msg = desired(
            &service("a")
                .lb()
                .port(80, 1)
                .load_balancer_ip("not-an-ip")
                .build(),
            &[],
        )
        .unwrap_err()
        .message;
        assert!(msg.contains("not-an-ip"), "{msg}");
    }
}
