//! The operator against a real kube-apiserver and etcd, as a real process with exactly
//! ferry's RBAC: creation, deletion through the finalizer, type changes, other classes,
//! kill and restart.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::shared;
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::*;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_gets_an_address_and_gives_it_back() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "lifecycle").await.unwrap();
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
    pools
        .create(
            &PostParams::default(),
            &pool("lifecycle", &["127.240.1.0/30"]),
        )
        .await
        .unwrap();
    let mut operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[]).unwrap();

    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    svcs.create(&PostParams::default(), &lb_service("web", &[80]))
        .await
        .unwrap();
    let ip = wait_for_ingress(&svcs, "web", WAIT).await;
    assert_eq!(ip, "127.240.1.0");
    let svc = svcs.get("web").await.unwrap();
    assert!(
        svc.finalizers()
            .contains(&"ferry.dev/load-balancer".to_string())
    );
    let status = svc.status.unwrap();
    assert_eq!(
        status.load_balancer.unwrap().ingress.unwrap()[0]
            .ip_mode
            .as_deref(),
        Some("Proxy")
    );
    let cond = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "ferry.dev/LoadBalancerReady")
        .unwrap();
    assert_eq!(cond.status, "True");

    // Pool status reports the allocation.
    eventually(WAIT, "pool status", || async {
        let p = pools.get("lifecycle").await.ok()?;
        let s = p.status?;
        (s.allocated == 1 && s.total == 4 && s.available == 3).then_some(())
    })
    .await;

    // LoadBalancer -> ClusterIP: the address and the finalizer go.
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"type": "ClusterIP"}})),
    )
    .await
    .unwrap();
    eventually(WAIT, "finalizer removed and ingress cleared", || async {
        let s = svcs.get("web").await.ok()?;
        (s.finalizers().is_empty() && ingress_ip(&s).is_none()).then_some(())
    })
    .await;
    eventually(WAIT, "address released", || async {
        (pools.get("lifecycle").await.ok()?.status?.allocated == 0).then_some(())
    })
    .await;

    // ...and back: it gets an address again.
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"type": "LoadBalancer"}})),
    )
    .await
    .unwrap();
    wait_for_ingress(&svcs, "web", WAIT).await;

    // Deletion goes through the finalizer and releases the address.
    delete_and_wait(&svcs, "web", WAIT).await;
    eventually(WAIT, "address released after delete", || async {
        (pools.get("lifecycle").await.ok()?.status?.allocated == 0).then_some(())
    })
    .await;

    let log = operator.log_text();
    assert!(operator.is_running(), "operator exited:\n{log}");
    assert!(
        !log.contains("Forbidden"),
        "the operator's RBAC is not enough:\n{log}"
    );
    operator.terminate();
    delete_pools(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_of_another_class_is_never_touched() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "other-class").await.unwrap();
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
    pools
        .create(
            &PostParams::default(),
            &pool("other-class", &["127.240.2.0/30"]),
        )
        .await
        .unwrap();
    let operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[]).unwrap();

    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let mut theirs = lb_service("theirs", &[80]);
    theirs.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
    svcs.create(&PostParams::default(), &theirs).await.unwrap();
    svcs.create(&PostParams::default(), &lb_service("ours", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "ours", WAIT).await;
    let theirs = svcs.get("theirs").await.unwrap();
    assert!(theirs.finalizers().is_empty());
    assert!(
        theirs
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .is_none()
    );
    assert_eq!(
        theirs
            .metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .filter(|m| m.manager.as_deref() == Some("ferry-operator"))
            .count(),
        0
    );

    delete_and_wait(&svcs, "ours", WAIT).await;
    drop(operator);
    delete_pools(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_work_and_restarted_it_converges_without_duplicates() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "restart").await.unwrap();
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
    pools
        .create(
            &PostParams::default(),
            &pool("restart", &["127.240.3.0/26"]),
        )
        .await
        .unwrap();
    let mut operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[]).unwrap();
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);

    for i in 0..15 {
        svcs.create(&PostParams::default(), &lb_service(&format!("s{i}"), &[80]))
            .await
            .unwrap();
    }
    // Kill while it is working through them, create more while it is down, restart.
    tokio::time::sleep(Duration::from_millis(300)).await;
    operator.kill();
    for i in 15..30 {
        svcs.create(&PostParams::default(), &lb_service(&format!("s{i}"), &[80]))
            .await
            .unwrap();
    }
    operator.restart().unwrap();

    let mut ips = BTreeSet::new();
    for i in 0..30 {
        let ip = wait_for_ingress(&svcs, &format!("s{i}"), WAIT).await;
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
    }
    // Once more, with everything present: the rebuild keeps every address where it is.
    operator.restart().unwrap();
    let fresh = lb_service("after-restart", &[80]);
    svcs.create(&PostParams::default(), &fresh).await.unwrap();
    let ip = wait_for_ingress(&svcs, "after-restart", WAIT).await;
    assert!(!ips.contains(&ip), "{ip} was already taken");
    for i in 0..30 {
        let svc = svcs.get(&format!("s{i}")).await.unwrap();
        assert!(ips.contains(&ingress_ip(&svc).unwrap()));
    }

    for i in 0..30 {
        delete_and_wait(&svcs, &format!("s{i}"), WAIT).await;
    }
    delete_and_wait(&svcs, "after-restart", WAIT).await;
    operator.terminate();
    delete_pools(&admin).await;
}
