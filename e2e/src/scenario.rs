//! Helpers that make end-to-end tests read as their scenario: a namespace per test, Service
//! and pool objects, waiting for a condition with a deadline, and one test at a time per
//! control plane (tests share cluster-scoped state such as pools).

use std::future::Future;
use std::time::{Duration, Instant};

use ferry_crds::{LoadBalancerPool, LoadBalancerPoolSpec};
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::{Mutex, MutexGuard};

/// Serializes tests that share one control plane.
pub async fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A namespace of one's own, named after the test.
pub async fn namespace(client: &Client, test: &str) -> anyhow::Result<String> {
    let name = format!(
        "{}-{}",
        test.replace('_', "-"),
        jiff::Timestamp::now().as_millisecond() % 100_000
    );
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(name)
}

/// A `type: LoadBalancer` Service with TCP ports.
pub fn lb_service(name: &str, ports: &[i32]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(format!("p{p}")),
                        port: *p,
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

pub fn pool(name: &str, addresses: &[&str]) -> LoadBalancerPool {
    LoadBalancerPool::new(name, LoadBalancerPoolSpec::with_addresses(addresses))
}

/// The first ingress address of a Service, once it has one.
pub fn ingress_ip(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .clone()
}

/// Waits until `name` has an ingress address and returns it.
pub async fn wait_for_ingress(api: &Api<Service>, name: &str, timeout: Duration) -> String {
    eventually(timeout, &format!("ingress of Service {name}"), || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .as_ref()
            .and_then(ingress_ip)
    })
    .await
}

/// Deletes a Service and waits until it is gone (its finalizer released).
pub async fn delete_and_wait(api: &Api<Service>, name: &str, timeout: Duration) {
    let _ = api.delete(name, &DeleteParams::default()).await;
    eventually(timeout, &format!("Service {name} to be gone"), || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await
}

/// Deletes every LoadBalancerPool (cluster-scoped state a test must not leave behind).
pub async fn delete_pools(client: &Client) {
    let api: Api<LoadBalancerPool> = Api::all(client.clone());
    if let Ok(list) = api.list(&Default::default()).await {
        for p in list {
            let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
        }
    }
}

/// The identity the operator reads for this control plane (`--cluster-id` and the
/// `kube-system` namespace's UID), for tests that drive a provider directly.
pub async fn cluster_identity(
    client: &Client,
    cluster_id: &str,
) -> anyhow::Result<ferry_providers::ClusterIdentity> {
    let ns = Api::<Namespace>::all(client.clone())
        .get("kube-system")
        .await?;
    Ok(ferry_providers::ClusterIdentity {
        id: cluster_id.to_string(),
        uid: ns.uid().unwrap_or_default(),
    })
}
