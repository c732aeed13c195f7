//! Reading what exists and changing only what differs. Each step reads once, compares with
//! the `BalancerSpec`, and writes only the difference; a step that finds everything in place
//! costs one Describe call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, Ipv6Range, ResourceType, Tag as Ec2Tag, TagSpecification,
};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, IpAddressType, LoadBalancer, LoadBalancerAttribute,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, SubnetMapping, Tag,
    TargetDescription, TargetGroup, TargetGroupAttribute, TargetTypeEnum,
};
use tracing::{info, warn};

use super::calls::ApiError;
use super::options::{AddressType, HealthProtocol, PREFIX, Scheme, SubnetChoice};
use super::spec::{
    self, BalancerSpec, Mark, Rule, TAG_CLUSTER, TAG_EIPS, TargetGroupSpec, TgProtocol,
};
use super::{AwsProvider, KnownGroup};
use crate::{
    DesiredLoadBalancer, ForeignResource, Ingress, IpMode, LoadBalancerId, ObservedLoadBalancer,
    Owned, ProviderError,
};

/// A subnet the balancer lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Subnet {
    id: String,
    zone: String,
    vpc: String,
}

/// An Elastic IP for one subnet.
#[derive(Clone, Debug)]
struct Eip {
    allocation: String,
    ip: Option<IpAddr>,
}

/// ELBv2 takes at most 20 ARNs per DescribeTags call.
const TAGS_PER_CALL: usize = 20;

fn elb_tags(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn tg_protocol(p: TgProtocol) -> ProtocolEnum {
    match p {
        TgProtocol::Tcp => ProtocolEnum::Tcp,
        TgProtocol::Udp => ProtocolEnum::Udp,
        TgProtocol::TcpUdp => ProtocolEnum::TcpUdp,
    }
}

fn health_protocol(p: HealthProtocol) -> ProtocolEnum {
    match p {
        HealthProtocol::Tcp => ProtocolEnum::Tcp,
        HealthProtocol::Http => ProtocolEnum::Http,
        HealthProtocol::Https => ProtocolEnum::Https,
    }
}

fn scheme(s: Scheme) -> LoadBalancerSchemeEnum {
    match s {
        Scheme::Internal => LoadBalancerSchemeEnum::Internal,
        Scheme::InternetFacing => LoadBalancerSchemeEnum::InternetFacing,
    }
}

fn address_type(a: AddressType) -> IpAddressType {
    match a {
        AddressType::Ipv4 => IpAddressType::Ipv4,
        AddressType::Dualstack => IpAddressType::Dualstack,
    }
}

fn missing(what: &str) -> ProviderError {
    ProviderError::transient(format!("AWS answered without {what}"))
}

/// The status a balancer should publish: its DNS name, and its Elastic IPs when static.
pub(super) fn observed(lb: &LoadBalancer, eips: &[IpAddr]) -> ObservedLoadBalancer {
    let mut ingress = Vec::new();
    if let Some(dns) = lb.dns_name() {
        ingress.push(Ingress::hostname(dns));
    }
    // Traffic to these addresses must go through the NLB (source ranges, health checks),
    // never be short-circuited by kube-proxy.
    ingress.extend(eips.iter().map(|ip| Ingress::ip(*ip, IpMode::Proxy)));
    ObservedLoadBalancer {
        ingress,
        port_errors: Vec::new(),
    }
}

/// The health-check fields of a target group as the spec would have them.
fn health_differs(tg: &TargetGroup, want: &TargetGroupSpec) -> bool {
    let h = &want.health;
    tg.health_check_protocol() != Some(&health_protocol(h.protocol))
        || tg.health_check_port() != Some(h.port.as_str())
        || (h.path.is_some() && tg.health_check_path() != h.path.as_deref())
        || tg.health_check_interval_seconds() != Some(h.interval_seconds)
        || tg.health_check_timeout_seconds() != Some(h.timeout_seconds)
        || tg.healthy_threshold_count() != Some(h.healthy_threshold)
        || tg.unhealthy_threshold_count() != Some(h.unhealthy_threshold)
}

fn permission(rule: &Rule) -> IpPermission {
    let b = IpPermission::builder()
        .ip_protocol(rule.protocol)
        .from_port(i32::from(rule.port))
        .to_port(i32::from(rule.port));
    if rule.cidr.contains(':') {
        b.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(&rule.cidr).build())
            .build()
    } else {
        b.ip_ranges(IpRange::builder().cidr_ip(&rule.cidr).build())
            .build()
    }
}

/// The rules a security group has, and the permissions ferry cannot express as rules.
fn rules_of(perms: &[IpPermission]) -> (BTreeSet<Rule>, Vec<IpPermission>) {
    let mut rules = BTreeSet::new();
    let mut other = Vec::new();
    for p in perms {
        let protocol = match p.ip_protocol() {
            Some("tcp" | "6") => "tcp",
            Some("udp" | "17") => "udp",
            _ => {
                other.push(p.clone());
                continue;
            }
        };
        let port = match (p.from_port(), p.to_port()) {
            (Some(f), Some(t)) if f == t => u16::try_from(f).ok(),
            _ => None,
        };
        let Some(port) = port else {
            other.push(p.clone());
            continue;
        };
        let cidrs = p
            .ip_ranges()
            .iter()
            .filter_map(|r| r.cidr_ip())
            .chain(p.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6()));
        for cidr in cidrs {
            rules.insert(Rule {
                protocol,
                port,
                cidr: cidr.to_string(),
            });
        }
    }
    (rules, other)
}

/// Subnets and Elastic IPs paired as the balancer's `ferry.dev/eip-allocations` tag records
/// them, empty when the balancer has no static addresses.
fn eip_tag(subnets: &[Subnet], eips: &[Eip]) -> String {
    subnets
        .iter()
        .zip(eips)
        .map(|(s, e)| format!("{}:{}", s.id, e.allocation))
        .collect::<Vec<_>>()
        .join(",")
}

impl AwsProvider {
    /// Converges the balancer of `desired`; returns its target groups and what to publish.
    pub(super) async fn converge(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<(BTreeMap<String, KnownGroup>, ObservedLoadBalancer), ProviderError> {
        let spec = spec::plan(desired, &self.cluster)?;
        let subnets = self.subnets(&spec).await?;
        // `subnets` refuses an empty choice with its reason; this only keeps a cloud's odd
        // answer from becoming a panic.
        let vpc = subnets
            .first()
            .map(|s| s.vpc.clone())
            .ok_or_else(|| missing("a subnet"))?;
        let eips = self.eips(&spec, &subnets).await?;
        let security_group = self.ensure_security_group(&spec, desired, &vpc).await?;
        let lb = self
            .ensure_balancer(&spec, &subnets, &eips, &security_group)
            .await?;
        let lb_arn = lb
            .load_balancer_arn()
            .ok_or_else(|| missing("a balancer ARN"))?;
        self.ensure_balancer_attributes(lb_arn, &spec).await?;
        let (groups, stale) = self
            .ensure_target_groups(&spec, desired, &vpc, lb_arn)
            .await?;
        self.ensure_listeners(&spec, lb_arn, &groups).await?;
        for (name, arn) in stale {
            info!(service = %desired.id, target_group = %name, "deleting a target group no port uses any more");
            self.delete_target_group(&arn).await?;
        }
        let ips: Vec<IpAddr> = eips.iter().filter_map(|e| e.ip).collect();
        Ok((groups, observed(&lb, &ips)))
    }

    async fn subnets(&self, spec: &BalancerSpec) -> Result<Vec<Subnet>, ProviderError> {
        let role = match spec.scheme {
            Scheme::Internal => "kubernetes.io/role/internal-elb",
            Scheme::InternetFacing => "kubernetes.io/role/elb",
        };
        let cluster_tag = format!("kubernetes.io/cluster/{}", self.cluster_id);
        let to_subnets = |subnets: &[aws_sdk_ec2::types::Subnet]| -> Vec<Subnet> {
            subnets
                .iter()
                .filter_map(|s| {
                    Some(Subnet {
                        id: s.subnet_id()?.to_string(),
                        zone: s.availability_zone()?.to_string(),
                        vpc: s.vpc_id()?.to_string(),
                    })
                })
                .collect()
        };
        let chosen = match &spec.subnets {
            SubnetChoice::Discover => {
                // One filter server-side; the cluster tag is checked here, because a second
                // `tag-key` filter is not honoured alike by every EC2 implementation.
                let out = self
                    .calls
                    .run("DescribeSubnets", || {
                        self.ec2
                            .describe_subnets()
                            .filters(Filter::builder().name("tag-key").values(role).build())
                            .send()
                    })
                    .await?;
                let ours: Vec<aws_sdk_ec2::types::Subnet> = out
                    .subnets()
                    .iter()
                    .filter(|s| {
                        s.tags()
                            .iter()
                            .any(|t| t.key() == Some(cluster_tag.as_str()))
                    })
                    .cloned()
                    .collect();
                let mut found = to_subnets(&ours);
                found.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
                // One subnet per zone: the first by id.
                found.dedup_by(|b, a| a.zone == b.zone);
                if found.is_empty() {
                    return Err(ProviderError::Configuration {
                        reason: "NoSubnets",
                        message: format!(
                            "no subnets are tagged {role} and {cluster_tag}; tag one per zone or name them in annotation {PREFIX}subnets"
                        ),
                    });
                }
                found
            }
            SubnetChoice::Named(names) => {
                let (ids, tagged): (Vec<&String>, Vec<&String>) =
                    names.iter().partition(|n| n.starts_with("subnet-"));
                let mut found = Vec::new();
                if !ids.is_empty() {
                    let out = self
                        .calls
                        .run("DescribeSubnets", || {
                            self.ec2
                                .describe_subnets()
                                .set_subnet_ids(Some(ids.iter().map(|s| s.to_string()).collect()))
                                .send()
                        })
                        .await;
                    match out {
                        Ok(out) => found.extend(to_subnets(out.subnets())),
                        Err(e) if e.is("InvalidSubnetID.NotFound") || e.is("SubnetNotFound") => {
                            return Err(ProviderError::invalid(
                                "SubnetNotFound",
                                format!("annotation {PREFIX}subnets: {}", e.message),
                            ));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                if !tagged.is_empty() {
                    let out = self
                        .calls
                        .run("DescribeSubnets", || {
                            self.ec2
                                .describe_subnets()
                                .filters(
                                    Filter::builder()
                                        .name("tag:Name")
                                        .set_values(Some(
                                            tagged.iter().map(|s| s.to_string()).collect(),
                                        ))
                                        .build(),
                                )
                                .send()
                        })
                        .await?;
                    let named: HashMap<String, Subnet> = out
                        .subnets()
                        .iter()
                        .filter_map(|s| {
                            let name =
                                s.tags().iter().find(|t| t.key() == Some("Name"))?.value()?;
                            Some((name.to_string(), to_subnets(std::slice::from_ref(s)).pop()?))
                        })
                        .collect();
                    for name in &tagged {
                        found.push(named.get(name.as_str()).cloned().ok_or_else(|| {
                            ProviderError::invalid(
                                "SubnetNotFound",
                                format!("annotation {PREFIX}subnets: no subnet is named {name:?}"),
                            )
                        })?);
                    }
                }
                let zones: BTreeSet<&str> = found.iter().map(|s| s.zone.as_str()).collect();
                if zones.len() != found.len() {
                    return Err(ProviderError::invalid(
                        "InvalidAnnotation",
                        format!(
                            "annotation {PREFIX}subnets: a balancer takes one subnet per availability zone"
                        ),
                    ));
                }
                found
            }
        };
        // A cloud that names subnets it then does not describe whole (no id, zone or VPC):
        // nothing to put a balancer in, and nothing to index.
        if chosen.is_empty() {
            return Err(ProviderError::Configuration {
                reason: "NoSubnets",
                message: format!(
                    "EC2 described no usable subnet (with an id, a zone and a VPC) for {role}"
                ),
            });
        }
        let vpcs: BTreeSet<&str> = chosen.iter().map(|s| s.vpc.as_str()).collect();
        if vpcs.len() > 1 {
            return Err(ProviderError::Configuration {
                reason: "SubnetsInManyVPCs",
                message: format!(
                    "the balancer's subnets are in more than one VPC ({})",
                    vpcs.into_iter().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(chosen)
    }

    async fn eips(
        &self,
        spec: &BalancerSpec,
        subnets: &[Subnet],
    ) -> Result<Vec<Eip>, ProviderError> {
        let (out, source) = if !spec.eip_allocations.is_empty() {
            if spec.eip_allocations.len() != subnets.len() {
                return Err(ProviderError::invalid(
                    "EIPCountMismatch",
                    format!(
                        "annotation {PREFIX}eip-allocations names {} allocations but the balancer has {} subnets ({}); give one per subnet",
                        spec.eip_allocations.len(),
                        subnets.len(),
                        subnets
                            .iter()
                            .map(|s| s.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let out = self
                .calls
                .run("DescribeAddresses", || {
                    self.ec2
                        .describe_addresses()
                        .set_allocation_ids(Some(spec.eip_allocations.clone()))
                        .send()
                })
                .await;
            (out, format!("annotation {PREFIX}eip-allocations"))
        } else if let Some(ip) = spec.requested_ip {
            if subnets.len() != 1 {
                return Err(ProviderError::invalid(
                    "EIPCountMismatch",
                    format!(
                        "spec.loadBalancerIP is one address but the balancer has {} subnets; use annotation {PREFIX}eip-allocations with one allocation per subnet, or name one subnet",
                        subnets.len()
                    ),
                ));
            }
            let out = self
                .calls
                .run("DescribeAddresses", || {
                    self.ec2
                        .describe_addresses()
                        .filters(
                            Filter::builder()
                                .name("public-ip")
                                .values(ip.to_string())
                                .build(),
                        )
                        .send()
                })
                .await;
            (out, format!("spec.loadBalancerIP {ip}"))
        } else {
            return Ok(Vec::new());
        };
        let out = match out {
            Ok(out) => out,
            Err(e) if e.is("InvalidAllocationID.NotFound") || e.is("InvalidAddress.NotFound") => {
                return Err(ProviderError::allocation(
                    "EIPNotFound",
                    format!("{source}: {}", e.message),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let found: HashMap<&str, Option<IpAddr>> = out
            .addresses()
            .iter()
            .filter_map(|a| {
                Some((
                    a.allocation_id()?,
                    a.public_ip().and_then(|ip| ip.parse().ok()),
                ))
            })
            .collect();
        let wanted: Vec<String> = if spec.eip_allocations.is_empty() {
            found.keys().map(|s| s.to_string()).collect()
        } else {
            spec.eip_allocations.clone()
        };
        if wanted.is_empty() {
            return Err(ProviderError::allocation(
                "EIPNotFound",
                format!("{source} matches no Elastic IP allocation of this account"),
            ));
        }
        wanted
            .into_iter()
            .map(|allocation| match found.get(allocation.as_str()) {
                Some(ip) => Ok(Eip {
                    ip: *ip,
                    allocation,
                }),
                None => Err(ProviderError::allocation(
                    "EIPNotFound",
                    format!("{source}: allocation {allocation} does not exist"),
                )),
            })
            .collect()
    }

    async fn find_security_group(
        &self,
        name: &str,
        vpc: Option<&str>,
    ) -> Result<Option<aws_sdk_ec2::types::SecurityGroup>, ProviderError> {
        let out = self
            .calls
            .run("DescribeSecurityGroups", || {
                let mut req = self
                    .ec2
                    .describe_security_groups()
                    .filters(Filter::builder().name("group-name").values(name).build())
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{TAG_CLUSTER}"))
                            .values(&self.cluster_id)
                            .build(),
                    );
                if let Some(vpc) = vpc {
                    req = req.filters(Filter::builder().name("vpc-id").values(vpc).build());
                }
                req.send()
            })
            .await?;
        Ok(out.security_groups().first().cloned())
    }

    /// The balancer's own security group, with exactly the rules of the spec; its id.
    async fn ensure_security_group(
        &self,
        spec: &BalancerSpec,
        desired: &DesiredLoadBalancer,
        vpc: &str,
    ) -> Result<String, ProviderError> {
        let (id, current, other) = match self.find_security_group(&spec.name, Some(vpc)).await? {
            Some(group) => {
                let id = group
                    .group_id()
                    .ok_or_else(|| missing("a group id"))?
                    .to_string();
                let (rules, other) = rules_of(group.ip_permissions());
                (id, rules, other)
            }
            None => {
                let tags: Vec<Ec2Tag> = spec
                    .tags
                    .iter()
                    .map(|(k, v)| Ec2Tag::builder().key(k).value(v).build())
                    .collect();
                let out = self
                    .calls
                    .run("CreateSecurityGroup", || {
                        self.ec2
                            .create_security_group()
                            .group_name(&spec.name)
                            .description(format!("ferry: load balancer of Service {}", desired.id))
                            .vpc_id(vpc)
                            .tag_specifications(
                                TagSpecification::builder()
                                    .resource_type(ResourceType::SecurityGroup)
                                    .set_tags(Some(tags.clone()))
                                    .build(),
                            )
                            .send()
                    })
                    .await?;
                let id = out
                    .group_id()
                    .ok_or_else(|| missing("a group id"))?
                    .to_string();
                (id, BTreeSet::new(), Vec::new())
            }
        };
        let add: Vec<IpPermission> = spec.rules.difference(&current).map(permission).collect();
        let mut remove: Vec<IpPermission> =
            current.difference(&spec.rules).map(permission).collect();
        remove.extend(other);
        if !add.is_empty() {
            self.calls
                .run("AuthorizeSecurityGroupIngress", || {
                    self.ec2
                        .authorize_security_group_ingress()
                        .group_id(&id)
                        .set_ip_permissions(Some(add.clone()))
                        .send()
                })
                .await?;
        }
        if !remove.is_empty() {
            self.calls
                .run("RevokeSecurityGroupIngress", || {
                    self.ec2
                        .revoke_security_group_ingress()
                        .group_id(&id)
                        .set_ip_permissions(Some(remove.clone()))
                        .send()
                })
                .await?;
        }
        Ok(id)
    }

    pub(super) async fn find_balancer(
        &self,
        name: &str,
    ) -> Result<Option<LoadBalancer>, ProviderError> {
        match self
            .calls
            .run("DescribeLoadBalancers", || {
                self.elb.describe_load_balancers().names(name).send()
            })
            .await
        {
            Ok(out) => Ok(out.load_balancers().first().cloned()),
            Err(e) if e.is("LoadBalancerNotFound") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn tags_of(
        &self,
        arns: &[String],
    ) -> Result<HashMap<String, BTreeMap<String, String>>, ProviderError> {
        let mut out = HashMap::new();
        for chunk in arns.chunks(TAGS_PER_CALL) {
            let described = self
                .calls
                .run("DescribeTags", || {
                    self.elb
                        .describe_tags()
                        .set_resource_arns(Some(chunk.to_vec()))
                        .send()
                })
                .await?;
            for d in described.tag_descriptions() {
                let Some(arn) = d.resource_arn() else {
                    continue;
                };
                let tags = d
                    .tags()
                    .iter()
                    .filter_map(|t| {
                        Some((
                            t.key()?.to_string(),
                            t.value().unwrap_or_default().to_string(),
                        ))
                    })
                    .collect();
                out.insert(arn.to_string(), tags);
            }
        }
        Ok(out)
    }

    async fn create_balancer(
        &self,
        spec: &BalancerSpec,
        subnets: &[Subnet],
        eips: &[Eip],
        security_group: &str,
    ) -> Result<LoadBalancer, ProviderError> {
        let mappings: Vec<SubnetMapping> = subnets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                SubnetMapping::builder()
                    .subnet_id(&s.id)
                    .set_allocation_id(eips.get(i).map(|e| e.allocation.clone()))
                    .build()
            })
            .collect();
        let mut tags = spec.tags.clone();
        if !eips.is_empty() {
            tags.insert(TAG_EIPS.into(), eip_tag(subnets, eips));
        }
        let out = self
            .calls
            .run("CreateLoadBalancer", || {
                self.elb
                    .create_load_balancer()
                    .name(&spec.name)
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(scheme(spec.scheme))
                    .ip_address_type(address_type(spec.address_type))
                    .set_subnet_mappings(Some(mappings.clone()))
                    .security_groups(security_group)
                    .set_tags(Some(elb_tags(&tags)))
                    .send()
            })
            .await?;
        out.load_balancers()
            .first()
            .cloned()
            .ok_or_else(|| missing("the created balancer"))
    }

    /// The balancer, created or converged. Scheme and Elastic IPs cannot change in place:
    /// a balancer that differs there is replaced (its target groups stay).
    async fn ensure_balancer(
        &self,
        spec: &BalancerSpec,
        subnets: &[Subnet],
        eips: &[Eip],
        security_group: &str,
    ) -> Result<LoadBalancer, ProviderError> {
        let Some(lb) = self.find_balancer(&spec.name).await? else {
            return self
                .create_balancer(spec, subnets, eips, security_group)
                .await;
        };
        let arn = lb
            .load_balancer_arn()
            .ok_or_else(|| missing("a balancer ARN"))?
            .to_string();
        let tags = self
            .tags_of(std::slice::from_ref(&arn))
            .await?
            .remove(&arn)
            .unwrap_or_default();
        let recorded_eips = tags.get(TAG_EIPS).cloned().unwrap_or_default();
        if lb.scheme() != Some(&scheme(spec.scheme)) || recorded_eips != eip_tag(subnets, eips) {
            info!(balancer = %spec.name, "scheme or Elastic IPs changed; replacing the balancer");
            self.calls
                .run("DeleteLoadBalancer", || {
                    self.elb
                        .delete_load_balancer()
                        .load_balancer_arn(&arn)
                        .send()
                })
                .await?;
            return self
                .create_balancer(spec, subnets, eips, security_group)
                .await;
        }
        // Tags ferry owns (and the user's additional ones) are added or corrected; others stay.
        let wrong: BTreeMap<String, String> = spec
            .tags
            .iter()
            .filter(|(k, v)| tags.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !wrong.is_empty() {
            self.calls
                .run("AddTags", || {
                    self.elb
                        .add_tags()
                        .resource_arns(&arn)
                        .set_tags(Some(elb_tags(&wrong)))
                        .send()
                })
                .await?;
        }
        let current: BTreeSet<&str> = lb
            .availability_zones()
            .iter()
            .filter_map(|z| z.subnet_id())
            .collect();
        let wanted: BTreeSet<&str> = subnets.iter().map(|s| s.id.as_str()).collect();
        if current != wanted {
            self.calls
                .run("SetSubnets", || {
                    self.elb
                        .set_subnets()
                        .load_balancer_arn(&arn)
                        .set_subnets(Some(wanted.iter().map(|s| s.to_string()).collect()))
                        .send()
                })
                .await?;
        }
        if lb.ip_address_type() != Some(&address_type(spec.address_type)) {
            self.calls
                .run("SetIpAddressType", || {
                    self.elb
                        .set_ip_address_type()
                        .load_balancer_arn(&arn)
                        .ip_address_type(address_type(spec.address_type))
                        .send()
                })
                .await?;
        }
        if lb.security_groups() != [security_group.to_string()] {
            self.calls
                .run("SetSecurityGroups", || {
                    self.elb
                        .set_security_groups()
                        .load_balancer_arn(&arn)
                        .security_groups(security_group)
                        .send()
                })
                .await?;
        }
        Ok(lb)
    }

    async fn ensure_balancer_attributes(
        &self,
        arn: &str,
        spec: &BalancerSpec,
    ) -> Result<(), ProviderError> {
        const CROSS_ZONE: &str = "load_balancing.cross_zone.enabled";
        let out = self
            .calls
            .run("DescribeLoadBalancerAttributes", || {
                self.elb
                    .describe_load_balancer_attributes()
                    .load_balancer_arn(arn)
                    .send()
            })
            .await?;
        let want = spec.cross_zone.to_string();
        let current = out
            .attributes()
            .iter()
            .find(|a| a.key() == Some(CROSS_ZONE))
            .and_then(|a| a.value());
        if current != Some(want.as_str()) {
            self.calls
                .run("ModifyLoadBalancerAttributes", || {
                    self.elb
                        .modify_load_balancer_attributes()
                        .load_balancer_arn(arn)
                        .attributes(
                            LoadBalancerAttribute::builder()
                                .key(CROSS_ZONE)
                                .value(&want)
                                .build(),
                        )
                        .send()
                })
                .await?;
        }
        Ok(())
    }

    async fn create_target_group(
        &self,
        want: &TargetGroupSpec,
        spec: &BalancerSpec,
        vpc: &str,
    ) -> Result<TargetGroup, ProviderError> {
        let h = &want.health;
        let created = self
            .calls
            .run("CreateTargetGroup", || {
                self.elb
                    .create_target_group()
                    .name(&want.name)
                    .protocol(tg_protocol(want.protocol))
                    .port(i32::from(want.port))
                    .vpc_id(vpc)
                    .target_type(TargetTypeEnum::Instance)
                    .health_check_protocol(health_protocol(h.protocol))
                    .health_check_port(&h.port)
                    .set_health_check_path(h.path.clone())
                    .health_check_interval_seconds(h.interval_seconds)
                    .health_check_timeout_seconds(h.timeout_seconds)
                    .healthy_threshold_count(h.healthy_threshold)
                    .unhealthy_threshold_count(h.unhealthy_threshold)
                    .set_tags(Some(elb_tags(&spec.tags)))
                    .send()
            })
            .await;
        match created {
            Ok(out) => out
                .target_groups()
                .first()
                .cloned()
                .ok_or_else(|| missing("the created target group")),
            // Left behind by an interrupted ensure (and not attached to a listener yet).
            Err(e) if e.is("DuplicateTargetGroupName") => {
                let out = self
                    .calls
                    .run("DescribeTargetGroups", || {
                        self.elb.describe_target_groups().names(&want.name).send()
                    })
                    .await?;
                out.target_groups()
                    .first()
                    .cloned()
                    .ok_or_else(|| missing("the target group"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Target groups of the spec with their health checks, attributes and targets; also the
    /// (name, ARN) of attached groups the spec no longer has.
    async fn ensure_target_groups(
        &self,
        spec: &BalancerSpec,
        desired: &DesiredLoadBalancer,
        vpc: &str,
        lb_arn: &str,
    ) -> Result<(BTreeMap<String, KnownGroup>, Vec<(String, String)>), ProviderError> {
        let attached = match self
            .calls
            .run("DescribeTargetGroups", || {
                self.elb
                    .describe_target_groups()
                    .load_balancer_arn(lb_arn)
                    .send()
            })
            .await
        {
            Ok(out) => out.target_groups().to_vec(),
            Err(e) if e.is("TargetGroupNotFound") => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut by_name: HashMap<String, TargetGroup> = attached
            .into_iter()
            .filter_map(|tg| Some((tg.target_group_name()?.to_string(), tg)))
            .collect();
        let mut groups = BTreeMap::new();
        for want in &spec.target_groups {
            let (tg, fresh) = match by_name.remove(&want.name) {
                Some(tg) => (tg, false),
                None => (self.create_target_group(want, spec, vpc).await?, true),
            };
            let arn = tg
                .target_group_arn()
                .ok_or_else(|| missing("a target group ARN"))?
                .to_string();
            if !fresh && health_differs(&tg, want) {
                let h = &want.health;
                self.calls
                    .run("ModifyTargetGroup", || {
                        self.elb
                            .modify_target_group()
                            .target_group_arn(&arn)
                            .health_check_protocol(health_protocol(h.protocol))
                            .health_check_port(&h.port)
                            .set_health_check_path(h.path.clone())
                            .health_check_interval_seconds(h.interval_seconds)
                            .health_check_timeout_seconds(h.timeout_seconds)
                            .healthy_threshold_count(h.healthy_threshold)
                            .unhealthy_threshold_count(h.unhealthy_threshold)
                            .send()
                    })
                    .await?;
            }
            self.ensure_group_attributes(&arn, want).await?;
            let current = if fresh {
                BTreeSet::new()
            } else {
                self.registered(&arn).await?
            };
            let targets = spec::targets(desired, want.node_port);
            self.set_targets(&arn, &current, &targets).await?;
            groups.insert(
                want.name.clone(),
                KnownGroup {
                    arn,
                    node_port: want.node_port,
                    targets,
                },
            );
        }
        let stale = by_name
            .into_iter()
            .filter(|(name, _)| name.starts_with(&spec.target_group_prefix))
            .filter_map(|(name, tg)| Some((name, tg.target_group_arn()?.to_string())))
            .collect();
        Ok((groups, stale))
    }

    async fn ensure_group_attributes(
        &self,
        arn: &str,
        want: &TargetGroupSpec,
    ) -> Result<(), ProviderError> {
        let out = self
            .calls
            .run("DescribeTargetGroupAttributes", || {
                self.elb
                    .describe_target_group_attributes()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        let current: HashMap<&str, &str> = out
            .attributes()
            .iter()
            .filter_map(|a| Some((a.key()?, a.value()?)))
            .collect();
        let changes: Vec<TargetGroupAttribute> = want
            .attributes
            .iter()
            .filter(|(k, v)| current.get(k.as_str()) != Some(&v.as_str()))
            .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
            .collect();
        if !changes.is_empty() {
            self.calls
                .run("ModifyTargetGroupAttributes", || {
                    self.elb
                        .modify_target_group_attributes()
                        .target_group_arn(arn)
                        .set_attributes(Some(changes.clone()))
                        .send()
                })
                .await?;
        }
        Ok(())
    }

    async fn registered(&self, arn: &str) -> Result<BTreeSet<(String, u16)>, ProviderError> {
        let out = self
            .calls
            .run("DescribeTargetHealth", || {
                self.elb
                    .describe_target_health()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                Some((t.id()?.to_string(), u16::try_from(t.port()?).ok()?))
            })
            .collect())
    }

    /// One RegisterTargets for what is missing and one DeregisterTargets for what is extra.
    pub(super) async fn set_targets(
        &self,
        arn: &str,
        current: &BTreeSet<(String, u16)>,
        want: &BTreeSet<(String, u16)>,
    ) -> Result<(), ApiError> {
        let describe = |set: Vec<&(String, u16)>| -> Vec<TargetDescription> {
            set.into_iter()
                .map(|(id, port)| {
                    TargetDescription::builder()
                        .id(id)
                        .port(i32::from(*port))
                        .build()
                })
                .collect()
        };
        let add = describe(want.difference(current).collect());
        let remove = describe(current.difference(want).collect());
        if !add.is_empty() {
            self.calls
                .run("RegisterTargets", || {
                    self.elb
                        .register_targets()
                        .target_group_arn(arn)
                        .set_targets(Some(add.clone()))
                        .send()
                })
                .await?;
        }
        if !remove.is_empty() {
            self.calls
                .run("DeregisterTargets", || {
                    self.elb
                        .deregister_targets()
                        .target_group_arn(arn)
                        .set_targets(Some(remove.clone()))
                        .send()
                })
                .await?;
        }
        Ok(())
    }

    async fn ensure_listeners(
        &self,
        spec: &BalancerSpec,
        lb_arn: &str,
        groups: &BTreeMap<String, KnownGroup>,
    ) -> Result<(), ProviderError> {
        let out = self
            .calls
            .run("DescribeListeners", || {
                self.elb
                    .describe_listeners()
                    .load_balancer_arn(lb_arn)
                    .send()
            })
            .await?;
        let mut existing: HashMap<i32, _> = out
            .listeners()
            .iter()
            .filter_map(|l| Some((l.port()?, l.clone())))
            .collect();
        for want in &spec.target_groups {
            let Some(group) = groups.get(&want.name) else {
                continue;
            };
            let action = Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&group.arn)
                .build();
            let port = i32::from(want.port);
            match existing.remove(&port) {
                Some(l) => {
                    let forwards = l
                        .default_actions()
                        .iter()
                        .any(|a| a.target_group_arn() == Some(group.arn.as_str()))
                        && l.default_actions().len() == 1;
                    if l.protocol() == Some(&tg_protocol(want.protocol)) && forwards {
                        continue;
                    }
                    let listener_arn = l.listener_arn().ok_or_else(|| missing("a listener ARN"))?;
                    self.calls
                        .run("ModifyListener", || {
                            self.elb
                                .modify_listener()
                                .listener_arn(listener_arn)
                                .protocol(tg_protocol(want.protocol))
                                .default_actions(action.clone())
                                .send()
                        })
                        .await?;
                }
                None => {
                    self.calls
                        .run("CreateListener", || {
                            self.elb
                                .create_listener()
                                .load_balancer_arn(lb_arn)
                                .port(port)
                                .protocol(tg_protocol(want.protocol))
                                .default_actions(action.clone())
                                .send()
                        })
                        .await?;
                }
            }
        }
        for l in existing.values() {
            let Some(listener_arn) = l.listener_arn() else {
                continue;
            };
            match self
                .calls
                .run("DeleteListener", || {
                    self.elb.delete_listener().listener_arn(listener_arn).send()
                })
                .await
            {
                Ok(_) => {}
                Err(e) if e.is("ListenerNotFound") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn delete_target_group(&self, arn: &str) -> Result<(), ProviderError> {
        match self
            .calls
            .run("DeleteTargetGroup", || {
                self.elb.delete_target_group().target_group_arn(arn).send()
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is("TargetGroupNotFound") => Ok(()),
            // Still attached while the balancer's deletion settles: try again later.
            Err(e) if e.is("ResourceInUse") => Err(ProviderError::transient(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every target group whose name starts with `prefix` (including ones no listener uses).
    async fn target_groups_named(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let mut found = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .calls
                .run("DescribeTargetGroups", || {
                    self.elb
                        .describe_target_groups()
                        .set_marker(marker.clone())
                        .page_size(400)
                        .send()
                })
                .await?;
            found.extend(out.target_groups().iter().filter_map(|tg| {
                let name = tg.target_group_name()?;
                name.starts_with(prefix)
                    .then(|| Some((name.to_string(), tg.target_group_arn()?.to_string())))?
            }));
            match out.next_marker() {
                Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                _ => return Ok(found),
            }
        }
    }

    /// Deletes the balancer of `id` and everything ferry created for it; absent is fine.
    pub(super) async fn remove(&self, id: &LoadBalancerId) -> Result<(), ProviderError> {
        let name = spec::balancer_name(&self.cluster_id, &id.uid);
        if let Some(lb) = self.find_balancer(&name).await? {
            let arn = lb
                .load_balancer_arn()
                .ok_or_else(|| missing("a balancer ARN"))?;
            // Listeners go with the balancer.
            match self
                .calls
                .run("DeleteLoadBalancer", || {
                    self.elb
                        .delete_load_balancer()
                        .load_balancer_arn(arn)
                        .send()
                })
                .await
            {
                Ok(_) => info!(service = %id, balancer = %name, "deleted the load balancer"),
                Err(e) if e.is("LoadBalancerNotFound") => {}
                Err(e) => return Err(e.into()),
            }
        }
        for (tg_name, arn) in self
            .target_groups_named(&spec::target_group_prefix(&self.cluster_id, &id.uid))
            .await?
        {
            self.delete_target_group(&arn).await?;
            info!(service = %id, target_group = %tg_name, "deleted a target group");
        }
        if let Some(group) = self.find_security_group(&name, None).await? {
            let group_id = group.group_id().ok_or_else(|| missing("a group id"))?;
            match self
                .calls
                .run("DeleteSecurityGroup", || {
                    self.ec2.delete_security_group().group_id(group_id).send()
                })
                .await
            {
                Ok(_) => {
                    info!(service = %id, security_group = %group_id, "deleted the security group")
                }
                Err(e) if e.is("InvalidGroup.NotFound") => {}
                // The deleted balancer's network interfaces still use it for a while.
                Err(e) if e.is("DependencyViolation") => {
                    warn!(service = %id, security_group = %group_id, "security group still in use by the deleted balancer; retrying");
                    return Err(ProviderError::transient(e.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Every Service with a ferry balancer, target group or security group of this cluster,
    /// and what carries this cluster's id without its identity. Target groups count on
    /// their own: an ensure or delete interrupted after the balancer was gone leaves them.
    pub(super) async fn owned(&self) -> Result<Owned, ProviderError> {
        let mut arns = Vec::new();
        let mut what: HashMap<String, String> = HashMap::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .calls
                .run("DescribeLoadBalancers", || {
                    self.elb
                        .describe_load_balancers()
                        .set_marker(marker.clone())
                        .page_size(400)
                        .send()
                })
                .await?;
            for lb in out.load_balancers() {
                if let (Some(name), Some(arn)) = (lb.load_balancer_name(), lb.load_balancer_arn())
                    && name.starts_with("ferry-")
                {
                    what.insert(arn.to_string(), format!("load balancer {name}"));
                    arns.push(arn.to_string());
                }
            }
            match out.next_marker() {
                Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                _ => break,
            }
        }
        for (name, arn) in self.target_groups_named("ferry-").await? {
            what.insert(arn.clone(), format!("target group {name}"));
            arns.push(arn);
        }
        let mut owned = Owned::default();
        let mut ours = BTreeSet::new();
        let mut sort = |resource: String, tags: &BTreeMap<String, String>| match spec::owner(
            &self.cluster,
            tags,
        ) {
            Mark::Ours(id) => {
                ours.insert(id);
            }
            Mark::Foreign { id, cluster_uid } => owned.foreign.push(ForeignResource {
                id,
                resource,
                cluster_uid,
            }),
            Mark::NotOurs => {}
        };
        for (arn, tags) in self.tags_of(&arns).await? {
            let resource = what.get(&arn).cloned().unwrap_or(arn);
            sort(resource, &tags);
        }
        // A security group left by an ensure interrupted before the balancer existed.
        let groups = self
            .calls
            .run("DescribeSecurityGroups", || {
                self.ec2
                    .describe_security_groups()
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{TAG_CLUSTER}"))
                            .values(&self.cluster_id)
                            .build(),
                    )
                    .send()
            })
            .await?;
        for g in groups.security_groups() {
            let tags = g
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                .collect();
            let resource = format!("security group {}", g.group_id().unwrap_or("?"));
            sort(resource, &tags);
        }
        owned.ours = ours.into_iter().collect();
        owned.foreign.sort();
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterIdentity;
    use crate::LoadBalancerProvider;
    use crate::aws::{AwsConfig, AwsProvider};

    /// An EC2 endpoint that answers every call with an empty subnet list: a cloud's odd
    /// answer, on the wire, through the real SDK.
    async fn empty_subnets_endpoint() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        buf.drain(..end + 4 + length);
                        let body = "<DescribeSubnetsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId><subnetSet/></DescribeSubnetsResponse>";
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_cloud_that_returns_no_subnets_is_an_error_not_a_panic() {
        let endpoint = empty_subnets_endpoint().await;
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(crate::aws::http_client())
            .endpoint_url(&endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "a", "b", None, None, "test",
            ))
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        let provider = AwsProvider::with_clients(
            AwsConfig::new(ClusterIdentity {
                id: "c".into(),
                uid: "u".into(),
            }),
            aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            aws_sdk_ec2::Client::new(&sdk),
        );
        for annotation in [None, Some("subnet-0abc")] {
            let mut svc = crate::fixtures::service("web").lb().port(80, 30080);
            if let Some(subnets) = annotation {
                svc = svc.annotate(&format!("{PREFIX}subnets"), subnets);
            }
            let desired = crate::desired::desired(&svc.build(), &[]).unwrap();
            let err = provider.ensure(&desired).await.unwrap_err();
            assert_eq!(err.reason(), "NoSubnets", "{err}");
        }
    }

    #[test]
    fn security_group_rules_round_trip_and_foreign_permissions_are_kept_apart() {
        let rules: BTreeSet<Rule> = [
            Rule {
                protocol: "tcp",
                port: 80,
                cidr: "0.0.0.0/0".into(),
            },
            Rule {
                protocol: "udp",
                port: 53,
                cidr: "::/0".into(),
            },
        ]
        .into();
        let perms: Vec<IpPermission> = rules.iter().map(permission).collect();
        let all = IpPermission::builder().ip_protocol("-1").build();
        let range = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(1000)
            .to_port(2000)
            .ip_ranges(IpRange::builder().cidr_ip("10.0.0.0/8").build())
            .build();
        let mut with_foreign = perms.clone();
        with_foreign.push(all);
        with_foreign.push(range);
        let (back, other) = rules_of(&with_foreign);
        assert_eq!(back, rules);
        assert_eq!(other.len(), 2);
    }

    #[test]
    fn the_eip_tag_pairs_subnets_with_allocations() {
        let subnets = [
            Subnet {
                id: "subnet-a".into(),
                zone: "z1".into(),
                vpc: "v".into(),
            },
            Subnet {
                id: "subnet-b".into(),
                zone: "z2".into(),
                vpc: "v".into(),
            },
        ];
        let eips = [
            Eip {
                allocation: "eipalloc-1".into(),
                ip: None,
            },
            Eip {
                allocation: "eipalloc-2".into(),
                ip: None,
            },
        ];
        assert_eq!(
            eip_tag(&subnets, &eips),
            "subnet-a:eipalloc-1,subnet-b:eipalloc-2"
        );
        assert_eq!(eip_tag(&subnets, &[]), "");
    }
}
