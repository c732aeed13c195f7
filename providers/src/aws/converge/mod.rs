//! Reading what exists and changing only what differs. Each step reads once, compares with
//! the `BalancerSpec`, and writes only the difference; a step that finds everything in place
//! costs one Describe call. One file per resource, in the order `converge` makes them:
//! `network` (subnets, Elastic IPs), `security_group`, `balancer`, `target_groups`,
//! `listeners`; `teardown` deletes in the reverse order and `inventory` lists what ferry owns.

mod balancer;
mod inventory;
mod listeners;
mod network;
mod security_group;
mod target_groups;
mod teardown;

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

use crate::aws::calls::ApiError;
use crate::aws::options::{AddressType, HealthProtocol, PREFIX, Scheme, SubnetChoice};
use crate::aws::spec::{
    self, BalancerSpec, Mark, Rule, TAG_CLUSTER, TAG_EIPS, TargetGroupSpec, TgProtocol,
};
use crate::aws::{AwsProvider, KnownGroup};
use crate::{
    DesiredLoadBalancer, ForeignResource, Ingress, IpMode, LoadBalancerId, ObservedLoadBalancer,
    Owned, ProviderError,
};
use network::{Eip, Subnet, eip_tag};
use target_groups::tg_protocol;

/// ELBv2 takes at most 20 ARNs per DescribeTags call.
pub(in crate::aws) const TAGS_PER_CALL: usize = 20;

pub(in crate::aws) fn elb_tags(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

pub(in crate::aws) fn missing(what: &str) -> ProviderError {
    ProviderError::transient(format!("AWS answered without {what}"))
}

/// The status a balancer should publish: its DNS name, and its Elastic IPs when static.
pub(in crate::aws) fn observed(lb: &LoadBalancer, eips: &[IpAddr]) -> ObservedLoadBalancer {
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
        notices: Vec::new(),
    }
}

impl AwsProvider {
    /// Converges the balancer of `desired`; returns its target groups and what to publish.
    pub(in crate::aws) async fn converge(
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
}
