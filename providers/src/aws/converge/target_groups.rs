//! Target groups, one per Service port and protocol: created with their health checks,
//! their attributes kept, their registered targets changed by difference only; stale ones
//! (a port the Service no longer has) listed for deletion.

use super::*;
use crate::aws::calls::all_pages;

pub(in crate::aws) fn tg_protocol(p: TgProtocol) -> ProtocolEnum {
    match p {
        TgProtocol::Tcp => ProtocolEnum::Tcp,
        TgProtocol::Udp => ProtocolEnum::Udp,
        TgProtocol::TcpUdp => ProtocolEnum::TcpUdp,
    }
}

pub(in crate::aws) fn health_protocol(p: HealthProtocol) -> ProtocolEnum {
    match p {
        HealthProtocol::Tcp => ProtocolEnum::Tcp,
        HealthProtocol::Http => ProtocolEnum::Http,
        HealthProtocol::Https => ProtocolEnum::Https,
    }
}

/// The health-check fields of a target group as the spec would have them.
pub(in crate::aws) fn health_differs(tg: &TargetGroup, want: &TargetGroupSpec) -> bool {
    let h = &want.health;
    tg.health_check_protocol() != Some(&health_protocol(h.protocol))
        || tg.health_check_port() != Some(h.port.as_str())
        || (h.path.is_some() && tg.health_check_path() != h.path.as_deref())
        || tg.health_check_interval_seconds() != Some(h.interval_seconds)
        || tg.health_check_timeout_seconds() != Some(h.timeout_seconds)
        || tg.healthy_threshold_count() != Some(h.healthy_threshold)
        || tg.unhealthy_threshold_count() != Some(h.unhealthy_threshold)
}

impl AwsProvider {
    pub(in crate::aws) async fn create_target_group(
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
    pub(in crate::aws) async fn ensure_target_groups(
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

    pub(in crate::aws) async fn ensure_group_attributes(
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

    pub(in crate::aws) async fn registered(
        &self,
        arn: &str,
    ) -> Result<BTreeSet<(String, u16)>, ProviderError> {
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
    pub(in crate::aws) async fn set_targets(
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

    pub(in crate::aws) async fn delete_target_group(&self, arn: &str) -> Result<(), ProviderError> {
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
    pub(in crate::aws) async fn target_groups_named(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        let groups = all_pages("DescribeTargetGroups", |marker| async move {
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
            let next = out.next_marker().map(str::to_string);
            Ok((out.target_groups.unwrap_or_default(), next))
        })
        .await?;
        Ok(groups
            .iter()
            .filter_map(|tg| {
                let name = tg.target_group_name()?;
                name.starts_with(prefix)
                    .then(|| Some((name.to_string(), tg.target_group_arn()?.to_string())))?
            })
            .collect())
    }
}
