//! Orphan collection: balancers the provider owns for this cluster that no live Service
//! claims (the Service vanished without its finalizer running, or a delete was interrupted)
//! are deleted. Runs when the operator becomes leader and then periodically.
//!
//! "Owns" means both of this cluster's marks (`ClusterIdentity`): resources that carry its
//! `--cluster-id` but not its identity belong to a cluster this one cannot see (the same id
//! copied to a second cluster), or predate the identity mark; they are reported, never
//! deleted.

use std::collections::HashSet;

use ferry_providers::ProviderError;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tracing::{debug, info, warn};

use crate::reconcile::{Context, FINALIZER};

#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    #[error("listing owned balancers: {0}")]
    Provider(#[from] ProviderError),
    #[error("listing Services: {0}")]
    Kube(#[from] kube::Error),
}

/// Deletes every owned balancer whose Service is gone; returns how many were deleted.
pub async fn collect_orphans(ctx: &Context) -> Result<usize, OrphanError> {
    let owned = ctx.provider.list_owned().await?;
    debug!(
        owned = owned.ours.len(),
        foreign = owned.foreign.len(),
        "looking for orphaned balancers"
    );
    if owned.ours.is_empty() && owned.foreign.is_empty() {
        ctx.metrics.foreign_resources.set(0);
        return Ok(0);
    }
    // A fresh list, not the cache: deleting a live Service's balancer is the one mistake
    // this pass must never make.
    let services = Api::<Service>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    let claimed: HashSet<String> = services
        .items
        .iter()
        .filter(|s| ctx.class.owns(s) || s.finalizers().iter().any(|f| f == FINALIZER))
        .filter_map(|s| s.uid())
        .collect();
    // A resource of a live Service here that lacks the identity mark is this cluster's
    // (Service UIDs are unique), only tagged before the mark existed: its next ensure adds
    // the mark. Everything else is another cluster's.
    let foreign: Vec<_> = owned
        .foreign
        .iter()
        .filter(|f| !claimed.contains(&f.id.uid))
        .collect();
    ctx.metrics
        .foreign_resources
        .set(i64::try_from(foreign.len()).unwrap_or(i64::MAX));
    for f in &foreign {
        warn!(resource = %f.resource, service = %f.id, service_uid = %f.id.uid,
              cluster_uid = f.cluster_uid.as_deref().unwrap_or("none"),
              "a cloud resource carries this cluster's id but not its identity; another cluster with the same --cluster-id may own it, so it is left alone");
    }
    let mut deleted = 0;
    for id in owned.ours {
        if claimed.contains(&id.uid) {
            continue;
        }
        match ctx.provider.delete(&id).await {
            Ok(()) => {
                info!(service = %id, uid = %id.uid, "deleted orphaned load balancer");
                ctx.metrics.orphans_deleted.inc();
                deleted += 1;
            }
            Err(err) => {
                warn!(service = %id, error = %err, "could not delete orphaned load balancer")
            }
        }
    }
    Ok(deleted)
}
