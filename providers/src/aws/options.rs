//! The upstream `service.beta.kubernetes.io/aws-load-balancer-*` annotations, parsed into
//! `AwsOptions`. Pure: every malformed or unknown value is an `InvalidInput` error that names
//! the annotation, so the Service's condition tells the user what to fix. Annotations under
//! the prefix that ferry does not implement are refused too (silently ignoring, say, a TLS
//! certificate would leave a user believing traffic is encrypted).

use std::collections::BTreeMap;

use crate::ProviderError;

pub const PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// Reason used for every annotation error.
pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scheme {
    #[default]
    InternetFacing,
    Internal,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InternetFacing => "internet-facing",
            Self::Internal => "internal",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AddressType {
    #[default]
    Ipv4,
    Dualstack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthProtocol {
    Tcp,
    Http,
    Https,
}

impl HealthProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Http => "HTTP",
            Self::Https => "HTTPS",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthPort {
    TrafficPort,
    Port(u16),
}

/// Health-check settings the user overrode; `None` keeps ferry's default for the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthOverrides {
    pub protocol: Option<HealthProtocol>,
    pub port: Option<HealthPort>,
    pub path: Option<String>,
    pub interval_seconds: Option<i32>,
    pub timeout_seconds: Option<i32>,
    pub healthy_threshold: Option<i32>,
    pub unhealthy_threshold: Option<i32>,
}

/// How the subnets of the balancer are chosen.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SubnetChoice {
    /// By the `kubernetes.io/role/elb` (or `internal-elb`) and cluster tags.
    #[default]
    Discover,
    /// Subnet ids (`subnet-…`) and `Name` tags, in the order given.
    Named(Vec<String>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AwsOptions {
    pub scheme: Scheme,
    pub subnets: SubnetChoice,
    pub eip_allocations: Vec<String>,
    pub health: HealthOverrides,
    pub target_group_attributes: BTreeMap<String, String>,
    pub additional_tags: BTreeMap<String, String>,
    pub cross_zone: bool,
    pub address_type: Option<AddressType>,
    pub proxy_protocol: bool,
}

/// Every annotation ferry reads, without the prefix.
pub const SUPPORTED: &[&str] = &[
    "scheme",
    "internal",
    "subnets",
    "eip-allocations",
    "healthcheck-protocol",
    "healthcheck-port",
    "healthcheck-path",
    "healthcheck-interval",
    "healthcheck-timeout",
    "healthcheck-healthy-threshold",
    "healthcheck-unhealthy-threshold",
    "target-group-attributes",
    "additional-resource-tags",
    "cross-zone-load-balancing-enabled",
    "ip-address-type",
    "proxy-protocol",
    "type",
    "nlb-target-type",
];

fn invalid(suffix: &str, value: &str, expected: &str) -> ProviderError {
    ProviderError::invalid(
        INVALID_ANNOTATION,
        format!("annotation {PREFIX}{suffix}: {value:?} is not valid; expected {expected}"),
    )
}

fn boolean(suffix: &str, value: &str) -> Result<bool, ProviderError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(suffix, value, "true or false")),
    }
}

fn number(suffix: &str, value: &str, min: i32, max: i32) -> Result<i32, ProviderError> {
    value
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            invalid(
                suffix,
                value,
                &format!("a whole number from {min} to {max}"),
            )
        })
}

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `k=v,k2=v2` with non-empty keys.
fn pairs(suffix: &str, value: &str) -> Result<BTreeMap<String, String>, ProviderError> {
    let mut out = BTreeMap::new();
    for item in list(value) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(invalid(suffix, value, "comma-separated key=value pairs"));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.chars().any(char::is_whitespace) {
            return Err(invalid(suffix, value, "comma-separated key=value pairs"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Parses the AWS annotations of a Service.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<AwsOptions, ProviderError> {
    let mut o = AwsOptions::default();
    let mut scheme_from_scheme = None;
    let mut internal = None;
    for (key, value) in annotations {
        let Some(suffix) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let v = value.trim();
        match suffix {
            "scheme" => {
                scheme_from_scheme = Some(match v {
                    "internal" => Scheme::Internal,
                    "internet-facing" => Scheme::InternetFacing,
                    _ => return Err(invalid(suffix, value, "internal or internet-facing")),
                })
            }
            // Upstream also took a CIDR here ("0.0.0.0/0") to mean true.
            "internal" => {
                internal = Some(match v {
                    "0.0.0.0/0" => true,
                    _ => boolean(suffix, value)?,
                })
            }
            "subnets" => {
                let names = list(v);
                if names.is_empty() {
                    return Err(invalid(suffix, value, "subnet ids or Name tags"));
                }
                o.subnets = SubnetChoice::Named(names);
            }
            "eip-allocations" => {
                let ids = list(v);
                if ids.is_empty() || ids.iter().any(|id| !id.starts_with("eipalloc-")) {
                    return Err(invalid(suffix, value, "comma-separated eipalloc-… ids"));
                }
                o.eip_allocations = ids;
            }
            "healthcheck-protocol" => {
                o.health.protocol = Some(match v.to_ascii_uppercase().as_str() {
                    "TCP" => HealthProtocol::Tcp,
                    "HTTP" => HealthProtocol::Http,
                    "HTTPS" => HealthProtocol::Https,
                    _ => return Err(invalid(suffix, value, "TCP, HTTP or HTTPS")),
                })
            }
            "healthcheck-port" => {
                o.health.port = Some(if v == "traffic-port" {
                    HealthPort::TrafficPort
                } else {
                    HealthPort::Port(
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| invalid(suffix, value, "traffic-port or 1-65535"))?,
                    )
                })
            }
            "healthcheck-path" => {
                if !v.starts_with('/') || v.len() > 1024 || v.chars().any(char::is_whitespace) {
                    return Err(invalid(suffix, value, "a path starting with /"));
                }
                o.health.path = Some(v.to_string());
            }
            "healthcheck-interval" => o.health.interval_seconds = Some(number(suffix, v, 5, 300)?),
            "healthcheck-timeout" => o.health.timeout_seconds = Some(number(suffix, v, 2, 120)?),
            "healthcheck-healthy-threshold" => {
                o.health.healthy_threshold = Some(number(suffix, v, 2, 10)?)
            }
            "healthcheck-unhealthy-threshold" => {
                o.health.unhealthy_threshold = Some(number(suffix, v, 2, 10)?)
            }
            "target-group-attributes" => o.target_group_attributes = pairs(suffix, v)?,
            "additional-resource-tags" => {
                let tags = pairs(suffix, v)?;
                if let Some(k) = tags
                    .keys()
                    .find(|k| k.starts_with("aws:") || k.starts_with("ferry.dev/"))
                {
                    return Err(invalid(
                        suffix,
                        value,
                        &format!("tags without the reserved prefix of {k:?}"),
                    ));
                }
                o.additional_tags = tags;
            }
            "cross-zone-load-balancing-enabled" => o.cross_zone = boolean(suffix, v)?,
            "ip-address-type" => {
                o.address_type = Some(match v {
                    "ipv4" => AddressType::Ipv4,
                    "dualstack" => AddressType::Dualstack,
                    _ => return Err(invalid(suffix, value, "ipv4 or dualstack")),
                })
            }
            // Upstream's only value is "*" (every listener).
            "proxy-protocol" => {
                if v != "*" {
                    return Err(invalid(suffix, value, "\"*\""));
                }
                o.proxy_protocol = true;
            }
            // ferry always builds an NLB with instance targets; these say the same.
            "type" => {
                if !matches!(v, "nlb" | "external") {
                    return Err(invalid(
                        suffix,
                        value,
                        "nlb (ferry builds Network Load Balancers only)",
                    ));
                }
            }
            "nlb-target-type" => {
                if v != "instance" {
                    return Err(invalid(
                        suffix,
                        value,
                        "instance (ferry registers instance targets)",
                    ));
                }
            }
            _ => {
                return Err(ProviderError::invalid(
                    INVALID_ANNOTATION,
                    format!(
                        "annotation {key} is not supported by ferry's AWS provider (supported: {})",
                        SUPPORTED.join(", ")
                    ),
                ));
            }
        }
    }
    o.scheme = match (scheme_from_scheme, internal) {
        (Some(s), Some(i)) if (s == Scheme::Internal) != i => {
            return Err(ProviderError::invalid(
                INVALID_ANNOTATION,
                format!("annotations {PREFIX}scheme and {PREFIX}internal disagree"),
            ));
        }
        (Some(s), _) => s,
        (None, Some(true)) => Scheme::Internal,
        _ => Scheme::InternetFacing,
    };
    if o.scheme == Scheme::Internal && !o.eip_allocations.is_empty() {
        return Err(ProviderError::invalid(
            INVALID_ANNOTATION,
            format!("annotation {PREFIX}eip-allocations needs an internet-facing balancer"),
        ));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<AwsOptions, ProviderError> {
        parse(
            &pairs
                .iter()
                .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
                .collect(),
        )
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        match with(pairs) {
            Err(ProviderError::InvalidInput { reason, message }) => {
                assert_eq!(reason, INVALID_ANNOTATION);
                message
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn no_annotations_is_an_internet_facing_ipv4_balancer_with_discovered_subnets() {
        let o = with(&[]).unwrap();
        assert_eq!(o, AwsOptions::default());
        assert_eq!(o.scheme.as_str(), "internet-facing");
        // Other prefixes are not ours.
        let o = parse(&BTreeMap::from([(
            "metallb.io/address-pool".to_string(),
            "x".to_string(),
        )]))
        .unwrap();
        assert_eq!(o, AwsOptions::default());
    }

    #[test]
    fn every_supported_annotation_is_read() {
        let o = with(&[
            ("internal", "true"),
            ("subnets", "subnet-1, private-a"),
            ("healthcheck-protocol", "http"),
            ("healthcheck-port", "31000"),
            ("healthcheck-path", "/ready"),
            ("healthcheck-interval", "30"),
            ("healthcheck-timeout", "5"),
            ("healthcheck-healthy-threshold", "2"),
            ("healthcheck-unhealthy-threshold", "4"),
            (
                "target-group-attributes",
                "deregistration_delay.timeout_seconds=30, preserve_client_ip.enabled=true",
            ),
            ("additional-resource-tags", "team=web,cost-center=42"),
            ("cross-zone-load-balancing-enabled", "true"),
            ("ip-address-type", "dualstack"),
            ("proxy-protocol", "*"),
            ("type", "nlb"),
            ("nlb-target-type", "instance"),
        ])
        .unwrap();
        assert_eq!(o.scheme, Scheme::Internal);
        assert_eq!(
            o.subnets,
            SubnetChoice::Named(vec!["subnet-1".into(), "private-a".into()])
        );
        assert_eq!(o.health.protocol, Some(HealthProtocol::Http));
        assert_eq!(o.health.port, Some(HealthPort::Port(31000)));
        assert_eq!(o.health.path.as_deref(), Some("/ready"));
        assert_eq!(o.health.interval_seconds, Some(30));
        assert_eq!(o.health.timeout_seconds, Some(5));
        assert_eq!(o.health.healthy_threshold, Some(2));
        assert_eq!(o.health.unhealthy_threshold, Some(4));
        assert_eq!(o.target_group_attributes.len(), 2);
        assert_eq!(o.additional_tags["cost-center"], "42");
        assert!(o.cross_zone && o.proxy_protocol);
        assert_eq!(o.address_type, Some(AddressType::Dualstack));
        let o = with(&[
            ("scheme", "internet-facing"),
            ("eip-allocations", "eipalloc-1,eipalloc-2"),
        ])
        .unwrap();
        assert_eq!(o.eip_allocations, ["eipalloc-1", "eipalloc-2"]);
    }

    #[test]
    fn malformed_values_name_the_annotation() {
        for (key, value) in [
            ("scheme", "public"),
            ("internal", "yes please"),
            ("subnets", " , "),
            ("eip-allocations", "1.2.3.4"),
            ("healthcheck-protocol", "UDP"),
            ("healthcheck-port", "0"),
            ("healthcheck-path", "healthz"),
            ("healthcheck-interval", "1"),
            ("healthcheck-timeout", "ten"),
            ("healthcheck-healthy-threshold", "11"),
            ("healthcheck-unhealthy-threshold", "-2"),
            ("target-group-attributes", "stickiness.enabled"),
            ("additional-resource-tags", "=x"),
            ("additional-resource-tags", "aws:owner=me"),
            // ferry's own tags (the balancer's EIP record among them) are not the user's.
            ("additional-resource-tags", "ferry.dev/eip-allocations=x"),
            ("cross-zone-load-balancing-enabled", "1"),
            ("ip-address-type", "ipv6"),
            ("proxy-protocol", "v2"),
            ("type", "elb"),
            ("nlb-target-type", "ip"),
        ] {
            let e = error(&[(key, value)]);
            assert!(e.contains(&format!("{PREFIX}{key}")), "{key}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn unknown_annotations_under_the_prefix_are_refused() {
        let e = error(&[("ssl-cert", "arn:aws:acm:…")]);
        assert!(e.contains("aws-load-balancer-ssl-cert"), "{e}");
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn scheme_and_internal_must_agree_and_eips_need_a_public_balancer() {
        let e = error(&[("scheme", "internet-facing"), ("internal", "true")]);
        assert!(e.contains("disagree"), "{e}");
        assert_eq!(
            with(&[("scheme", "internal"), ("internal", "true")])
                .unwrap()
                .scheme,
            Scheme::Internal
        );
        let e = error(&[("internal", "true"), ("eip-allocations", "eipalloc-1")]);
        assert!(e.contains("internet-facing"), "{e}");
    }
}
