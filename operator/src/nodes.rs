//! The node pass: node changes are collected for one debounce window, then the eligible
//! target set is computed once and only Services whose balancer was ensured with a different
//! set are sent to the controller (which turns them into target updates, not re-creations).

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::{debug, info};

use crate::reconcile::Context;

/// `first` and whatever else `stream` yields within `window` after it: one batch.
pub(crate) async fn collect_window<S>(
    first: S::Item,
    stream: &mut S,
    window: Duration,
) -> Vec<S::Item>
where
    S: Stream + Unpin,
{
    let mut batch = vec![first];
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            next = stream.next() => match next {
                Some(item) => batch.push(item),
                None => break,
            },
        }
    }
    batch
}

/// Turns a stream of "some node changed" ticks into batches of Services to reconcile.
pub fn node_pass_triggers(
    changes: impl Stream<Item = ()> + Send + 'static,
    ctx: Arc<Context>,
    services: Store<Service>,
    debounce: Duration,
) -> impl Stream<Item = ObjectRef<Service>> + Send + 'static {
    let (tx, rx) = mpsc::unbounded();
    tokio::spawn(async move {
        let changes = changes.fuse();
        futures::pin_mut!(changes);
        let mut last_targets = None;
        while let Some(first) = changes.next().await {
            // Everything that arrives within the window is this one pass.
            collect_window(first, &mut changes, debounce).await;
            let targets = ctx.targets();
            if last_targets.as_ref() == Some(&targets) {
                debug!("node change does not change the eligible targets");
                continue;
            }
            let mut touched = 0usize;
            for svc in services.state() {
                let Some(applied) = ctx.applied(&svc.uid().unwrap_or_default()) else {
                    continue;
                };
                if applied.targets != targets && ctx.class.owns(&svc) {
                    touched += 1;
                    if tx
                        .unbounded_send(ObjectRef::from_obj(svc.as_ref()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            info!(nodes = targets.len(), balancers = touched, "node pass");
            last_targets = Some(targets);
        }
    });
    rx
}
