//! What ferry owns in the account, for orphan collection: balancers, target groups and
//! security groups carrying this cluster's id, sorted into this cluster's (both marks) and
//! foreign (the id without this cluster's identity), which are reported, never deleted.

use super::*;
use crate::aws::calls::all_pages;

impl AwsProvider {
    /// Every Service with a ferry balancer, target group or security group of this cluster,
    /// and what carries this cluster's id without its identity. Target groups count on
    /// their own: an ensure or delete interrupted after the balancer was gone leaves them.
    pub(in crate::aws) async fn owned(&self) -> Result<Owned, ProviderError> {
        let mut arns = Vec::new();
        let mut what: HashMap<String, String> = HashMap::new();
        let balancers = all_pages("DescribeLoadBalancers", |marker| async move {
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
            let next = out.next_marker().map(str::to_string);
            Ok((out.load_balancers.unwrap_or_default(), next))
        })
        .await?;
        for lb in &balancers {
            if let (Some(name), Some(arn)) = (lb.load_balancer_name(), lb.load_balancer_arn())
                && name.starts_with("ferry-")
            {
                what.insert(arn.to_string(), format!("load balancer {name}"));
                arns.push(arn.to_string());
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
