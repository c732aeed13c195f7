//! Several ferry instances on one cluster, as real processes against the real control
//! plane: two local instances of different classes, each with its own pools, never touch
//! each other's Services or addresses; a Service that moves from one class to the other
//! (through another type, since a LoadBalancer Service's class is immutable) is cleaned up
//! by the first and provisioned by the second, whichever of them acts first.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, shared};
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::*;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(45);
const LAN: &str = "example.com/lan";
const RECORD: &str = "ferry.dev/provisioned-by";

/// The default instance (`ferry.dev/local`, also serving Services without a class).
fn default_instance(cp: &ControlPlane) -> OperatorProcess {
    OperatorProcess::start(
        &cp.operator_kubeconfig,
        &cp.dir,
        &["--leader-elect-lease-name", "ferry-default"],
    )
    .unwrap()
}

/// A second local instance for `example.com/lan` only.
fn lan_instance(cp: &ControlPlane) -> OperatorProcess {
    OperatorProcess::start(
        &cp.operator_kubeconfig,
        &cp.dir,
        &[
            "--load-balancer-class",
            LAN,
            "--default-class=false",
            "--leader-elect-lease-name",
            "ferry-lan",
        ],
    )
    .unwrap()
}

async fn pools(admin: &Client) -> Api<LoadBalancerPool> {
    // What a failed earlier test may have left.
    delete_pools(admin).await;
    let api: Api<LoadBalancerPool> = Api::all(admin.clone());
    api.create(
        &PostParams::default(),
        &pool("default-pool", &["127.240.20.0/29"]),
    )
    .await
    .unwrap();
    let mut lan = pool("lan-pool", &["127.240.21.0/29"]);
    lan.spec.load_balancer_classes = vec![LAN.into()];
    api.create(&PostParams::default(), &lan).await.unwrap();
    api
}

fn lan_service(name: &str) -> Service {
    let mut svc = lb_service(name, &[80]);
    svc.spec.as_mut().unwrap().load_balancer_class = Some(LAN.into());
    svc
}

fn record(svc: &Service) -> Option<String> {
    svc.annotations().get(RECORD).cloned()
}

fn finalized(svc: &Service) -> bool {
    svc.finalizers()
        .iter()
        .any(|f| f == "ferry.dev/load-balancer")
}

/// Watches `names` for `period`: every sample must show the same ingress, the finalizer and
/// `class`'s record. An instance that cleaned up another's Service would flip one of them.
async fn stays_put(svcs: &Api<Service>, names: &[(&str, Option<&str>, &str)], period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        for (name, ip, class) in names {
            let svc = svcs.get(name).await.unwrap();
            assert_eq!(ingress_ip(&svc).as_deref(), *ip, "{name}'s address moved");
            assert!(finalized(&svc), "{name} lost its finalizer");
            assert_eq!(record(&svc).as_deref(), Some(*class), "{name}'s record");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn allocated(pools: &Api<LoadBalancerPool>, name: &str) -> Option<i64> {
    Some(pools.get(name).await.ok()?.status?.allocated)
}

/// Moves a Service to another class the only way Kubernetes allows (the class of a
/// LoadBalancer Service is immutable): through another type and back.
async fn move_to(svcs: &Api<Service>, name: &str, class: Option<&str>) {
    for spec in [
        json!({"type": "ClusterIP", "loadBalancerClass": null}),
        json!({"type": "LoadBalancer", "loadBalancerClass": class}),
    ] {
        svcs.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_instances_of_different_classes_keep_to_their_own() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "instances").await.unwrap();
    let pools = pools(&admin).await;
    let default = default_instance(cp);
    let lan = lan_instance(cp);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);

    svcs.create(&PostParams::default(), &lb_service("plain", &[80]))
        .await
        .unwrap();
    svcs.create(&PostParams::default(), &lan_service("office"))
        .await
        .unwrap();
    let plain = wait_for_ingress(&svcs, "plain", WAIT).await;
    let office = wait_for_ingress(&svcs, "office", WAIT).await;
    assert!(
        plain.starts_with("127.240.20."),
        "{plain} from the default pool"
    );
    assert!(
        office.starts_with("127.240.21."),
        "{office} from the lan pool"
    );

    // Each instance sees the other's Service with ferry's finalizer: neither touches it.
    stays_put(
        &svcs,
        &[
            ("plain", Some(plain.as_str()), "ferry.dev/local"),
            ("office", Some(office.as_str()), LAN),
        ],
        Duration::from_secs(4),
    )
    .await;
    eventually(WAIT, "each pool counts only its own", || async {
        (allocated(&pools, "default-pool").await? == 1 && allocated(&pools, "lan-pool").await? == 1)
            .then_some(())
    })
    .await;

    // The lan instance cannot be asked for the default pool's free addresses.
    let mut greedy = lan_service("greedy");
    greedy.spec.as_mut().unwrap().load_balancer_ip = Some("127.240.20.5".into());
    svcs.create(&PostParams::default(), &greedy).await.unwrap();
    eventually(WAIT, "a refusal naming the other class's pool", || async {
        let svc = svcs.get("greedy").await.ok()?;
        let cond = svc
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "ferry.dev/LoadBalancerReady")?;
        (cond.status == "False" && cond.reason == "PoolOfAnotherClass").then_some(())
    })
    .await;

    for name in ["plain", "office", "greedy"] {
        delete_and_wait(&svcs, name, WAIT).await;
    }
    let logs = format!("{}\n{}", default.log_text(), lan.log_text());
    assert!(!logs.contains("Forbidden"), "RBAC:\n{logs}");
    drop(default);
    drop(lan);
    delete_pools(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_moving_between_classes_is_handed_over_in_either_order() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = namespace(&admin, "handover").await.unwrap();
    let pools = pools(&admin).await;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let mut default = default_instance(cp);
    let mut lan = lan_instance(cp);

    svcs.create(&PostParams::default(), &lb_service("mover", &[80]))
        .await
        .unwrap();
    let first = wait_for_ingress(&svcs, "mover", WAIT).await;
    assert!(first.starts_with("127.240.20."));

    // Both running: default → lan. The default instance cleans up, the lan one provisions.
    move_to(&svcs, "mover", Some(LAN)).await;
    let moved = eventually(WAIT, "provisioned by the lan instance", || async {
        let svc = svcs.get("mover").await.ok()?;
        let ip = ingress_ip(&svc)?;
        (ip.starts_with("127.240.21.") && record(&svc).as_deref() == Some(LAN) && finalized(&svc))
            .then_some(ip)
    })
    .await;
    eventually(WAIT, "the default pool's address released", || async {
        (allocated(&pools, "default-pool").await? == 0).then_some(())
    })
    .await;

    // The new owner acts first: lan → default while the lan instance is down. The default
    // instance must wait (its condition says for whom) and leave the lan instance's
    // finalizer and record alone, and publish nothing (the API server itself dropped the
    // old ingress when the type changed).
    lan.terminate();
    move_to(&svcs, "mover", None).await;
    eventually(WAIT, "the default instance says it waits", || async {
        let svc = svcs.get("mover").await.ok()?;
        let cond = svc
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "ferry.dev/LoadBalancerReady")?;
        (cond.reason == "ReleasedByPreviousClass" && cond.message.contains(LAN)).then_some(())
    })
    .await;
    stays_put(&svcs, &[("mover", None, LAN)], Duration::from_secs(3)).await;
    // The previous owner comes back and cleans up; then the default instance provisions.
    lan.restart().unwrap();
    let back = eventually(WAIT, "provisioned by the default instance", || async {
        let svc = svcs.get("mover").await.ok()?;
        let ip = ingress_ip(&svc)?;
        (ip.starts_with("127.240.20.") && record(&svc).as_deref() == Some("ferry.dev/local"))
            .then_some(ip)
    })
    .await;
    eventually(WAIT, "the lan pool's address released", || async {
        (allocated(&pools, "lan-pool").await? == 0).then_some(())
    })
    .await;

    // The old owner acts first: default → lan while the lan instance is down. The default
    // instance cleans up at once; the lan instance provisions when it starts.
    lan.terminate();
    move_to(&svcs, "mover", Some(LAN)).await;
    eventually(WAIT, "released by the default instance", || async {
        let svc = svcs.get("mover").await.ok()?;
        (!finalized(&svc) && record(&svc).is_none() && ingress_ip(&svc).is_none()).then_some(())
    })
    .await;
    lan.restart().unwrap();
    let last = wait_for_ingress(&svcs, "mover", WAIT).await;
    assert!(last.starts_with("127.240.21."), "{last}");

    let seen: BTreeSet<_> = [first, moved, back, last].into_iter().collect();
    assert!(seen.len() >= 2, "the address followed the class: {seen:?}");
    delete_and_wait(&svcs, "mover", WAIT).await;
    default.terminate();
    lan.terminate();
    delete_pools(&admin).await;
}
