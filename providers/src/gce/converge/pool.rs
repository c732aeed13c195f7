//! The target pool: the nodes' instances and the health check. Instances change by
//! `addInstance`/`removeInstance` diffs (at most 1,000 a call), the health check by
//! `addHealthCheck`/`removeHealthCheck`; a changed session affinity, which GCE cannot
//! update, makes the pool again (its rules first let go of it).

use std::collections::BTreeSet;

use google_cloud_compute_v1::model::{
    HealthCheckReference, InstanceReference, TargetPool, TargetPoolsAddHealthCheckRequest,
    TargetPoolsAddInstanceRequest, TargetPoolsRemoveHealthCheckRequest,
    TargetPoolsRemoveInstanceRequest,
};
use tracing::info;

use crate::ProviderError;
use crate::gce::GceProvider;
use crate::gce::api::{Scope, relative};
use crate::gce::spec::Plan;

/// GCE takes at most this many instances in one add or remove.
const BATCH: usize = 1000;

impl GceProvider {
    pub(super) async fn find_pool(&self, name: &str) -> Result<Option<TargetPool>, ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        Ok(self
            .api
            .calls
            .find("targetPools.get", || {
                self.api
                    .clients
                    .pools
                    .get()
                    .set_project(p)
                    .set_region(r)
                    .set_target_pool(name)
                    .send()
            })
            .await?)
    }

    /// The URLs of the instances `plan` puts in the pool.
    pub(in crate::gce) fn instance_links(&self, plan: &Plan) -> BTreeSet<String> {
        plan.instances.iter().map(|i| i.path()).collect()
    }

    /// The pool's URL, the pool made or corrected.
    pub(super) async fn pool(
        &self,
        uid: &str,
        plan: &Plan,
        check: &str,
    ) -> Result<String, ProviderError> {
        let link = self.api.regional("targetPools", &plan.name);
        let want = self.instance_links(plan);
        let have = match self.find_pool(&plan.name).await? {
            None => {
                return self
                    .create_pool(uid, plan, check, &want)
                    .await
                    .map(|()| link);
            }
            Some(have) => have,
        };
        self.ours("target pool", &plan.name, have.description.as_deref(), uid)?;
        if have.session_affinity.as_ref().and_then(|a| a.name()) != Some(plan.session_affinity) {
            info!(
                pool = plan.name,
                affinity = plan.session_affinity,
                "session affinity changed: making the target pool again"
            );
            self.delete_rules(uid, plan).await?;
            self.delete_regional(uid, "targetPools", &plan.name).await?;
            return self
                .create_pool(uid, plan, check, &want)
                .await
                .map(|()| link);
        }
        let checks: BTreeSet<&str> = have.health_checks.iter().map(|h| relative(h)).collect();
        if checks != BTreeSet::from([relative(check)]) {
            let stale: Vec<String> = have
                .health_checks
                .iter()
                .filter(|h| relative(h) != relative(check))
                .cloned()
                .collect();
            if !stale.is_empty() {
                self.pool_checks(uid, &plan.name, false, stale).await?;
            }
            if !checks.contains(relative(check)) {
                self.pool_checks(uid, &plan.name, true, vec![check.to_string()])
                    .await?;
            }
        }
        let have: BTreeSet<String> = have
            .instances
            .iter()
            .map(|i| relative(i).to_string())
            .collect();
        self.set_instances(uid, &plan.name, &have, &want).await?;
        Ok(link)
    }

    async fn create_pool(
        &self,
        uid: &str,
        plan: &Plan,
        check: &str,
        instances: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let body = TargetPool::new()
            .set_name(plan.name.clone())
            .set_description(plan.description.clone())
            .set_instances(instances.iter().cloned())
            .set_health_checks([check.to_string()])
            .set_session_affinity(plan.session_affinity);
        let created = self
            .api
            .calls
            .run("targetPools.insert", || {
                self.api
                    .clients
                    .pools
                    .insert()
                    .set_project(p)
                    .set_region(r)
                    .set_body(body.clone())
                    .send()
            })
            .await;
        self.created(
            uid,
            Scope::Region,
            "targetPools.insert",
            "target pool",
            &plan.name,
            created,
        )
        .await
    }

    async fn pool_checks(
        &self,
        uid: &str,
        pool: &str,
        add: bool,
        checks: Vec<String>,
    ) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let refs: Vec<HealthCheckReference> = checks
            .iter()
            .map(|c| HealthCheckReference::new().set_health_check(c.clone()))
            .collect();
        let (what, op) = if add {
            let body = TargetPoolsAddHealthCheckRequest::new().set_health_checks(refs);
            let op = self
                .api
                .calls
                .run("targetPools.addHealthCheck", || {
                    self.api
                        .clients
                        .pools
                        .add_health_check()
                        .set_project(p)
                        .set_region(r)
                        .set_target_pool(pool)
                        .set_body(body.clone())
                        .send()
                })
                .await?;
            ("targetPools.addHealthCheck", op)
        } else {
            let body = TargetPoolsRemoveHealthCheckRequest::new().set_health_checks(refs);
            let op = self
                .api
                .calls
                .run("targetPools.removeHealthCheck", || {
                    self.api
                        .clients
                        .pools
                        .remove_health_check()
                        .set_project(p)
                        .set_region(r)
                        .set_target_pool(pool)
                        .set_body(body.clone())
                        .send()
                })
                .await?;
            ("targetPools.removeHealthCheck", op)
        };
        self.api
            .settle(uid, Scope::Region, format!("{what} {pool}"), op)
            .await
    }

    /// Adds what `want` has and `have` lacks, removes the reverse: one call each per
    /// 1,000 instances, none when nothing differs. `have` holds relative links.
    pub(in crate::gce) async fn set_instances(
        &self,
        uid: &str,
        pool: &str,
        have: &BTreeSet<String>,
        want: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let add: Vec<&String> = want
            .iter()
            .filter(|w| !have.contains(relative(w)))
            .collect();
        let want_rel: BTreeSet<&str> = want.iter().map(|w| relative(w)).collect();
        let remove: Vec<String> = have
            .iter()
            .filter(|h| !want_rel.contains(h.as_str()))
            .cloned()
            .collect();
        let add: Vec<String> = add.into_iter().cloned().collect();
        for (adding, links) in [(true, add), (false, remove)] {
            for batch in links.chunks(BATCH) {
                let refs: Vec<InstanceReference> = batch
                    .iter()
                    .map(|i| InstanceReference::new().set_instance(i.clone()))
                    .collect();
                let pools = &self.api.clients.pools;
                let (call, op) = if adding {
                    let body = TargetPoolsAddInstanceRequest::new().set_instances(refs);
                    let send = || {
                        pools
                            .add_instance()
                            .set_project(p)
                            .set_region(r)
                            .set_target_pool(pool)
                            .set_body(body.clone())
                            .send()
                    };
                    let call = "targetPools.addInstance";
                    (call, self.api.calls.run(call, send).await?)
                } else {
                    let body = TargetPoolsRemoveInstanceRequest::new().set_instances(refs);
                    let send = || {
                        pools
                            .remove_instance()
                            .set_project(p)
                            .set_region(r)
                            .set_target_pool(pool)
                            .set_body(body.clone())
                            .send()
                    };
                    let call = "targetPools.removeInstance";
                    (call, self.api.calls.run(call, send).await?)
                };
                self.api
                    .settle(uid, Scope::Region, format!("{call} {pool}"), op)
                    .await?;
            }
        }
        Ok(())
    }
}
