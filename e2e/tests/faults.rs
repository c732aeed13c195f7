//! Real faults against the real control plane: dropped watch connections, an outage, added
//! latency (a TCP fault proxy between operator and apiserver), concurrent writers (real 409s)
//! and leader failover with a killed leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, shared};
use ferry_e2e::fault_proxy::FaultProxy;
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

const WAIT: Duration = Duration::from_secs(45);

async fn proxied_operator(
    cp: &ControlPlane,
    proxy: &FaultProxy,
    name: &str,
    args: &[&str],
) -> OperatorProcess {
    let path = cp.dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, cp.kubeconfig_via(&proxy.url(), &cp.operator_token)).unwrap();
    OperatorProcess::start(&path, &cp.dir, args).unwrap()
}

fn upstream(cp: &ControlPlane) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], cp.port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_an_outage_and_latency_are_survived() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "drops").await.unwrap();
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(&PostParams::default(), &pool("drops", &["127.240.10.0/27"]))
        .await
        .unwrap();
    let proxy = FaultProxy::start(upstream(cp)).await.unwrap();
    let mut operator = proxied_operator(cp, &proxy, "drops", &[]).await;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    svcs.create(&PostParams::default(), &lb_service("before", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "before", WAIT).await;

    // Every watch connection is cut again and again while Services are created.
    for i in 0..6 {
        proxy.reset_all();
        svcs.create(
            &PostParams::default(),
            &lb_service(&format!("during-{i}"), &[80]),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in 0..6 {
        wait_for_ingress(&svcs, &format!("during-{i}"), WAIT).await;
    }

    // An outage: nothing gets through for a few seconds; work queued meanwhile is done after.
    proxy.set_outage(true);
    svcs.create(&PostParams::default(), &lb_service("in-outage", &[80]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        svcs.get("in-outage")
            .await
            .ok()
            .as_ref()
            .and_then(ingress_ip)
            .is_none()
    );
    proxy.set_outage(false);
    wait_for_ingress(&svcs, "in-outage", WAIT).await;

    // 150 ms each way on every chunk.
    proxy.set_latency(Duration::from_millis(150));
    svcs.create(&PostParams::default(), &lb_service("slow", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "slow", WAIT).await;
    proxy.set_latency(Duration::ZERO);

    assert!(proxy.resets() >= 7);
    assert!(
        operator.is_running(),
        "the operator must ride out faults:\n{}",
        operator.log_text()
    );
    for s in svcs.list(&Default::default()).await.unwrap() {
        delete_and_wait(&svcs, &s.name_any(), WAIT).await;
    }
    operator.terminate();
    delete_pools(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_conflicts_and_nothing_is_lost() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "conflicts").await.unwrap();
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(
            &PostParams::default(),
            &pool("conflicts", &["127.240.11.0/28"]),
        )
        .await
        .unwrap();
    let operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[]).unwrap();
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);

    // A user's read-modify-write loop (PUT with resourceVersion) races the operator's
    // finalizer and status writes on the same objects.
    let mut conflicts = 0;
    let mut labels_written = BTreeMap::new();
    for i in 0..5 {
        let name = format!("contended-{i}");
        svcs.create(&PostParams::default(), &lb_service(&name, &[80]))
            .await
            .unwrap();
        let mut n = 0;
        let started = Instant::now();
        while n < 15 && started.elapsed() < Duration::from_secs(20) {
            let mut svc = svcs.get(&name).await.unwrap();
            svc.labels_mut().insert("writer".into(), n.to_string());
            match svcs.replace(&name, &PostParams::default(), &svc).await {
                Ok(_) => n += 1,
                Err(kube::Error::Api(e)) if e.code == 409 => conflicts += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        labels_written.insert(name, (n - 1).to_string());
    }
    for (name, last) in &labels_written {
        let ip = wait_for_ingress(&svcs, name, WAIT).await;
        let svc = svcs.get(name).await.unwrap();
        assert_eq!(
            svc.labels().get("writer"),
            Some(last),
            "the user's write survived"
        );
        assert!(
            svc.finalizers()
                .contains(&"ferry.dev/load-balancer".to_string()),
            "{name} {ip}"
        );
    }
    eprintln!("writer saw {conflicts} conflicts");
    for name in labels_written.keys() {
        delete_and_wait(&svcs, name, WAIT).await;
    }
    drop(operator);
    delete_pools(&admin).await;
}

async fn lease_holder(admin: &kube::Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ferry-system");
    leases
        .get_opt("ferry-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_a_stopped_one_hands_over_at_once() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "leader").await.unwrap();
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(
            &PostParams::default(),
            &pool("leader", &["127.240.12.0/28"]),
        )
        .await
        .unwrap();
    let timing = [
        "--leader-elect-lease-name",
        "ferry-operator",
        "--leader-elect-lease-duration",
        "3s",
        "--leader-elect-renew-deadline",
        "2s",
        "--leader-elect-retry-period",
        "500ms",
    ];
    // Two replicas start together: they race for the Lease (real 409s), one wins.
    let mut a = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &timing).unwrap();
    let mut b = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &timing).unwrap();
    let first = eventually(WAIT, "a leader", || lease_holder(&admin)).await;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    svcs.create(&PostParams::default(), &lb_service("one", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "one", WAIT).await;

    // SIGKILL the leader: the standby takes over once the Lease expires.
    let (leader, standby) = if a.log_text().contains("became leader") {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        !standby.log_text().contains("became leader"),
        "exactly one leader"
    );
    leader.kill();
    let killed_at = Instant::now();
    svcs.create(&PostParams::default(), &lb_service("two", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "two", WAIT).await;
    let failover = killed_at.elapsed();
    let second = lease_holder(&admin).await.unwrap();
    assert_ne!(first, second);
    assert!(
        failover < Duration::from_secs(20),
        "failover took {failover:?}"
    );

    // SIGTERM the new leader: it releases the Lease, so the restarted one leads at once.
    leader.restart().unwrap();
    let status = standby.terminate();
    assert!(status.is_some_and(|s| s.success()), "clean exit on SIGTERM");
    // Released, not left to expire: the holder is gone (or already the successor).
    let after = lease_holder(&admin).await;
    assert_ne!(
        after.as_deref(),
        Some(second.as_str()),
        "the stopped leader released the Lease"
    );
    svcs.create(&PostParams::default(), &lb_service("three", &[80]))
        .await
        .unwrap();
    wait_for_ingress(&svcs, "three", WAIT).await;

    for name in ["one", "two", "three"] {
        delete_and_wait(&svcs, name, WAIT).await;
    }
    drop(a);
    drop(b);
    delete_pools(&admin).await;
}
