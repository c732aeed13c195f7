//! The firewall rules that let traffic reach the nodes: `<name>-fw` admits the Service's
//! `loadBalancerSourceRanges` to exactly its ports on the balancer's address, `<name>-hc`
//! admits GCE's health checkers to the health-check port. Both apply to the nodes' network
//! tags (`--gce-node-tags`, else read from the instances once each) and change in place.

use std::collections::BTreeSet;
use std::net::IpAddr;

use google_cloud_compute_v1::model::Firewall;
use google_cloud_compute_v1::model::firewall::{Allowed as FirewallAllowed, Direction};

use super::Allowed;
use crate::ProviderError;
use crate::gce::GceProvider;
use crate::gce::api::Scope;
use crate::gce::spec::{FirewallPlan, InstanceRef, Plan};

/// One instance's tag for firewall rules: the longest of its tags its name starts with
/// (GKE's node tags are the node pool's name prefix), else its first.
pub(in crate::gce) fn node_tag(instance: &str, tags: &[String]) -> Option<String> {
    tags.iter()
        .filter(|t| instance.starts_with(t.as_str()))
        .max_by_key(|t| t.len())
        .or_else(|| tags.first())
        .cloned()
}

fn allowed_of(rule: &[FirewallAllowed]) -> Allowed {
    let mut out = Allowed::new();
    for a in rule {
        let mut ports = a.ports.clone();
        ports.sort();
        out.entry(
            a.ip_protocol
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        )
        .or_default()
        .extend(ports);
    }
    out
}

fn allowed_wanted(plan: &FirewallPlan) -> Allowed {
    plan.allowed
        .iter()
        .map(|(p, ports)| {
            let mut ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            ports.sort();
            (p.to_string(), ports)
        })
        .collect()
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v.dedup();
    v
}

impl GceProvider {
    /// The tags the firewall rules target: the flag's, or the pool's instances'.
    pub(in crate::gce) async fn target_tags(
        &self,
        plan: &Plan,
    ) -> Result<Vec<String>, ProviderError> {
        if !self.node_tags.is_empty() {
            return Ok(self.node_tags.clone());
        }
        let mut tags = BTreeSet::new();
        for instance in &plan.instances {
            tags.insert(self.instance_tag(instance).await?);
        }
        Ok(tags.into_iter().collect())
    }

    async fn instance_tag(&self, instance: &InstanceRef) -> Result<String, ProviderError> {
        if let Some(tag) = self.instance_tags().get(&instance.path()) {
            return Ok(tag.clone());
        }
        let found = self
            .api
            .calls
            .find("instances.get", || {
                self.api
                    .clients
                    .instances
                    .get()
                    .set_project(instance.project.clone())
                    .set_zone(instance.zone.clone())
                    .set_instance(instance.name.clone())
                    .send()
            })
            .await?;
        let Some(found) = found else {
            return Err(ProviderError::transient(format!(
                "instance {} does not exist (yet)",
                instance.path()
            )));
        };
        let items = found.tags.map(|t| t.items).unwrap_or_default();
        let Some(tag) = node_tag(&instance.name, &items) else {
            return Err(ProviderError::Configuration {
                reason: "NoNodeTags",
                message: format!(
                    "instance {} has no network tags, so no firewall rule can name it: tag the nodes or pass --gce-node-tags",
                    instance.path()
                ),
            });
        };
        self.instance_tags().insert(instance.path(), tag.clone());
        Ok(tag)
    }

    pub(super) async fn find_firewall(
        &self,
        name: &str,
    ) -> Result<Option<Firewall>, ProviderError> {
        let p = self.api.project();
        Ok(self
            .api
            .calls
            .find("firewalls.get", || {
                self.api
                    .clients
                    .firewalls
                    .get()
                    .set_project(p)
                    .set_firewall(name)
                    .send()
            })
            .await?)
    }

    pub(super) async fn firewalls(
        &self,
        uid: &str,
        plan: &Plan,
        ip: IpAddr,
        tags: &[String],
    ) -> Result<(), ProviderError> {
        self.firewall(uid, plan, &plan.firewall, vec![format!("{ip}/32")], tags)
            .await?;
        self.firewall(uid, plan, &plan.health_firewall, Vec::new(), tags)
            .await
    }

    async fn firewall(
        &self,
        uid: &str,
        plan: &Plan,
        want: &FirewallPlan,
        destinations: Vec<String>,
        tags: &[String],
    ) -> Result<(), ProviderError> {
        let p = self.api.project();
        let allowed: Vec<FirewallAllowed> = allowed_wanted(want)
            .into_iter()
            .map(|(protocol, ports)| {
                FirewallAllowed::new()
                    .set_ip_protocol(protocol)
                    .set_ports(ports)
            })
            .collect();
        let body = Firewall::new()
            .set_name(want.name.clone())
            .set_description(plan.description.clone())
            .set_network(self.network.clone())
            .set_direction(Direction::Ingress)
            .set_source_ranges(want.source_ranges.clone())
            .set_destination_ranges(destinations.clone())
            .set_target_tags(tags.to_vec())
            .set_allowed(allowed);
        match self.find_firewall(&want.name).await? {
            None => {
                let created = self
                    .api
                    .calls
                    .run("firewalls.insert", || {
                        self.api
                            .clients
                            .firewalls
                            .insert()
                            .set_project(p)
                            .set_body(body.clone())
                            .send()
                    })
                    .await;
                self.created(
                    uid,
                    Scope::Global,
                    "firewalls.insert",
                    "firewall rule",
                    &want.name,
                    created,
                )
                .await
            }
            Some(have) => {
                self.ours(
                    "firewall rule",
                    &want.name,
                    have.description.as_deref(),
                    uid,
                )?;
                let same = sorted(&have.source_ranges) == sorted(&want.source_ranges)
                    && sorted(&have.destination_ranges) == sorted(&destinations)
                    && sorted(&have.target_tags) == sorted(tags)
                    && allowed_of(&have.allowed) == allowed_wanted(want);
                if same {
                    return Ok(());
                }
                // `update` replaces the whole rule, so a list emptied here is emptied there.
                let op = self
                    .api
                    .calls
                    .run("firewalls.update", || {
                        self.api
                            .clients
                            .firewalls
                            .update()
                            .set_project(p)
                            .set_firewall(want.name.clone())
                            .set_body(body.clone())
                            .send()
                    })
                    .await?;
                self.api
                    .settle(
                        uid,
                        Scope::Global,
                        format!("firewalls.update {}", want.name),
                        op,
                    )
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_named_by_the_longest_tag_its_name_starts_with() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            node_tag(
                "gke-prod-pool-1-abcd",
                &tags(&["http-server", "gke-prod", "gke-prod-pool-1"])
            ),
            Some("gke-prod-pool-1".into())
        );
        assert_eq!(
            node_tag("node-7", &tags(&["web", "nodes"])),
            Some("web".into())
        );
        assert_eq!(node_tag("node-7", &[]), None);
    }
}
