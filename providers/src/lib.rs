//! The seam between ferry's operator and the places balancers live.
//!
//! `LoadBalancerProvider` is the only way the operator touches a cloud (or the local address
//! pools): it hands a `DesiredLoadBalancer`, computed purely from a Service and the eligible
//! Nodes, and gets back an `ObservedLoadBalancer` to publish. Errors are typed so the operator
//! can decide between backoff, waiting for a change, and honouring a Retry-After. Nothing here
//! knows about kube-runtime controllers. The pure inputs every consumer shares (the model,
//! class ownership, eligibility, the desired balancer, pools) live in `ferry-model`, which the
//! forwarder uses without this crate; they are re-exported here for the operator.

#[cfg(feature = "aws")]
pub mod aws;
pub mod calls;
pub mod error;
#[cfg(feature = "fake")]
pub mod fake;
#[cfg(feature = "gce")]
pub mod gce;
pub mod local;
pub mod ownership;
pub mod registry;

#[cfg(any(test, feature = "fixtures"))]
pub use ferry_model::fixtures;
pub use ferry_model::{class, desired, eligibility, model};

use async_trait::async_trait;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

pub use error::ProviderError;
pub use ferry_model::model::*;

/// Something the provider learned on its own that the operator should act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderSignal {
    /// The provider's own configuration changed (an address pool was added, edited or
    /// removed): every balancer should be ensured again.
    ConfigurationChanged,
    /// Capacity was freed (an address was released): Services that are not ready may now
    /// succeed.
    CapacityFreed,
    /// These balancers are inconsistent (a repair pass found them) and must be ensured again.
    Resync(Vec<LoadBalancerId>),
}

/// A place that can provision load balancers. Every method is idempotent: it converges from
/// whatever it finds, and `delete` of something absent succeeds.
#[async_trait]
pub trait LoadBalancerProvider: Send + Sync + 'static {
    /// Short name used in logs and metric labels (`local`, `aws`, `gce`).
    fn name(&self) -> &'static str;

    /// Whether this provider can send traffic to `node` (the last of the upstream node
    /// eligibility predicates: "has an address the provider can use").
    fn can_target(&self, node: &NodeTarget) -> bool {
        !node.internal_ips.is_empty()
    }

    /// Prepares the provider to serve. Called by the operator each time it becomes leader,
    /// before the first `ensure`: the local provider rebuilds its allocation state here.
    async fn start(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Ends what `start` began (background passes): called when leadership is lost or the
    /// operator stops. A stopped provider is not started again; the process exits.
    async fn stop(&self) {}

    /// Creates the balancer or converges it to `desired`.
    async fn ensure(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError>;

    /// Converges only the balancer's targets after a node change. Providers whose API allows
    /// target diffs override this to avoid re-reading the whole balancer.
    async fn update_targets(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        self.ensure(desired).await
    }

    /// Removes the balancer and everything created for it. Absent is success.
    async fn delete(&self, id: &LoadBalancerId) -> Result<(), ProviderError>;

    /// What exists for `id`, if anything.
    async fn get(&self, id: &LoadBalancerId)
    -> Result<Option<ObservedLoadBalancer>, ProviderError>;

    /// Every balancer this provider created for this cluster, for orphan collection, and
    /// what carries this cluster's id without its identity (see `ClusterIdentity`).
    async fn list_owned(&self) -> Result<Owned, ProviderError>;

    /// The provider's signals, if it has any; taken once by the operator.
    fn take_signals(&self) -> Option<mpsc::Receiver<ProviderSignal>> {
        None
    }

    /// Adds the provider's own metrics (pool usage, SDK calls) to the operator's registry.
    fn register_metrics(&self, _registry: &mut Registry) {}
}
