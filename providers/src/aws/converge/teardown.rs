//! Deleting a Service's balancer and everything ferry created for it, the reverse of the
//! order they were made in; absence is success at every step, so an interrupted delete
//! simply runs again.

use super::*;

impl AwsProvider {
    /// Deletes the balancer of `id` and everything ferry created for it; absent is fine.
    pub(in crate::aws) async fn remove(&self, id: &LoadBalancerId) -> Result<(), ProviderError> {
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
}
