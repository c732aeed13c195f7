//! `ferry explain` as a user runs it: the `ferry` binary against the real control plane with
//! the operator running as a process, forwarder heartbeats written by the test itself. One
//! Service per situation: no pool, healthy, `Local` without endpoints, an exhausted pool, no
//! live forwarder, another class, and the one-line errors.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::shared;
use ferry_e2e::nodes::register_nodes;
use ferry_e2e::operator::{OperatorProcess, binary};
use ferry_e2e::scenario::*;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(45);
const PREFIX: &str = "explain";
const FORWARDERS: &str = "ferry-system";

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn ferry(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(binary("ferry").unwrap())
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .await
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn explain_json(kubeconfig: &std::path::Path, ns: &str, name: &str) -> Value {
    let out = ferry(
        kubeconfig,
        &["explain", &format!("svc/{name}"), "-n", ns, "-o", "json"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Every list succeeded (a failed one is a warning on stderr).
    assert_eq!(out.stderr, "");
    serde_json::from_str(&out.stdout).unwrap()
}

fn problems(e: &Value) -> Vec<String> {
    e["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// Writes (or rewrites) `node`'s forwarder heartbeat as renewed `ago` ago, lasting 300 s.
async fn heartbeat(leases: &Api<Lease>, node: &str, ago: Duration) {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(format!("ferry-forwarder-{node}")),
            namespace: Some(FORWARDERS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(300),
            renew_time: Some(MicroTime(
                jiff::Timestamp::now() - jiff::SignedDuration::try_from(ago).unwrap(),
            )),
            ..LeaseSpec::default()
        }),
    };
    leases
        .patch(
            &format!("ferry-forwarder-{node}"),
            &PatchParams::apply("explain-test").force(),
            &Patch::Apply(&lease),
        )
        .await
        .unwrap();
}

/// Until `check` holds of the explanation of `name`.
async fn explained_as(
    kubeconfig: &std::path::Path,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(WAIT, what, || async {
        let e = explain_json(kubeconfig, ns, name).await;
        check(&e).then_some(e)
    })
    .await
}

async fn cleanup(admin: &Client, ns: &str, nodes: &[String]) {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), FORWARDERS);
    for n in nodes {
        let _ = leases
            .delete(&format!("ferry-forwarder-{n}"), &DeleteParams::default())
            .await;
    }
    delete_pools(admin).await;
    delete_nodes(admin, PREFIX).await;
    let _ = Api::<Namespace>::all(admin.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_why_a_service_does_or_does_not_work() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let kubeconfig = cp.admin_kubeconfig.clone();
    delete_pools(&admin).await;
    delete_nodes(&admin, PREFIX).await;
    let ns = namespace(&admin, "explain").await.unwrap();
    let nodes: Vec<String> = register_nodes(&admin, PREFIX, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    let leases: Api<Lease> = Api::namespaced(admin.clone(), FORWARDERS);
    for n in &nodes {
        heartbeat(&leases, n, Duration::ZERO).await;
    }
    let operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[]).unwrap();
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());

    let result = tokio::spawn({
        let (ns, nodes, kubeconfig) = (ns.clone(), nodes.clone(), kubeconfig.clone());
        async move {
            // No pool: no address, and it says so.
            svcs.create(&PostParams::default(), &lb_service("web", &[80]))
                .await
                .unwrap();
            let e = explained_as(
                &kubeconfig,
                &ns,
                "web",
                "web's LoadBalancerReady condition",
                |e| !e["conditions"].as_array().unwrap().is_empty(),
            )
            .await;
            assert!(
                problems(&e).contains(
                    &"no address: no LoadBalancerPool serves class ferry.dev/local".to_string()
                ),
                "{e:#}"
            );
            assert!(e["allocation"]["given"].as_array().unwrap().is_empty());

            // A pool of two: web gets one, announced by one of the two live forwarders.
            pools
                .create(
                    &PostParams::default(),
                    &pool("explain-pool", &["127.240.40.1-127.240.40.2"]),
                )
                .await
                .unwrap();
            let ip = wait_for_ingress(&svcs, "web", WAIT).await;
            let e = explained_as(&kubeconfig, &ns, "web", "web explained as healthy", |e| {
                e["problems"].as_array().unwrap().is_empty()
                    && e["events"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|ev| ev["reason"] == "EnsuredLoadBalancer")
            })
            .await;
            assert_eq!(e["allocation"]["given"][0]["address"], ip.as_str());
            assert_eq!(e["allocation"]["given"][0]["pool"], "explain-pool");
            assert_eq!(e["allocation"]["given"][0]["ipMode"], "Proxy");
            assert_eq!(e["ownership"]["provisionedBy"], "ferry.dev/local");
            assert_eq!(e["ownership"]["finalizer"], true);
            let vip = &e["vips"][0];
            assert_eq!(vip["servedBy"], "ferry forwarder");
            let owner = vip["owner"].as_str().unwrap().to_string();
            assert!(nodes.contains(&owner), "{owner}");
            let ranked: BTreeSet<&str> = vip["standings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["node"].as_str().unwrap())
                .collect();
            assert_eq!(ranked, nodes.iter().map(String::as_str).collect());
            assert!(e["ports"][0]["nodePort"].as_i64().is_some());
            let text = ferry(&kubeconfig, &["explain", "web", "-n", &ns]).await;
            assert_eq!(text.code, Some(0), "{}", text.stderr);
            assert!(
                text.stdout.contains(&format!("owner: {owner}")),
                "{}",
                text.stdout
            );
            assert!(text.stdout.contains("no problem found"), "{}", text.stdout);

            // `Local` with no endpoints anywhere: nobody may announce its address.
            let mut local = lb_service("local", &[81]);
            local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
            svcs.create(&PostParams::default(), &local).await.unwrap();
            let local_ip = wait_for_ingress(&svcs, "local", WAIT).await;
            let e = explain_json(&kubeconfig, &ns, "local").await;
            assert_eq!(e["trafficPolicy"], "Local");
            assert_eq!(e["vips"][0]["owner"], Value::Null);
            assert!(
                problems(&e).contains(&format!(
                    "no node announces {local_ip}: no live forwarder on a node with ready endpoints"
                )),
                "{e:#}"
            );

            // The pool is now exhausted: a third Service gets nothing, and it says why.
            svcs.create(&PostParams::default(), &lb_service("third", &[82]))
                .await
                .unwrap();
            let e = explained_as(&kubeconfig, &ns, "third", "the pool seen full", |e| {
                problems(e).iter().any(|p| p.contains("full"))
            })
            .await;
            assert_eq!(e["allocation"]["candidatePools"][0]["available"], 0);

            // The forwarders stop renewing: web's address has no announcer.
            for n in &nodes {
                heartbeat(&leases, n, Duration::from_secs(600)).await;
            }
            let e = explain_json(&kubeconfig, &ns, "web").await;
            assert!(
                problems(&e).contains(&format!("no node announces {ip}: no live forwarder")),
                "{e:#}"
            );
            assert_eq!(e["nodes"][0]["forwarder"]["alive"], false);
            assert!(
                e["nodes"][0]["forwarder"]["renewedSecondsAgo"]
                    .as_i64()
                    .unwrap()
                    >= 599
            );

            // Another implementation's class.
            let mut other = lb_service("other", &[83]);
            other.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
            svcs.create(&PostParams::default(), &other).await.unwrap();
            let e = explain_json(&kubeconfig, &ns, "other").await;
            assert_eq!(e["ownership"]["ferrys"], false);
            assert!(
                problems(&e)
                    .iter()
                    .any(|p| p.starts_with("not ferry's (class example.com/other)")),
                "{e:#}"
            );

            // Nothing to explain: one line, exit code 1.
            let missing = ferry(&kubeconfig, &["explain", "svc/absent", "-n", &ns]).await;
            assert_eq!(missing.code, Some(1));
            assert_eq!(
                missing.stderr.trim().lines().count(),
                1,
                "{}",
                missing.stderr
            );
            assert!(missing.stderr.contains("not found"), "{}", missing.stderr);
            svcs.create(&PostParams::default(), &{
                let mut s = lb_service("plain", &[84]);
                s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
                s
            })
            .await
            .unwrap();
            let plain = ferry(&kubeconfig, &["explain", "svc/plain", "-n", &ns]).await;
            assert_eq!(plain.code, Some(1));
            assert!(
                plain.stderr.contains("not LoadBalancer"),
                "{}",
                plain.stderr
            );
            // A bad flag: exit code 2.
            let bad = ferry(&kubeconfig, &["explain", "web", "-o", "xml"]).await;
            assert_eq!(bad.code, Some(2), "{}", bad.stderr);
        }
    })
    .await;
    drop(operator);
    cleanup(&admin, &ns, &nodes).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}
