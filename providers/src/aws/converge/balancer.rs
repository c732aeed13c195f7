//! The Network Load Balancer itself: found by its deterministic name, created with its
//! subnets, addresses and security group, and its attributes kept as the Service asks.

use super::*;

pub(in crate::aws) fn scheme(s: Scheme) -> LoadBalancerSchemeEnum {
    match s {
        Scheme::Internal => LoadBalancerSchemeEnum::Internal,
        Scheme::InternetFacing => LoadBalancerSchemeEnum::InternetFacing,
    }
}

pub(in crate::aws) fn address_type(a: AddressType) -> IpAddressType {
    match a {
        AddressType::Ipv4 => IpAddressType::Ipv4,
        AddressType::Dualstack => IpAddressType::Dualstack,
    }
}

impl AwsProvider {
    pub(in crate::aws) async fn find_balancer(
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

    pub(in crate::aws) async fn tags_of(
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

    pub(in crate::aws) async fn create_balancer(
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
    pub(in crate::aws) async fn ensure_balancer(
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

    pub(in crate::aws) async fn ensure_balancer_attributes(
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
}
