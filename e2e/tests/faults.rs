//! Real faults against the real control plane: dropped watch connections, an outage, added
//! latency (a TCP fault proxy between operator and apiserver), concurrent writers (real 409s)
//! and leader failover with a killed leader.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, shared};
use ferry_e2e::fault_proxy::FaultProxy;
use ferry_e2e::operator::{CHART_ELECTION_TIMINGS, OperatorProcess};
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
    // The chart's election timings: a 3 s outage is shorter than the renew deadline.
    let mut operator = proxied_operator(cp, &proxy, "drops", &CHART_ELECTION_TIMINGS).await;
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

/// Watches every Service of `ns` and records each moment two of them show one address.
fn watch_for_duplicates(
    admin: kube::Client,
    ns: &str,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let violations = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let found = violations.clone();
    let api: Api<Service> = Api::namespaced(admin, ns);
    let task = tokio::spawn(async move {
        let mut shown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let stream = watcher(api, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Some(Ok(svc)) = stream.next().await {
            let ips: BTreeSet<String> = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
                .unwrap_or_default();
            let name = svc.name_any();
            for (other, theirs) in &shown {
                if *other != name
                    && let Some(ip) = ips.intersection(theirs).next()
                {
                    found
                        .lock()
                        .unwrap()
                        .push(format!("{ip} shown by {name} and {other}"));
                }
            }
            shown.insert(name, ips);
        }
    });
    (task, violations)
}

async fn leader_stalls_while_services_pour_in(fault: &str) {
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, &format!("stall-{fault}")).await.unwrap();
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(
            &PostParams::default(),
            &pool(&format!("stall-{fault}"), &["127.240.13.0/26"]),
        )
        .await
        .unwrap();
    let lease = format!("stall-{fault}");
    let args = [
        "--leader-elect-lease-name",
        lease.as_str(),
        "--leader-elect-lease-duration",
        "4s",
        "--leader-elect-renew-deadline",
        "3s",
        "--leader-elect-retry-period",
        "500ms",
    ];
    // Each replica has a connection of its own, so the fault hits one of them only.
    let proxy_a = FaultProxy::start(upstream(cp)).await.unwrap();
    let proxy_b = FaultProxy::start(upstream(cp)).await.unwrap();
    let mut a = proxied_operator(cp, &proxy_a, &format!("{lease}-a"), &args).await;
    let mut b = proxied_operator(cp, &proxy_b, &format!("{lease}-b"), &args).await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ferry-system");
    let first = eventually(WAIT, "a leader", || async {
        leases.get_opt(&lease).await.ok()??.spec?.holder_identity
    })
    .await;
    let (watcher, violations) = watch_for_duplicates(admin.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    // Let both replicas settle: the first Services are served by the first leader.
    for i in 0..5 {
        svcs.create(&PostParams::default(), &lb_service(&format!("s{i}"), &[80]))
            .await
            .unwrap();
    }
    wait_for_ingress(&svcs, "s4", WAIT).await;
    let leader_is_a = a.log_text().contains("became leader");
    let leader_proxy = if leader_is_a { &proxy_a } else { &proxy_b };
    match fault {
        // 1 s each way on every chunk: no renewal fits the deadline, but every write the
        // leader sent lands within the margin (lease duration − renew deadline).
        "latency" => leader_proxy.set_latency(Duration::from_millis(1000)),
        _ => leader_proxy.set_blackhole(true),
    }
    // The storm: Services keep coming while the leader stalls and the standby takes over.
    for i in 5..40 {
        svcs.create(&PostParams::default(), &lb_service(&format!("s{i}"), &[80]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut ips = BTreeSet::new();
    for i in 0..40 {
        let ip = wait_for_ingress(&svcs, &format!("s{i}"), WAIT).await;
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
    }
    let second = leases
        .get_opt(&lease)
        .await
        .unwrap()
        .and_then(|l| l.spec?.holder_identity)
        .unwrap();
    assert_ne!(first, second, "the standby took over");
    // The first leader is the one the fault hit (picked before it, from the logs then).
    let (stalled, standby) = if leader_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        standby.log_text().contains("became leader"),
        "the standby leads now"
    );
    let stalled_log = stalled.log_text();
    assert!(
        stalled_log.contains("stepping down") || stalled_log.contains("another candidate holds"),
        "the stalled leader stepped down:\n{stalled_log}"
    );
    let exit_by = Instant::now() + WAIT;
    while stalled.is_running() {
        assert!(Instant::now() < exit_by, "the stalled leader did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settle, then read every Service once more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    let seen = violations.lock().unwrap().clone();
    assert!(seen.is_empty(), "one address on two Services: {seen:?}");
    proxy_a.set_latency(Duration::ZERO);
    proxy_a.set_blackhole(false);
    proxy_b.set_latency(Duration::ZERO);
    proxy_b.set_blackhole(false);
    for i in 0..40 {
        delete_and_wait(&svcs, &format!("s{i}"), WAIT).await;
    }
    drop(a);
    drop(b);
    delete_pools(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_behind_latency_steps_down_and_no_address_is_handed_out_twice() {
    let _serial = serial().await;
    leader_stalls_while_services_pour_in("latency").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_leader_steps_down_and_no_address_is_handed_out_twice() {
    let _serial = serial().await;
    leader_stalls_while_services_pour_in("blackhole").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_with_a_skewed_clock_keeps_its_lease_while_it_renews() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ferry-system");
    // Another replica whose clock is an hour behind: every renewal it writes looks an
    // hour old to anyone comparing timestamps.
    let behind = jiff::SignedDuration::from_hours(1);
    let lease_name = "skewed-clock";
    let lease = |renew: jiff::Timestamp| Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(lease_name.into()),
            namespace: Some("ferry-system".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("clock-behind".into()),
            lease_duration_seconds: Some(4),
            acquire_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                renew,
            )),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                renew,
            )),
            ..Default::default()
        }),
    };
    let _ = leases.delete(lease_name, &Default::default()).await;
    leases
        .create(
            &PostParams::default(),
            &lease(jiff::Timestamp::now() - behind),
        )
        .await
        .unwrap();
    let renewing = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(mut current) = leases.get(lease_name).await {
                    if let Some(spec) = current.spec.as_mut() {
                        spec.renew_time =
                            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                                jiff::Timestamp::now() - behind,
                            ));
                    }
                    let _ = leases
                        .replace(lease_name, &PostParams::default(), &current)
                        .await;
                }
            }
        })
    };
    let operator = OperatorProcess::start(
        &cp.operator_kubeconfig,
        &cp.dir,
        &["--leader-elect-lease-name", lease_name],
    )
    .unwrap();
    // Two lease durations and more: the renewing holder keeps it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let holder = leases
        .get(lease_name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("clock-behind"));
    assert!(
        !operator.log_text().contains("became leader"),
        "the Lease was taken from a live holder:\n{}",
        operator.log_text()
    );
    // The holder dies: the candidate takes over after one lease duration of silence.
    renewing.abort();
    let stopped = Instant::now();
    eventually(WAIT, "the candidate to take over", || async {
        operator.log_text().contains("became leader").then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(3),
        "took over after {:?}, before the Lease could expire",
        stopped.elapsed()
    );
    drop(operator);
    let _ = leases.delete(lease_name, &Default::default()).await;
}
