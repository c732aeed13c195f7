//! The balancer's regional external address: ferry's own, named for the Service and kept for
//! its life, or one the user reserved and names in `spec.loadBalancerIP`, which ferry checks
//! and never deletes.

use std::net::IpAddr;

use google_cloud_compute_v1::model::Address;
use google_cloud_compute_v1::model::address::AddressType;

use crate::ProviderError;
use crate::gce::GceProvider;
use crate::gce::api::Scope;
use crate::gce::spec::{Plan, marks_of};
use crate::ownership::{Mark, owner};

impl GceProvider {
    pub(super) async fn find_address(&self, name: &str) -> Result<Option<Address>, ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        Ok(self
            .api
            .calls
            .find("addresses.get", || {
                self.api
                    .clients
                    .addresses
                    .get()
                    .set_project(p)
                    .set_region(r)
                    .set_address(name)
                    .send()
            })
            .await?)
    }

    /// The balancer's IP, the address made if it is ferry's and missing.
    pub(super) async fn address(&self, uid: &str, plan: &Plan) -> Result<IpAddr, ProviderError> {
        if let Some(ip) = plan.requested_ip {
            return self.requested_address(uid, ip, plan).await;
        }
        let address = match self.find_address(&plan.name).await? {
            Some(a) => a,
            None => {
                self.create_address(uid, plan).await?;
                self.find_address(&plan.name).await?.ok_or_else(|| {
                    ProviderError::transient(format!(
                        "address {} vanished after it was made",
                        plan.name
                    ))
                })?
            }
        };
        self.ours("address", &plan.name, address.description.as_deref(), uid)?;
        let tier = address.network_tier.as_ref().and_then(|t| t.name());
        if tier.is_some_and(|t| t != plan.tier.as_str()) {
            return Err(ProviderError::invalid(
                "NetworkTierChange",
                format!(
                    "the Service's address {} is {}; a {} address would be a new IP, so ferry keeps it: delete and recreate the Service to change the tier",
                    address.address.as_deref().unwrap_or(&plan.name),
                    tier.unwrap_or_default(),
                    plan.tier.as_str()
                ),
            ));
        }
        parse_ip(&plan.name, address.address.as_deref())
    }

    async fn create_address(&self, uid: &str, plan: &Plan) -> Result<(), ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let body = Address::new()
            .set_name(plan.name.clone())
            .set_description(plan.description.clone())
            .set_address_type(AddressType::External)
            .set_network_tier(plan.tier.as_str());
        let created = self
            .api
            .calls
            .run("addresses.insert", || {
                self.api
                    .clients
                    .addresses
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
            "addresses.insert",
            "address",
            &plan.name,
            created,
        )
        .await
    }

    /// A reserved address the Service names: it must be an external address of this region
    /// that no one else uses (its users, if any, are this Service's rules).
    async fn requested_address(
        &self,
        uid: &str,
        ip: IpAddr,
        plan: &Plan,
    ) -> Result<IpAddr, ProviderError> {
        let (p, r) = (self.api.project(), self.api.region());
        let filter = format!("address = \"{ip}\"");
        let found = self
            .api
            .calls
            .run("addresses.list", || {
                self.api
                    .clients
                    .addresses
                    .list()
                    .set_project(p)
                    .set_region(r)
                    .set_filter(filter.clone())
                    .send()
            })
            .await?;
        let Some(address) = found.items.into_iter().next() else {
            return Err(ProviderError::allocation(
                "LoadBalancerIPNotReserved",
                format!(
                    "spec.loadBalancerIP {ip} is not a reserved address in {r}: reserve it first (gcloud compute addresses create NAME --region {r} --addresses {ip})"
                ),
            ));
        };
        if address.address_type.as_ref().and_then(|t| t.name()) == Some("INTERNAL") {
            return Err(ProviderError::allocation(
                "LoadBalancerIPNotExternal",
                format!(
                    "spec.loadBalancerIP {ip} is an internal address; this balancer is external"
                ),
            ));
        }
        let rule_prefix = format!("{}-", plan.name);
        if let Some(user) = address
            .users
            .iter()
            .find(|u| !crate::gce::api::last_segment(u).starts_with(&rule_prefix))
        {
            return Err(ProviderError::allocation(
                "LoadBalancerIPInUse",
                format!(
                    "spec.loadBalancerIP {ip} is used by {}",
                    crate::gce::api::relative(user)
                ),
            ));
        }
        if let Mark::Ours(id) | Mark::Foreign { id, .. } = owner(
            &self.cluster,
            &marks_of(address.description.as_deref().unwrap_or_default()),
        ) && id.uid != uid
        {
            return Err(ProviderError::allocation(
                "LoadBalancerIPInUse",
                format!("spec.loadBalancerIP {ip} is ferry's address for {id}"),
            ));
        }
        let tier = address.network_tier.as_ref().and_then(|t| t.name());
        if tier.is_some_and(|t| t != plan.tier.as_str()) {
            return Err(ProviderError::invalid(
                "NetworkTierMismatch",
                format!(
                    "spec.loadBalancerIP {ip} is a {} address; the Service asks for {}",
                    tier.unwrap_or_default(),
                    plan.tier.as_str()
                ),
            ));
        }
        Ok(ip)
    }

    /// Deletes the Service's own address (not a reserved one it names), if it has one.
    pub(super) async fn release_own_address(
        &self,
        uid: &str,
        plan: &Plan,
    ) -> Result<(), ProviderError> {
        let Some(address) = self.find_address(&plan.name).await? else {
            return Ok(());
        };
        if self
            .ours("address", &plan.name, address.description.as_deref(), uid)
            .is_err()
            || !address.users.is_empty()
        {
            return Ok(());
        }
        self.delete_regional(uid, "addresses", &plan.name).await
    }
}

pub(in crate::gce) fn parse_ip(name: &str, ip: Option<&str>) -> Result<IpAddr, ProviderError> {
    ip.and_then(|ip| ip.parse().ok())
        .ok_or_else(|| ProviderError::transient(format!("address {name} has no IP yet")))
}
