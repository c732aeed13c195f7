//! Helpers that make end-to-end tests read as their scenario: a namespace per test, Service
//! and pool objects, waiting for a condition with a deadline, and one test at a time per
//! control plane (tests share cluster-scoped state such as pools).

use std::future::Future;
use std::time::{Duration, Instant};

use ferry_crds::{LoadBalancerPool, LoadBalancerPoolSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
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

/// Deletes a Service whose finalizer nobody will release (its cloud is gone, or no operator
/// runs) and waits until it is gone. It deletes first: once the deletion is marked, the API
/// server refuses new finalizers, so an operator still reconciling the Service cannot put its
/// finalizer back after it is stripped. Says whether the Service is gone within `timeout`.
pub async fn force_delete(api: &Api<Service>, name: &str, timeout: Duration) -> bool {
    let _ = api.delete(name, &DeleteParams::default()).await;
    let deadline = Instant::now() + timeout;
    loop {
        let _ = api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await;
        if matches!(api.get_opt(name).await, Ok(None)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Removes the Nodes named `<prefix>-…`; tests also run it first, for what a failed earlier
/// test left.
pub async fn delete_nodes(client: &Client, prefix: &str) {
    let api: Api<Node> = Api::all(client.clone());
    let Ok(nodes) = api.list(&ListParams::default()).await else {
        return;
    };
    for n in nodes {
        if n.name_any().starts_with(&format!("{prefix}-")) {
            let _ = api.delete(&n.name_any(), &DeleteParams::default()).await;
        }
    }
}

/// Deletes the Services of `class` a failed earlier test left behind, finalizers and all
/// (the cloud they were made in is gone), so that a test's operator sees only its own.
pub async fn sweep_class(client: &Client, class: &str) {
    let all: Api<Service> = Api::all(client.clone());
    let Ok(services) = all.list(&ListParams::default()).await else {
        return;
    };
    for svc in services {
        if svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref())
            != Some(class)
        {
            continue;
        }
        let api: Api<Service> =
            Api::namespaced(client.clone(), &svc.namespace().unwrap_or_default());
        let _ = force_delete(&api, &svc.name_any(), Duration::from_secs(10)).await;
    }
}

/// (status, reason, message) of a Service's `ferry.dev/LoadBalancerReady` condition.
pub async fn ready_condition(api: &Api<Service>, name: &str) -> Option<(String, String, String)> {
    let svc = api.get(name).await.ok()?;
    let c = svc
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "ferry.dev/LoadBalancerReady")?;
    Some((c.status, c.reason, c.message))
}

/// The text of a process's `/metrics`, scraped with curl (a client ferry did not write).
pub async fn metrics_text(addr: std::net::SocketAddr) -> String {
    match tokio::process::Command::new("curl")
        .args(["-s", &format!("http://{addr}/metrics")])
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).to_string(),
        Err(_) => String::new(),
    }
}
