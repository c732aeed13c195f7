//! The local provider through its trait, with a mocked API server that serves pools,
//! namespaces and Services and parks watches: allocation, bad input, release, and the
//! rebuild from Services' status that makes restarts safe.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_crds::{LoadBalancerPool, LoadBalancerPoolSpec};
use http::{Request, Response};
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServiceSpec, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::client::Body;
use serde_json::json;

use super::*;
use crate::{IpFamily, PortSpec};

struct Cluster {
    pools: Vec<LoadBalancerPool>,
    services: Vec<Service>,
}

fn pool(name: &str, addresses: &[&str]) -> LoadBalancerPool {
    let mut p = LoadBalancerPool::new(name, LoadBalancerPoolSpec::with_addresses(addresses));
    p.metadata.resource_version = Some("1".into());
    p
}

fn list(kind: &str, items: serde_json::Value) -> serde_json::Value {
    json!({ "kind": kind, "apiVersion": "v1", "metadata": { "resourceVersion": "1" }, "items": items })
}

/// Starts a provider against a mock API server holding `cluster`; watches are parked.
fn provider(cluster: Cluster) -> (LocalProvider, Arc<Mutex<Vec<serde_json::Value>>>) {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let status_writes = Arc::new(Mutex::new(Vec::new()));
    let writes = status_writes.clone();
    tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let method = req.method().clone();
            if query.contains("watch=true") {
                parked.push(send);
                continue;
            }
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let reply = if path.ends_with("/loadbalancerpools") {
                list(
                    "LoadBalancerPoolList",
                    serde_json::to_value(&cluster.pools).unwrap(),
                )
            } else if path == "/api/v1/namespaces" {
                list("NamespaceList", json!([]))
            } else if path == "/api/v1/services" {
                list(
                    "ServiceList",
                    serde_json::to_value(&cluster.services).unwrap(),
                )
            } else if method == http::Method::PATCH && path.ends_with("/status") {
                let patch: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                writes
                    .lock()
                    .unwrap()
                    .push(json!({ "path": path, "patch": patch }));
                let name = path.split('/').rev().nth(1).unwrap_or_default();
                serde_json::to_value(pool(name, &[])).unwrap()
            } else {
                json!({})
            };
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&reply).unwrap(),
            )));
        }
    });
    let client = Client::new(mock, "default");
    let lens: ServiceLens = Arc::new(|svc: &Service| {
        let spec = svc.spec.as_ref()?;
        (spec.type_.as_deref() == Some("LoadBalancer")).then(|| Ok(desired_of(svc)))
    });
    (
        LocalProvider::new(LocalConfig {
            client,
            class: crate::class::DEFAULT_LOCAL_CLASS.into(),
            lens,
            repair_interval: Duration::from_secs(3600),
        }),
        status_writes,
    )
}

fn desired_of(svc: &Service) -> DesiredLoadBalancer {
    let mut d = desired(&svc.metadata.name.clone().unwrap_or_default());
    d.id.uid = svc.metadata.uid.clone().unwrap_or_default();
    d
}

fn desired(name: &str) -> DesiredLoadBalancer {
    DesiredLoadBalancer {
        id: LoadBalancerId {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        },
        ports: vec![PortSpec {
            name: None,
            protocol: Protocol::Tcp,
            port: 80,
            node_port: Some(30080),
        }],
        targets: vec![],
        ip_families: vec![IpFamily::V4],
        ip_family_policy: Default::default(),
        requested_ips: vec![],
        requested_pool: None,
        sharing_key: None,
        source_ranges: vec![],
        traffic_policy: Default::default(),
        session_affinity: Default::default(),
        service_labels: Default::default(),
        annotations: Default::default(),
    }
}

fn lb_service(name: &str, age: i64, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            creation_timestamp: Some(Time(
                jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
            )),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            conditions: None,
        }),
    }
}

fn ip_of(o: &ObservedLoadBalancer) -> String {
    o.ingress[0].ip.unwrap().to_string()
}

#[tokio::test]
async fn allocates_from_pools_and_publishes_proxy_mode() {
    let (p, writes) = provider(Cluster {
        pools: vec![pool("default", &["192.0.2.0/30"])],
        services: vec![],
    });
    p.start().await.unwrap();
    let o = p.ensure(&desired("a")).await.unwrap();
    assert_eq!(ip_of(&o), "192.0.2.0");
    assert_eq!(o.ingress[0].ip_mode, Some(IpMode::Proxy));
    // Idempotent.
    assert_eq!(p.ensure(&desired("a")).await.unwrap(), o);
    assert_eq!(p.get(&desired("a").id).await.unwrap(), Some(o));
    assert_eq!(p.list_owned().await.unwrap().ours, vec![desired("a").id]);

    let mut vip = desired("b");
    vip.annotations
        .insert(IP_MODE_ANNOTATION.into(), "VIP".into());
    assert_eq!(
        p.ensure(&vip).await.unwrap().ingress[0].ip_mode,
        Some(IpMode::Vip)
    );

    // Pool status is written with the usage.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let w = writes.lock().unwrap().clone();
    let last = w.last().expect("pool status written");
    assert_eq!(last["patch"]["status"]["allocated"], 2);
    assert_eq!(last["patch"]["status"]["total"], 4);
    assert_eq!(last["patch"]["status"]["conditions"][0]["status"], "True");
    // The metric's states add up to the pool's size.
    let mut registry = prometheus_client::registry::Registry::default();
    p.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "ferry_pool_addresses{pool=\"default\",state=\"allocated\"} 2",
        "ferry_pool_addresses{pool=\"default\",state=\"available\"} 2",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert!(!text.contains("state=\"total\""), "{text}");
}

#[tokio::test]
async fn bad_input_allocates_nothing_and_leaves_others_alone() {
    let (p, _) = provider(Cluster {
        pools: vec![pool("default", &["192.0.2.0/30"])],
        services: vec![],
    });
    p.start().await.unwrap();
    let first = p.ensure(&desired("a")).await.unwrap();

    let mut sctp = desired("sctp");
    sctp.ports[0].protocol = Protocol::Sctp;
    let err = p.ensure(&sctp).await.unwrap_err();
    assert_eq!(err.reason(), "UnsupportedProtocol");
    assert!(matches!(err, ProviderError::InvalidInput { .. }));

    let mut annotated = desired("ann");
    annotated
        .annotations
        .insert(IP_MODE_ANNOTATION.into(), "bridge".into());
    let err = p.ensure(&annotated).await.unwrap_err();
    assert_eq!(err.reason(), "InvalidAnnotation");
    assert!(err.to_string().contains(IP_MODE_ANNOTATION));

    let mut proxy = desired("proxy");
    proxy
        .annotations
        .insert(PROXY_PROTOCOL_ANNOTATION.into(), "v1".into());
    let err = p.ensure(&proxy).await.unwrap_err();
    assert_eq!(err.reason(), "InvalidAnnotation");
    assert!(err.to_string().contains(PROXY_PROTOCOL_ANNOTATION));

    let mut taken = desired("taken");
    taken.requested_ips = vec!["192.0.2.0".parse().unwrap()];
    let err = p.ensure(&taken).await.unwrap_err();
    assert_eq!(err.reason(), "IPInUse");
    assert!(matches!(err, ProviderError::Allocation { .. }));

    let mut outside = desired("outside");
    outside.requested_ips = vec!["10.1.2.3".parse().unwrap()];
    assert_eq!(
        p.ensure(&outside).await.unwrap_err().reason(),
        "IPNotInAnyPool"
    );

    assert_eq!(p.list_owned().await.unwrap().ours, vec![desired("a").id]);
    assert_eq!(p.ensure(&desired("a")).await.unwrap(), first);
}

#[tokio::test]
async fn release_signals_freed_capacity() {
    let (p, _) = provider(Cluster {
        pools: vec![pool("default", &["192.0.2.0/32"])],
        services: vec![],
    });
    let mut signals = p.take_signals().unwrap();
    p.start().await.unwrap();
    p.ensure(&desired("a")).await.unwrap();
    assert_eq!(
        p.ensure(&desired("b")).await.unwrap_err().reason(),
        "PoolExhausted"
    );
    while signals.try_recv().is_ok() {}
    p.delete(&desired("a").id).await.unwrap();
    // Pool refreshes may interleave their own signal; the release must be among them.
    let freed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(s) = signals.recv().await {
            if s == ProviderSignal::CapacityFreed {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(freed, Ok(true));
    // Deleting again is fine and frees nothing.
    p.delete(&desired("a").id).await.unwrap();
    while let Ok(s) = signals.try_recv() {
        assert_ne!(s, ProviderSignal::CapacityFreed);
    }
    assert_eq!(ip_of(&p.ensure(&desired("b")).await.unwrap()), "192.0.2.0");
}

#[tokio::test]
async fn restart_rebuilds_from_status_and_never_hands_out_an_address_twice() {
    let (p, _) = provider(Cluster {
        pools: vec![pool("default", &["192.0.2.0/29"])],
        services: vec![
            lb_service("old", 0, "192.0.2.0"),
            lb_service("young", 10, "192.0.2.0"),
            lb_service("other", 5, "192.0.2.3"),
        ],
    });
    let mut signals = p.take_signals().unwrap();
    assert!(
        p.ensure(&desired("new")).await.is_err(),
        "no allocation before the rebuild"
    );
    p.start().await.unwrap();
    // Fresh Services get neither restored address.
    let fresh = ip_of(&p.ensure(&desired("new")).await.unwrap());
    assert_eq!(fresh, "192.0.2.1");
    assert_eq!(
        ip_of(&p.ensure(&desired("other")).await.unwrap()),
        "192.0.2.3"
    );
    assert_eq!(
        ip_of(&p.ensure(&desired("old")).await.unwrap()),
        "192.0.2.0"
    );
    // The younger of two Services claiming one address is told to re-ensure, and moves.
    let mut resynced = None;
    while let Ok(s) = signals.try_recv() {
        if let ProviderSignal::Resync(ids) = s {
            resynced = Some(ids);
        }
    }
    assert_eq!(resynced.unwrap()[0].name, "young");
    assert_eq!(
        ip_of(&p.ensure(&desired("young")).await.unwrap()),
        "192.0.2.2"
    );
}

#[tokio::test]
async fn pool_status_updates_do_not_requeue_every_service() {
    let (p, _) = provider(Cluster {
        pools: vec![pool("default", &["192.0.2.0/30"])],
        services: vec![],
    });
    let mut signals = p.take_signals().unwrap();
    p.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    while signals.try_recv().is_ok() {}
    // The watch delivers the pools again (as it does after every status write of ours):
    // their specs are unchanged, so nothing is signalled.
    p.inner.refresh_pools().await;
    p.inner.refresh_pools().await;
    assert!(signals.try_recv().is_err());
}

#[tokio::test]
async fn a_standby_lists_and_watches_nothing_until_it_starts() {
    let (p, _) = provider(Cluster {
        pools: vec![pool("default", &["192.0.2.0/30"])],
        services: vec![],
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!p.is_running(), "no background work before start");
    p.start().await.unwrap();
    assert!(p.is_running());
    p.stop().await;
    assert!(!p.is_running());
    assert!(
        p.ensure(&desired("a")).await.is_err(),
        "a stopped provider allocates nothing"
    );
}

#[tokio::test]
async fn pools_of_another_class_are_never_allocated_from() {
    let mut lan = pool("lan", &["198.51.100.0/30"]);
    lan.spec.load_balancer_classes = vec!["example.com/lan".into()];
    let (p, _) = provider(Cluster {
        pools: vec![lan, pool("default", &["192.0.2.0/31"])],
        services: vec![],
    });
    p.start().await.unwrap();
    assert_eq!(ip_of(&p.ensure(&desired("a")).await.unwrap()), "192.0.2.0");
    assert_eq!(ip_of(&p.ensure(&desired("b")).await.unwrap()), "192.0.2.1");
    assert_eq!(
        p.ensure(&desired("c")).await.unwrap_err().reason(),
        "PoolExhausted",
        "the other class's free addresses are not ours"
    );
    let mut asks = desired("asks");
    asks.requested_ips = vec!["198.51.100.1".parse().unwrap()];
    let err = p.ensure(&asks).await.unwrap_err();
    assert_eq!(err.reason(), "PoolOfAnotherClass");
    assert!(err.to_string().contains("\"lan\""), "{err}");
    let mut named = desired("named");
    named.requested_pool = Some("lan".into());
    assert_eq!(
        p.ensure(&named).await.unwrap_err().reason(),
        "PoolOfAnotherClass"
    );
}

/// A mock API server whose Service lists wait for the test's go-ahead, so a test can act
/// between the moment a list is answered by the server and the moment the caller sees it.
fn provider_with_held_lists(
    cluster: Cluster,
) -> (
    LocalProvider,
    tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
) {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (held_tx, held_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut parked = Vec::new();
        let mut lists = 0;
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            if query.contains("watch=true") {
                parked.push(send);
                continue;
            }
            let reply = if path.ends_with("/loadbalancerpools") {
                list(
                    "LoadBalancerPoolList",
                    serde_json::to_value(&cluster.pools).unwrap(),
                )
            } else if path == "/api/v1/namespaces" {
                list("NamespaceList", json!([]))
            } else if path == "/api/v1/services" {
                lists += 1;
                // The list is what the server saw now; its answer waits (after the first,
                // which is the rebuild's).
                let body = list(
                    "ServiceList",
                    serde_json::to_value(&cluster.services).unwrap(),
                );
                if lists > 1 {
                    let (go, wait) = tokio::sync::oneshot::channel();
                    let _ = held_tx.send(go).await;
                    tokio::spawn(async move {
                        let _ = wait.await;
                        send.send_response(Response::new(Body::from(
                            serde_json::to_vec(&body).unwrap(),
                        )));
                    });
                    continue;
                }
                body
            } else {
                json!({})
            };
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&reply).unwrap(),
            )));
        }
    });
    let lens: ServiceLens = Arc::new(|svc: &Service| {
        let spec = svc.spec.as_ref()?;
        (spec.type_.as_deref() == Some("LoadBalancer")).then(|| Ok(desired_of(svc)))
    });
    (
        LocalProvider::new(LocalConfig {
            client: Client::new(mock, "default"),
            class: crate::class::DEFAULT_LOCAL_CLASS.into(),
            lens,
            repair_interval: Duration::from_secs(3600),
        }),
        held_rx,
    )
}

#[tokio::test]
async fn the_repair_pass_never_releases_an_allocation_newer_than_its_list() {
    let (p, mut held) = provider_with_held_lists(Cluster {
        pools: vec![pool("default", &["192.0.2.0/30"])],
        services: vec![lb_service("old", 0, "192.0.2.0")],
    });
    p.start().await.unwrap();
    let inner = p.inner.clone();
    let repair = tokio::spawn(async move { inner.repair().await });
    // The server has answered the list (without "new", which does not exist yet)...
    let go = held.recv().await.unwrap();
    // ...and "new" is allocated before the answer reaches the repair pass.
    let new = ip_of(&p.ensure(&desired("new")).await.unwrap());
    assert_eq!(new, "192.0.2.1");
    go.send(()).unwrap();
    repair.await.unwrap().unwrap();
    assert_eq!(
        p.get(&desired("new").id).await.unwrap().map(|o| ip_of(&o)),
        Some(new.clone()),
        "the new Service keeps its address"
    );
    assert_ne!(
        ip_of(&p.ensure(&desired("next")).await.unwrap()),
        new,
        "nobody else gets it"
    );
}

#[tokio::test]
async fn the_repair_pass_releases_what_its_list_proves_gone() {
    let (p, mut held) = provider_with_held_lists(Cluster {
        pools: vec![pool("default", &["192.0.2.0/30"])],
        services: vec![],
    });
    p.start().await.unwrap();
    p.ensure(&desired("gone")).await.unwrap();
    let inner = p.inner.clone();
    let repair = tokio::spawn(async move { inner.repair().await });
    held.recv().await.unwrap().send(()).unwrap();
    repair.await.unwrap().unwrap();
    assert_eq!(
        p.get(&desired("gone").id).await.unwrap(),
        None,
        "a leak is released"
    );
}
