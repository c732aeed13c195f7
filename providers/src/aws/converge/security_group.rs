//! The balancer's security group: `loadBalancerSourceRanges` as ingress rules on the
//! Service's ports, changed in place; rules ferry did not write are left alone.

use super::*;

pub(in crate::aws) fn permission(rule: &Rule) -> IpPermission {
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
pub(in crate::aws) fn rules_of(perms: &[IpPermission]) -> (BTreeSet<Rule>, Vec<IpPermission>) {
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

impl AwsProvider {
    pub(in crate::aws) async fn find_security_group(
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
    pub(in crate::aws) async fn ensure_security_group(
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
