//! Convergence of one Service's balancer: read each resource by its deterministic name,
//! prove it is this Service's by its description, and change only what differs, in the
//! order references need (address and health check, the target pool that uses the check,
//! the forwarding rules on the address that point at the pool, the firewall rules).
//! Where GCE cannot change a resource in place (a forwarding rule's address, protocol or
//! ports, a pool's session affinity) only that resource is made again; the address stays.

mod address;
mod firewalls;
mod health_check;
mod inventory;
mod pool;
mod rules;
mod teardown;

use std::collections::BTreeMap;
use std::net::IpAddr;

use tracing::info;

use google_cloud_compute_v1::model::Operation;

use super::GceProvider;
use super::api::{RECHECK, Scope};
use super::calls::ApiError;
use super::spec::{Plan, marks_of};
use crate::ownership::{Mark, owner};
use crate::{DesiredLoadBalancer, Ingress, IpMode, ObservedLoadBalancer, ProviderError};

/// What a converged balancer is, for memory (`update_targets`).
#[derive(Clone, Debug)]
pub(in crate::gce) struct Converged {
    pub ip: IpAddr,
    /// The firewall rules' target tags.
    pub tags: Vec<String>,
}

impl GceProvider {
    /// Makes `desired`'s balancer what `plan` says.
    pub(in crate::gce) async fn converge(
        &self,
        desired: &DesiredLoadBalancer,
        plan: &Plan,
    ) -> Result<Converged, ProviderError> {
        let uid = desired.id.uid.as_str();
        self.api.check_pending(uid).await?;
        for (node, why) in &plan.skipped {
            info!(service = %desired.id, node, why, "node left out of the target pool");
        }
        let ip = self.address(uid, plan).await?;
        let check = self.health_check(uid, plan).await?;
        let pool = self.pool(uid, plan, &check).await?;
        self.rules(uid, plan, ip, &pool).await?;
        let tags = self.target_tags(plan).await?;
        if tags.is_empty() {
            // A firewall rule without target tags would apply to every instance of the
            // network: with no node to name, the rules stay as they are.
            info!(service = %desired.id, "no node to name in firewall rules yet; left as they are");
        } else {
            self.firewalls(uid, plan, ip, &tags).await?;
        }
        if plan.requested_ip.is_some() {
            // A Service that now names a reserved address no longer needs its own.
            self.release_own_address(uid, plan).await?;
        }
        Ok(Converged { ip, tags })
    }

    /// Whether a resource found under this Service's name is this Service's: both marks
    /// of this cluster and the Service's UID in its description. Anything else is left
    /// alone and reported.
    pub(in crate::gce) fn ours(
        &self,
        kind: &str,
        name: &str,
        description: Option<&str>,
        uid: &str,
    ) -> Result<(), ProviderError> {
        let marks = marks_of(description.unwrap_or_default());
        match owner(&self.cluster, &marks) {
            Mark::Ours(id) if id.uid == uid => Ok(()),
            Mark::Ours(id) | Mark::Foreign { id, .. } => Err(ProviderError::Conflict {
                reason: "ResourceNotOurs",
                message: format!(
                    "{kind} {name} exists and belongs to {id} ({}); ferry leaves it alone",
                    match owner(&self.cluster, &marks) {
                        Mark::Ours(_) => "another Service of this cluster",
                        _ => "another cluster with this cluster id",
                    }
                ),
            }),
            Mark::NotOurs => Err(ProviderError::Conflict {
                reason: "ResourceNotOurs",
                message: format!(
                    "{kind} {name} exists and was not made by ferry for this Service; ferry leaves it alone"
                ),
            }),
        }
    }
}

impl GceProvider {
    /// A create's answer, settled; a 409 for a resource that is not there to read means GCE
    /// still holds the name for a create in flight (ours, from before a restart): in progress.
    pub(in crate::gce) async fn created(
        &self,
        uid: &str,
        scope: Scope,
        call: &str,
        kind: &str,
        name: &str,
        answer: Result<Operation, ApiError>,
    ) -> Result<(), ProviderError> {
        match answer {
            Ok(op) => {
                self.api
                    .settle(uid, scope, format!("{call} {name}"), op)
                    .await
            }
            Err(e) if e.already_exists() => Err(ProviderError::in_progress(
                format!("waiting for Compute Engine: {kind} {name} is being created"),
                RECHECK,
            )),
            Err(e) => Err(e.into()),
        }
    }
}

/// What the Service publishes: the address, which packets arrive for (passthrough).
pub(in crate::gce) fn observed(ip: IpAddr) -> ObservedLoadBalancer {
    ObservedLoadBalancer {
        ingress: vec![Ingress::ip(ip, IpMode::Vip)],
        port_errors: Vec::new(),
        notices: Vec::new(),
    }
}

/// Firewall `allowed` entries in a comparable form: protocol → sorted ports.
pub(in crate::gce) type Allowed = BTreeMap<String, Vec<String>>;
