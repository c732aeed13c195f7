//! Deleting a balancer, in the reverse order of references (rules, firewall rules, pool,
//! health check, address), each resource only when its description proves it is this
//! Service's, and absence everywhere is success, so an interrupted delete simply runs
//! again. A reserved address the Service named is never deleted: only ferry's own,
//! `ferry-<hash>`, is.

use crate::gce::GceProvider;
use crate::gce::api::Scope;
use crate::gce::spec::base_name;
use crate::{LoadBalancerId, ProviderError};

use super::rules::rule_names;

impl GceProvider {
    /// Deletes a regional resource; absent is done.
    pub(super) async fn delete_regional(
        &self,
        uid: &str,
        collection: &'static str,
        name: &str,
    ) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let c = &self.api.clients;
        let (what, result) = match collection {
            "forwardingRules" => (
                "forwardingRules.delete",
                self.api
                    .calls
                    .find("forwardingRules.delete", || {
                        c.rules
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_forwarding_rule(name)
                            .send()
                    })
                    .await,
            ),
            "targetPools" => (
                "targetPools.delete",
                self.api
                    .calls
                    .find("targetPools.delete", || {
                        c.pools
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_target_pool(name)
                            .send()
                    })
                    .await,
            ),
            _ => (
                "addresses.delete",
                self.api
                    .calls
                    .find("addresses.delete", || {
                        c.addresses
                            .delete()
                            .set_project(p)
                            .set_region(r)
                            .set_address(name)
                            .send()
                    })
                    .await,
            ),
        };
        match result? {
            None => Ok(()),
            Some(op) => {
                self.api
                    .settle(uid, Scope::Region, format!("{what} {name}"), op)
                    .await
            }
        }
    }

    /// Deletes a global resource (`firewalls`, `httpHealthChecks`); absent is done.
    async fn delete_global(
        &self,
        uid: &str,
        collection: &'static str,
        name: &str,
    ) -> Result<(), ProviderError> {
        let p = self.api.project();
        let c = &self.api.clients;
        let (what, result) = if collection == "firewalls" {
            (
                "firewalls.delete",
                self.api
                    .calls
                    .find("firewalls.delete", || {
                        c.firewalls
                            .delete()
                            .set_project(p)
                            .set_firewall(name)
                            .send()
                    })
                    .await,
            )
        } else {
            (
                "httpHealthChecks.delete",
                self.api
                    .calls
                    .find("httpHealthChecks.delete", || {
                        c.health_checks
                            .delete()
                            .set_project(p)
                            .set_http_health_check(name)
                            .send()
                    })
                    .await,
            )
        };
        match result? {
            None => Ok(()),
            Some(op) => {
                self.api
                    .settle(uid, Scope::Global, format!("{what} {name}"), op)
                    .await
            }
        }
    }

    /// Removes everything ferry made for `id`; what is not provably its own stays.
    pub(in crate::gce) async fn remove(&self, id: &LoadBalancerId) -> Result<(), ProviderError> {
        let uid = id.uid.as_str();
        self.api.check_pending(uid).await?;
        let name = base_name(&self.cluster.id, uid);
        let mine = |kind: &str, n: &str, description: Option<&str>| {
            self.ours(kind, n, description, uid).is_ok()
        };
        for rule in rule_names(&name) {
            if let Some(have) = self.find_rule(&rule).await?
                && mine("forwarding rule", &rule, have.description.as_deref())
            {
                self.delete_regional(uid, "forwardingRules", &rule).await?;
            }
        }
        for fw in [format!("{name}-fw"), format!("{name}-hc")] {
            if let Some(have) = self.find_firewall(&fw).await?
                && mine("firewall rule", &fw, have.description.as_deref())
            {
                self.delete_global(uid, "firewalls", &fw).await?;
            }
        }
        if let Some(have) = self.find_pool(&name).await?
            && mine("target pool", &name, have.description.as_deref())
        {
            self.delete_regional(uid, "targetPools", &name).await?;
        }
        if let Some(have) = self.find_health_check(&name).await?
            && mine("health check", &name, have.description.as_deref())
        {
            self.delete_global(uid, "httpHealthChecks", &name).await?;
        }
        if let Some(have) = self.find_address(&name).await?
            && mine("address", &name, have.description.as_deref())
        {
            self.delete_regional(uid, "addresses", &name).await?;
        }
        self.api.forget(uid);
        Ok(())
    }
}
