//! Orphan collection: balancers the provider owns for this cluster that no live Service
//! claims (the Service vanished without its finalizer running, or a delete was interrupted)
//! are deleted. Runs when the operator becomes leader and then periodically.

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
    debug!(owned = owned.len(), "looking for orphaned balancers");
    if owned.is_empty() {
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
    let mut deleted = 0;
    for id in owned {
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
