//! What this cluster has in the project, for orphan collection: every resource named
//! `ferry-…` in the region (addresses, forwarding rules, target pools) and globally (health
//! checks, firewall rules), read by its description. Those with both of this cluster's
//! marks name their Service; those with only its id are reported, never deleted.

use std::collections::BTreeSet;

use crate::calls::all_pages;
use crate::gce::GceProvider;
use crate::gce::spec::marks_of;
use crate::ownership::{Mark, owner};
use crate::{ForeignResource, Owned, ProviderError};

/// Only ferry's names are listed.
const FILTER: &str = "name eq \"ferry-.*\"";
const PAGE: u32 = 500;

impl GceProvider {
    pub(in crate::gce) async fn owned(&self) -> Result<Owned, ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let c = &self.api.clients;
        let calls = &self.api.calls;
        let mut found: Vec<(String, String, Option<String>)> = Vec::new();
        macro_rules! list {
            ($kind:literal, $op:literal, $call:expr) => {
                let items = all_pages($op, |token| async move {
                    let page = calls
                        .run($op, || $call(token.clone()))
                        .await
                        .map_err(ProviderError::from)?;
                    Ok((
                        page.items
                            .into_iter()
                            .map(|i| (i.name.unwrap_or_default(), i.description))
                            .collect::<Vec<_>>(),
                        page.next_page_token,
                    ))
                })
                .await?;
                found.extend(items.into_iter().map(|(n, d)| ($kind.to_string(), n, d)));
            };
        }
        list!("address", "addresses.list", |t: Option<String>| c
            .addresses
            .list()
            .set_project(p)
            .set_region(r)
            .set_filter(FILTER)
            .set_max_results(PAGE)
            .set_or_clear_page_token(t)
            .send());
        list!("forwarding rule", "forwardingRules.list", |t: Option<
            String,
        >| c
            .rules
            .list()
            .set_project(p)
            .set_region(r)
            .set_filter(FILTER)
            .set_max_results(PAGE)
            .set_or_clear_page_token(t)
            .send());
        list!("target pool", "targetPools.list", |t: Option<String>| c
            .pools
            .list()
            .set_project(p)
            .set_region(r)
            .set_filter(FILTER)
            .set_max_results(PAGE)
            .set_or_clear_page_token(t)
            .send());
        list!("health check", "httpHealthChecks.list", |t: Option<
            String,
        >| c
            .health_checks
            .list()
            .set_project(p)
            .set_filter(FILTER)
            .set_max_results(PAGE)
            .set_or_clear_page_token(t)
            .send());
        list!("firewall rule", "firewalls.list", |t: Option<String>| c
            .firewalls
            .list()
            .set_project(p)
            .set_filter(FILTER)
            .set_max_results(PAGE)
            .set_or_clear_page_token(t)
            .send());

        let mut ours = BTreeSet::new();
        let mut foreign = Vec::new();
        for (kind, name, description) in found {
            match owner(
                &self.cluster,
                &marks_of(description.as_deref().unwrap_or_default()),
            ) {
                Mark::Ours(id) => {
                    ours.insert(id);
                }
                Mark::Foreign { id, cluster_uid } => foreign.push(ForeignResource {
                    id,
                    resource: format!("{kind} {name}"),
                    cluster_uid,
                }),
                Mark::NotOurs => {}
            }
        }
        Ok(Owned {
            ours: ours.into_iter().collect(),
            foreign,
        })
    }
}
