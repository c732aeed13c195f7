//! The AWS provider: one Network Load Balancer per Service, through ELBv2 and EC2.
//!
//! `spec::plan` turns a `DesiredLoadBalancer` into the NLB it should be; `converge` reads
//! what exists (found by deterministic names, never by "create and see") and changes only
//! what differs. After a successful `ensure` the provider remembers each target group's
//! registered targets, so a node change is one `RegisterTargets` and one
//! `DeregisterTargets` per changed group and no Describe call at all; a restart (empty
//! memory) or an error falls back to a full `ensure`. Every call goes through `calls::Calls`
//! (budget, retries, metrics).
//!
//! Resources and the order they are made in: the security group (so `loadBalancerSourceRanges`
//! can be enforced, and changed later, on the NLB), the balancer, the target groups with
//! their targets, the listeners. Deletion goes the other way round and tolerates absence
//! at every step, so an interrupted delete simply runs again.

mod args;
pub mod calls;
mod converge;
pub mod options;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use prometheus_client::registry::Registry;

use crate::{
    ClusterIdentity, DesiredLoadBalancer, LoadBalancerId, LoadBalancerProvider, NodeTarget,
    ObservedLoadBalancer, Owned, ProviderError,
};
pub use args::AwsArgs;
use calls::{Calls, RetryPolicy};

/// The SDK's HTTPS client, on rustls with ring.
pub fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// How the AWS provider is set up.
#[derive(Clone, Debug)]
pub struct AwsConfig {
    /// Tags every resource and scopes orphan collection to this cluster (both marks).
    pub cluster: ClusterIdentity,
    /// The region; `None` takes the SDK's default chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// AWS calls per second across all Services (the call budget), with bursts of twice it.
    pub calls_per_second: f64,
    pub retry: RetryPolicy,
}

impl AwsConfig {
    /// The configuration `args` give, for this cluster.
    pub fn from_args(args: &AwsArgs, cluster: ClusterIdentity) -> Self {
        Self {
            region: args.region.clone(),
            calls_per_second: args.api_rate,
            ..Self::new(cluster)
        }
    }

    pub fn new(cluster: ClusterIdentity) -> Self {
        Self {
            cluster,
            region: None,
            calls_per_second: 10.0,
            retry: RetryPolicy::default(),
        }
    }
}

/// What ferry knows of one balancer after it converged it.
#[derive(Clone, Debug)]
struct Known {
    /// Target group name → its ARN, NodePort and registered targets.
    groups: BTreeMap<String, KnownGroup>,
    observed: ObservedLoadBalancer,
}

#[derive(Clone, Debug)]
struct KnownGroup {
    arn: String,
    node_port: u16,
    targets: BTreeSet<(String, u16)>,
}

pub struct AwsProvider {
    cluster: ClusterIdentity,
    /// `cluster.id`, which names resources.
    cluster_id: String,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    ec2: aws_sdk_ec2::Client,
    calls: Calls,
    known: Mutex<HashMap<String, Known>>,
}

impl AwsProvider {
    /// Builds the clients from the SDK's default credential chain (environment, web identity
    /// for IRSA, profile, instance metadata). `AWS_ENDPOINT_URL` points them elsewhere.
    pub async fn from_env(config: AwsConfig) -> Result<Self, ProviderError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client())
            // Retries are ours (calls.rs), so that each attempt is counted and budgeted.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(ProviderError::Configuration {
                reason: "NoRegion",
                message: "no AWS region: pass --aws-region or set AWS_REGION".into(),
            });
        }
        Ok(Self::with_clients(
            config,
            aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            aws_sdk_ec2::Client::new(&sdk),
        ))
    }

    pub fn with_clients(
        config: AwsConfig,
        elb: aws_sdk_elasticloadbalancingv2::Client,
        ec2: aws_sdk_ec2::Client,
    ) -> Self {
        Self {
            cluster_id: config.cluster.id.clone(),
            cluster: config.cluster,
            elb,
            ec2,
            calls: Calls::new(config.calls_per_second, config.retry),
            known: Mutex::default(),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        // Each critical section is one map operation; a poisoned lock is still sound.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Target updates from memory: `None` when memory does not cover `desired`.
    async fn update_from_memory(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Option<Result<ObservedLoadBalancer, ProviderError>> {
        let spec = spec::plan(desired, &self.cluster).ok()?;
        let mut known = self.known().get(&desired.id.uid).cloned()?;
        let wanted: BTreeSet<&str> = spec.target_groups.iter().map(|t| t.name.as_str()).collect();
        if !known
            .groups
            .keys()
            .map(String::as_str)
            .eq(wanted.iter().copied())
        {
            return None;
        }
        for group in known.groups.values_mut() {
            let want = spec::targets(desired, group.node_port);
            if let Err(err) = self.set_targets(&group.arn, &group.targets, &want).await {
                // The group may be gone or changed by hand: read everything again.
                self.known().remove(&desired.id.uid);
                if err.is("TargetGroupNotFound") || err.is("InvalidTarget") {
                    return None;
                }
                return Some(Err(err.into()));
            }
            group.targets = want;
        }
        let observed = known.observed.clone();
        self.known().insert(desired.id.uid.clone(), known);
        Some(Ok(observed))
    }
}

#[async_trait]
impl LoadBalancerProvider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    /// Only nodes whose `spec.providerID` names an EC2 instance can be instance targets.
    fn can_target(&self, node: &NodeTarget) -> bool {
        node.provider_id
            .as_deref()
            .and_then(spec::instance_id)
            .is_some()
    }

    async fn ensure(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        let result = self.converge(desired).await;
        match result {
            Ok((groups, observed)) => {
                self.known().insert(
                    desired.id.uid.clone(),
                    Known {
                        groups,
                        observed: observed.clone(),
                    },
                );
                Ok(observed)
            }
            Err(err) => {
                self.known().remove(&desired.id.uid);
                Err(err)
            }
        }
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
        self.known().remove(&id.uid);
        self.remove(id).await
    }

    async fn get(
        &self,
        id: &LoadBalancerId,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        let name = spec::balancer_name(&self.cluster_id, &id.uid);
        Ok(self
            .find_balancer(&name)
            .await?
            .map(|lb| converge::observed(&lb, &[])))
    }

    async fn list_owned(&self) -> Result<Owned, ProviderError> {
        self.owned().await
    }

    fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "ferry_aws_api_calls",
            "AWS API calls (each attempt), by operation and outcome (ok, throttled, server_error, network_error, client_error)",
            self.calls.counts().clone(),
        );
    }
}
