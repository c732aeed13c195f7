//! The forwarding rules: one per protocol (`<name>-tcp`, `<name>-udp`) on the one address,
//! each covering the Service's ports of that protocol and pointing at the target pool. A
//! rule's address, protocol, ports or tier cannot change in place, so a changed rule is
//! deleted and made again; a changed target is `setTarget`.

use std::net::IpAddr;

use google_cloud_compute_v1::model::forwarding_rule::LoadBalancingScheme;
use google_cloud_compute_v1::model::{ForwardingRule, TargetReference};

use crate::ProviderError;
use crate::gce::GceProvider;
use crate::gce::api::{Scope, relative};
use crate::gce::spec::{Plan, RulePlan};

/// Every rule name a Service's balancer can have.
pub(in crate::gce) fn rule_names(base: &str) -> [String; 2] {
    [format!("{base}-tcp"), format!("{base}-udp")]
}

impl GceProvider {
    pub(super) async fn find_rule(
        &self,
        name: &str,
    ) -> Result<Option<ForwardingRule>, ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        Ok(self
            .api
            .calls
            .find("forwardingRules.get", || {
                self.api
                    .clients
                    .rules
                    .get()
                    .set_project(p)
                    .set_region(r)
                    .set_forwarding_rule(name)
                    .send()
            })
            .await?)
    }

    pub(super) async fn rules(
        &self,
        uid: &str,
        plan: &Plan,
        ip: IpAddr,
        pool: &str,
    ) -> Result<(), ProviderError> {
        for name in rule_names(&plan.name) {
            let want = plan.rules.iter().find(|r| r.name == name);
            let have = self.find_rule(&name).await?;
            match (want, have) {
                (None, None) => {}
                (None, Some(have)) => {
                    self.ours("forwarding rule", &name, have.description.as_deref(), uid)?;
                    self.delete_regional(uid, "forwardingRules", &name).await?;
                }
                (Some(want), None) => self.create_rule(uid, plan, want, ip, pool).await?,
                (Some(want), Some(have)) => {
                    self.ours("forwarding rule", &name, have.description.as_deref(), uid)?;
                    let same = have.ip_address.as_deref() == Some(ip.to_string().as_str())
                        && have.ip_protocol.as_ref().and_then(|p| p.name()) == Some(want.protocol)
                        && have.port_range.as_deref() == Some(want.port_range.as_str())
                        && have
                            .network_tier
                            .as_ref()
                            .and_then(|t| t.name())
                            .is_none_or(|t| t == plan.tier.as_str());
                    if !same {
                        self.delete_regional(uid, "forwardingRules", &name).await?;
                        self.create_rule(uid, plan, want, ip, pool).await?;
                    } else if have.target.as_deref().map(relative) != Some(relative(pool)) {
                        self.set_target(uid, &name, pool).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn create_rule(
        &self,
        uid: &str,
        plan: &Plan,
        rule: &RulePlan,
        ip: IpAddr,
        pool: &str,
    ) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let body = ForwardingRule::new()
            .set_name(rule.name.clone())
            .set_description(plan.description.clone())
            .set_ip_address(ip.to_string())
            .set_ip_protocol(rule.protocol)
            .set_port_range(rule.port_range.clone())
            .set_target(pool.to_string())
            .set_load_balancing_scheme(LoadBalancingScheme::External)
            .set_network_tier(plan.tier.as_str());
        let created = self
            .api
            .calls
            .run("forwardingRules.insert", || {
                self.api
                    .clients
                    .rules
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
            "forwardingRules.insert",
            "forwarding rule",
            &rule.name,
            created,
        )
        .await
    }

    async fn set_target(&self, uid: &str, name: &str, pool: &str) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let body = TargetReference::new().set_target(pool.to_string());
        let op = self
            .api
            .calls
            .run("forwardingRules.setTarget", || {
                self.api
                    .clients
                    .rules
                    .set_target()
                    .set_project(p)
                    .set_region(r)
                    .set_forwarding_rule(name)
                    .set_body(body.clone())
                    .send()
            })
            .await?;
        self.api
            .settle(
                uid,
                Scope::Region,
                format!("forwardingRules.setTarget {name}"),
                op,
            )
            .await
    }

    /// Deletes the Service's rules (before its pool can go).
    pub(super) async fn delete_rules(&self, uid: &str, plan: &Plan) -> Result<(), ProviderError> {
        for name in rule_names(&plan.name) {
            if let Some(have) = self.find_rule(&name).await? {
                self.ours("forwarding rule", &name, have.description.as_deref(), uid)?;
                self.delete_regional(uid, "forwardingRules", &name).await?;
            }
        }
        Ok(())
    }
}

impl GceProvider {
    /// The first of the Service's rules that exists, whichever protocol.
    pub(in crate::gce) async fn find_any_rule(
        &self,
        base: &str,
    ) -> Result<Option<ForwardingRule>, ProviderError> {
        for name in rule_names(base) {
            if let Some(rule) = self.find_rule(&name).await? {
                return Ok(Some(rule));
            }
        }
        Ok(None)
    }
}
