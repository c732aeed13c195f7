//! Faults that need a control plane of their own: `410 Gone` from stale watches (the watch
//! cache is off and kube-apiserver compacts etcd every second, so an operator cut off for a
//! few seconds resumes from a compacted resourceVersion), and `429 Too Many Requests` (tiny
//! in-flight limits with priority and fairness off).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, Options, start_in_keeper_thread};
use ferry_e2e::fault_proxy::FaultProxy;
use ferry_e2e::operator::{CHART_ELECTION_TIMINGS, OperatorProcess};
use ferry_e2e::scenario::*;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Retries a call that the throttled apiserver may refuse with 429 (the test's own writes).
async fn retrying<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempts = 0;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(kube::Error::Api(e)) if e.code == 429 && attempts < 200 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_watches_get_410_gone_and_the_operator_relists() {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    let cp = CP.get_or_init(|| {
        start_in_keeper_thread(Options {
            compaction_interval: Duration::from_secs(1),
            watch_cache: false,
            ..Options::default()
        })
    });
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "gone").await.unwrap();
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(&PostParams::default(), &pool("gone", &["127.240.20.0/27"]))
        .await
        .unwrap();
    let proxy = FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], cp.port)))
        .await
        .unwrap();
    let path = cp.dir.join("gone.kubeconfig");
    std::fs::write(&path, cp.kubeconfig_via(&proxy.url(), &cp.operator_token)).unwrap();
    // The chart's election timings: the 4 s cut below is shorter than the renew deadline.
    let operator = OperatorProcess::start(&path, &cp.dir, &CHART_ELECTION_TIMINGS).unwrap();
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    svcs.create(&PostParams::default(), &lb_service("before", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "before", WAIT).await;

    // Cut the operator off; meanwhile the cluster moves on and etcd compacts the history its
    // watches would resume from.
    proxy.set_outage(true);
    let churn: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    for i in 0..20 {
        let cm: ConfigMap =
            serde_json::from_value(json!({ "metadata": { "name": format!("churn-{i}") } }))
                .unwrap();
        churn.create(&PostParams::default(), &cm).await.unwrap();
    }
    svcs.create(&PostParams::default(), &lb_service("while-away", &[80]))
        .await
        .unwrap();
    svcs.patch(
        "before",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "type": "ClusterIP" } })),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_outage(false);

    wait_for_ingress(&svcs, "while-away", WAIT).await;
    eventually(
        WAIT,
        "the address of the Service that left to be released",
        || async {
            let s = svcs.get("before").await.ok()?;
            (s.finalizers().is_empty() && ingress_ip(&s).is_none()).then_some(())
        },
    )
    .await;
    let log = operator.log_text();
    let lower = log.to_lowercase();
    assert!(
        ["410", "too old", "expired", "compacted"]
            .iter()
            .any(|w| lower.contains(w)),
        "the operator never met a 410; the fault was not real:\n{log}"
    );
    if let Some(line) = log.lines().find(|l| {
        let l = l.to_lowercase();
        ["410", "too old", "expired", "compacted"]
            .iter()
            .any(|w| l.contains(w))
    }) {
        eprintln!("the operator met: {line}");
    }
    delete_and_wait(&svcs, "while-away", WAIT).await;
    drop(operator);
    delete_pools(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_apiserver_answers_429_and_everything_converges() {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    let cp = CP.get_or_init(|| {
        start_in_keeper_thread(Options {
            max_inflight: Some((1, 1)),
            ..Options::default()
        })
    });
    let admin = cp.admin_client().await.unwrap();
    let mut attempts = 0;
    let ns = loop {
        match namespace(&admin, "throttled").await {
            Ok(ns) => break ns,
            Err(e) if attempts < 200 => {
                attempts += 1;
                tracing::debug!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
    let pp = PostParams::default();
    let throttled_pool = pool("throttled", &["127.240.21.0/26"]);
    retrying(|| pools.create(&pp, &throttled_pool)).await;
    let operator =
        OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &["--concurrency", "16"]).unwrap();
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let count = 40;
    for i in 0..count {
        let svc = lb_service(&format!("s{i}"), &[80]);
        retrying(|| svcs.create(&pp, &svc)).await;
    }
    let mut ips = BTreeSet::new();
    for i in 0..count {
        let name = format!("s{i}");
        let ip = eventually(WAIT, &format!("ingress of {name}"), || async {
            svcs.get_opt(&name)
                .await
                .ok()
                .flatten()
                .as_ref()
                .and_then(ingress_ip)
        })
        .await;
        assert!(ips.insert(ip));
    }
    // Proof the fault was real: kube-apiserver counted 429s.
    let metrics = retrying(|| {
        let admin = admin.clone();
        async move {
            admin
                .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
                .await
        }
    })
    .await;
    let throttled: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("code=\"429\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(throttled > 0.0, "no 429 was ever served");
    eprintln!("kube-apiserver answered {throttled} requests with 429");
    drop(operator);
}
