//! Google Compute Engine: external passthrough Network Load Balancers on target pools.
//!
//! `spec::plan` turns a `DesiredLoadBalancer` into the resources the balancer should have —
//! a regional static address, a target pool of the nodes' instances with a legacy HTTP
//! health check, one forwarding rule per protocol on that address, and the firewall rules
//! that let clients and the health checkers reach the nodes — pure, so it is tested on
//! plain values. `converge` reads what exists by those deterministic names and changes only
//! what differs; every write is an Operation that `api::Api::settle` waits for within a
//! bound, reporting `InProgress` beyond it. Every call goes through `calls::Calls` (budget,
//! retries, counts), on google-cloud-compute-v1 with the client's own retries off.
//!
//! After a successful `ensure` the provider remembers the pool's instances, so a node change
//! is one `addInstance` and/or one `removeInstance` per pool and no read at all; a restart
//! (empty memory) or an error falls back to a full `ensure`.

pub mod api;
mod args;
pub mod calls;
mod converge;
pub mod spec;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use prometheus_client::registry::Registry;

use crate::calls::RetryPolicy;
use crate::{
    ClusterIdentity, DesiredLoadBalancer, LoadBalancerId, LoadBalancerProvider, NodeTarget,
    ObservedLoadBalancer, Owned, ProviderError,
};
use api::{Api, Clients, DEFAULT_ENDPOINT, relative};
pub use args::GceArgs;
use converge::{Converged, observed};
use spec::{Location, Plan};

/// What ferry knows of one balancer after it converged it.
#[derive(Clone, Debug)]
struct Known {
    /// The pool's instances, relative links.
    instances: BTreeSet<String>,
    converged: Converged,
}

pub struct GceProvider {
    cluster: ClusterIdentity,
    api: Api,
    /// The nodes' VPC network, as a URL.
    network: String,
    /// `--gce-node-tags`; empty means read from the instances.
    node_tags: Vec<String>,
    known: Mutex<HashMap<String, Known>>,
    /// Instance path → its tag for firewall rules.
    instance_tags: Mutex<HashMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is one map operation; a poisoned lock is still sound.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GceProvider {
    /// The provider `args` describe, for this cluster: clients on Application Default
    /// Credentials (or none, for a test double).
    pub async fn from_args(
        args: &GceArgs,
        cluster: ClusterIdentity,
    ) -> Result<Self, ProviderError> {
        let missing = |what: &str, flag: &str| ProviderError::Configuration {
            reason: "MissingConfiguration",
            message: format!(
                "no GCE {what}: pass --{flag} (or FERRY_{})",
                flag.to_ascii_uppercase().replace('-', "_")
            ),
        };
        let project = args
            .project
            .clone()
            .ok_or_else(|| missing("project", "gce-project"))?;
        let region = args
            .region
            .clone()
            .ok_or_else(|| missing("region", "gce-region"))?;
        // The clients' TLS is rustls without a built-in provider: ring, as everywhere in ferry.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = args.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        let credentials = args
            .anonymous
            .then(|| google_cloud_auth::credentials::anonymous::Builder::new().build());
        let clients = Clients::build(endpoint, credentials).await?;
        let api = Api::new(
            clients,
            Location { project, region },
            args.api_rate,
            RetryPolicy::default(),
            args.operation_wait,
        );
        Ok(Self::new(
            api,
            cluster,
            &args.network,
            args.node_tags.clone(),
        ))
    }

    pub fn new(api: Api, cluster: ClusterIdentity, network: &str, node_tags: Vec<String>) -> Self {
        let network = if network.contains('/') {
            network.to_string()
        } else {
            api.global("networks", network)
        };
        Self {
            cluster,
            api,
            network,
            node_tags: node_tags
                .into_iter()
                .filter(|t| !t.trim().is_empty())
                .collect(),
            known: Mutex::default(),
            instance_tags: Mutex::default(),
        }
    }

    fn instance_tags(&self) -> MutexGuard<'_, HashMap<String, String>> {
        lock(&self.instance_tags)
    }

    fn plan(&self, desired: &DesiredLoadBalancer) -> Result<Plan, ProviderError> {
        spec::plan(desired, &self.cluster, &self.api.location)
    }

    /// Target updates from memory: `None` when memory does not cover `desired`.
    async fn update_from_memory(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Option<Result<ObservedLoadBalancer, ProviderError>> {
        let plan = self.plan(desired).ok()?;
        let known = lock(&self.known).get(&desired.id.uid).cloned()?;
        let want = self.instance_links(&plan);
        if self.node_tags.is_empty() {
            // New instances may bring new tags for the firewall rules: read them (once
            // each) and fall back to a full ensure if the rules must change.
            let tags = match self.target_tags(&plan).await {
                Ok(t) => t,
                Err(e) => return Some(Err(e)),
            };
            if tags != known.converged.tags {
                return None;
            }
        }
        let uid = desired.id.uid.as_str();
        if let Err(err) = self
            .set_instances(uid, &plan.name, &known.instances, &want)
            .await
        {
            lock(&self.known).remove(uid);
            // The pool may be gone or changed by hand: read everything again.
            if matches!(
                err,
                ProviderError::Configuration { .. } | ProviderError::Transient { .. }
            ) {
                return None;
            }
            return Some(Err(err));
        }
        let instances = want.iter().map(|w| relative(w).to_string()).collect();
        lock(&self.known).insert(
            uid.to_string(),
            Known {
                instances,
                converged: known.converged.clone(),
            },
        );
        Some(Ok(observed(known.converged.ip)))
    }
}

#[async_trait]
impl LoadBalancerProvider for GceProvider {
    fn name(&self) -> &'static str {
        "gce"
    }

    /// Only nodes whose `spec.providerID` names a Compute Engine instance can be in a pool.
    fn can_target(&self, node: &NodeTarget) -> bool {
        node.provider_id
            .as_deref()
            .and_then(spec::instance_of)
            .is_some()
    }

    async fn ensure(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        lock(&self.known).remove(&desired.id.uid);
        let plan = self.plan(desired)?;
        let converged = self.converge(desired, &plan).await?;
        let instances = self
            .instance_links(&plan)
            .iter()
            .map(|w| relative(w).to_string())
            .collect();
        let ip = converged.ip;
        lock(&self.known).insert(
            desired.id.uid.clone(),
            Known {
                instances,
                converged,
            },
        );
        Ok(observed(ip))
    }

    async fn update_targets(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        match self.update_from_memory(desired).await {
            Some(result) => result,
            None => self.ensure(desired).await,
        }
    }

    async fn delete(&self, id: &LoadBalancerId) -> Result<(), ProviderError> {
        lock(&self.known).remove(&id.uid);
        self.remove(id).await
    }

    async fn get(
        &self,
        id: &LoadBalancerId,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        let name = spec::base_name(&self.cluster.id, &id.uid);
        let Some(rule) = self.find_any_rule(&name).await? else {
            return Ok(None);
        };
        Ok(rule
            .ip_address
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .map(observed))
    }

    async fn list_owned(&self) -> Result<Owned, ProviderError> {
        self.owned().await
    }

    fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "ferry_gce_api_calls",
            "Compute Engine API calls (each attempt), by operation and outcome (ok, throttled, server_error, network_error, client_error)",
            self.api.calls.counts().clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The client's TLS stack comes up on ring (no provider of its own is compiled in), and a
    /// GCE that cannot be reached is a transient failure, never a panic.
    #[tokio::test]
    async fn an_unreachable_https_endpoint_is_a_transient_error() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        drop(listener);
        let anonymous = google_cloud_auth::credentials::anonymous::Builder::new().build();
        let clients = Clients::build(&endpoint, Some(anonymous)).await.unwrap();
        let retry = RetryPolicy {
            attempts: 2,
            base: Duration::from_millis(1),
            max: Duration::from_millis(1),
        };
        let location = Location {
            project: "p".into(),
            region: "r".into(),
        };
        let api = Api::new(clients, location, 100.0, retry, Duration::from_secs(1));
        let cluster = ClusterIdentity {
            id: "c".into(),
            uid: "u".into(),
        };
        let provider = GceProvider::new(api, cluster, "default", Vec::new());
        let err = provider.list_owned().await.unwrap_err();
        assert_eq!(err.kind(), "transient", "{err}");
        let counts = provider.api.calls.counts().get_or_create(&vec![
            ("operation", "addresses.list".to_string()),
            ("outcome", "network_error".to_string()),
        ]);
        assert_eq!(counts.get(), 2, "each attempt is counted");
    }
}
