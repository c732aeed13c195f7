//! The GCE provider end to end: the operator as a process with `--provider gce`, against
//! the real control plane, talking through google-cloud-compute-v1 to the Compute Engine
//! fake (`ferry_e2e::gce`), which each test seeds with its own instances. What ferry made
//! is read back from the fake's state; what it asked is read from the fake's call log.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::control_plane::{ControlPlane, shared};
use ferry_e2e::gce::GceFake;
use ferry_e2e::gce::compute::Scope;
use ferry_e2e::nodes::{SimulatedNode, register, simulated_node};
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::*;
use ferry_providers::gce::spec::base_name;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const CLASS: &str = "ferry.dev/gce";
const PROJECT: &str = "proj";
const REGION: &str = "us-central1";
const ZONE: &str = "us-central1-a";
const CLUSTER_ID: &str = "e2e-gce";
const TAG: &str = "ferry-e2e-node";

fn port(name: &str, protocol: &str, port: i32, node_port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        port,
        node_port: (node_port != 0).then_some(node_port),
        ..ServicePort::default()
    }
}

fn gce_service(name: &str, ports: Vec<ServicePort>, annotations: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(CLASS.into()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The instance name of a test node: its tag, then the node's name, as GKE names them.
fn instance(node: &SimulatedNode) -> String {
    format!("{TAG}-{}", node.name)
}

/// Ready Nodes whose providerIDs name instances the fake holds (in `zone`).
async fn gce_nodes(
    client: &Client,
    fake: &GceFake,
    prefix: &str,
    which: std::ops::Range<usize>,
    zone: &str,
) -> Vec<SimulatedNode> {
    let nodes: Vec<SimulatedNode> = which.map(|i| simulated_node(prefix, i)).collect();
    register(client, &nodes).await.unwrap();
    let api: Api<Node> = Api::all(client.clone());
    for node in &nodes {
        fake.with(|c| c.add_tagged_instance(zone, &instance(node), &["http-server", TAG]));
        api.patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"providerID": format!("gce://{PROJECT}/{zone}/{}", instance(node))}})),
        )
        .await
        .unwrap();
    }
    nodes
}

fn start_operator(cp: &ControlPlane, fake: &GceFake, extra: &[&str]) -> OperatorProcess {
    let mut args = vec![
        "--provider",
        "gce",
        "--cluster-id",
        CLUSTER_ID,
        "--load-balancer-class",
        CLASS,
        "--gce-project",
        PROJECT,
        "--gce-region",
        REGION,
        "--gce-endpoint",
        &fake.url,
        "--gce-anonymous",
    ];
    args.extend_from_slice(extra);
    OperatorProcess::start_with_env(
        &cp.operator_kubeconfig,
        &cp.dir,
        &args,
        &[(
            "FERRY_LOG".into(),
            "info,ferry_operator=debug,ferry_providers=trace".into(),
        )],
    )
    .unwrap()
}

async fn wait_for_reason(api: &Api<Service>, name: &str, reason: &str) -> String {
    eventually(WAIT, &format!("{name}'s condition {reason}"), || async {
        ready_condition(api, name)
            .await
            .filter(|c| c.1 == reason)
            .map(|c| c.2)
    })
    .await
}

/// The fake's resource `name` in `collection` (any scope).
fn resource(fake: &GceFake, collection: &str, name: &str) -> Option<Value> {
    fake.with(|c| {
        c.resources(collection)
            .into_iter()
            .find(|(_, n, _)| n == name)
            .map(|(_, _, v)| v)
    })
}

/// Names in `collection` that start with `prefix`.
fn names(fake: &GceFake, collection: &str, prefix: &str) -> Vec<String> {
    fake.with(|c| {
        c.resources(collection)
            .into_iter()
            .map(|(_, n, _)| n)
            .filter(|n| n.starts_with(prefix))
            .collect()
    })
}

fn base_of(svc: &Service) -> String {
    base_name(CLUSTER_ID, &svc.uid().unwrap())
}

/// Every resource ferry makes for a balancer named `base`.
fn everything(fake: &GceFake, base: &str) -> BTreeMap<&'static str, Vec<String>> {
    [
        "addresses",
        "forwardingRules",
        "targetPools",
        "httpHealthChecks",
        "firewalls",
    ]
    .into_iter()
    .map(|c| (c, names(fake, c, base)))
    .filter(|(_, n)| !n.is_empty())
    .collect()
}

/// The pool's instances by name.
fn pool_instances(fake: &GceFake, base: &str) -> Vec<String> {
    let mut out: Vec<String> = resource(fake, "targetPools", base)
        .and_then(|p| p["instances"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.as_str()?.rsplit('/').next().map(str::to_string))
        .collect();
    out.sort();
    out
}

fn allowed(fw: &Value) -> BTreeMap<String, Vec<String>> {
    fw["allowed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["IPProtocol"].as_str().unwrap_or_default().to_string(),
                a["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_is_created_converged_retargeted_and_deleted() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "gce").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "gce-life").await.unwrap();
    let fake = GceFake::start(PROJECT).await.unwrap();
    let nodes = gce_nodes(&admin, &fake, "gce-life", 0..3, ZONE).await;
    // A node in another region cannot be in this region's pool: it is left out.
    let far = gce_nodes(&admin, &fake, "gce-life", 5..6, "europe-west1-b").await;
    let operator = start_operator(cp, &fake, &["--resync-period", "2s"]);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let mut web = gce_service(
        "web",
        vec![
            port("http", "TCP", 80, 31080),
            port("https", "TCP", 443, 31443),
            port("quic", "UDP", 443, 31443),
        ],
        &[],
    );
    if let Some(spec) = web.spec.as_mut() {
        spec.session_affinity = Some("ClientIP".into());
    }
    svcs.create(&PostParams::default(), &web).await.unwrap();

    // Created: the address is the Service's, published as a VIP.
    let ip = wait_for_ingress(&svcs, "web", WAIT).await;
    let svc = svcs.get("web").await.unwrap();
    let mode = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip_mode.clone());
    assert_eq!(mode.as_deref(), Some("VIP"));
    let base = base_of(&svc);
    let address = resource(&fake, "addresses", &base).expect("the Service's address");
    assert_eq!(address["address"], ip.as_str());
    assert_eq!(address["status"], "IN_USE");
    let description: Value =
        serde_json::from_str(address["description"].as_str().unwrap()).unwrap();
    assert_eq!(description["ferry.dev/service-name"], "web");
    assert!(
        description["ferry.dev/cluster-uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    // TCP and UDP on one port number: two rules on the one address.
    let tcp = resource(&fake, "forwardingRules", &format!("{base}-tcp")).unwrap();
    let udp = resource(&fake, "forwardingRules", &format!("{base}-udp")).unwrap();
    assert_eq!(
        (tcp["IPAddress"].as_str(), tcp["portRange"].as_str()),
        (Some(ip.as_str()), Some("80-443"))
    );
    assert_eq!(
        (udp["IPProtocol"].as_str(), udp["portRange"].as_str()),
        (Some("UDP"), Some("443-443"))
    );
    assert!(
        tcp["target"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/targetPools/{base}"))
    );
    let pool = resource(&fake, "targetPools", &base).unwrap();
    assert_eq!(pool["sessionAffinity"], "CLIENT_IP");
    assert_eq!(pool_instances(&fake, &base), {
        let mut v: Vec<String> = nodes.iter().map(instance).collect();
        v.sort();
        v
    });
    let check = resource(&fake, "httpHealthChecks", &base).unwrap();
    assert_eq!(
        (check["port"].as_i64(), check["requestPath"].as_str()),
        (Some(10256), Some("/healthz"))
    );
    // The firewall opens exactly the Service's ports, not the rule's range.
    let fw = resource(&fake, "firewalls", &format!("{base}-fw")).unwrap();
    assert_eq!(
        allowed(&fw),
        BTreeMap::from([
            ("tcp".to_string(), vec!["443".to_string(), "80".to_string()]),
            ("udp".to_string(), vec!["443".to_string()]),
        ])
    );
    assert_eq!(fw["sourceRanges"], json!(["0.0.0.0/0"]));
    assert_eq!(fw["destinationRanges"], json!([format!("{ip}/32")]));
    assert_eq!(
        fw["targetTags"],
        json!([TAG]),
        "the tag the instance names start with"
    );
    let hc_fw = resource(&fake, "firewalls", &format!("{base}-hc")).unwrap();
    assert_eq!(
        allowed(&hc_fw),
        BTreeMap::from([("tcp".to_string(), vec!["10256".to_string()])])
    );
    assert_eq!(hc_fw["sourceRanges"].as_array().map(Vec::len), Some(3));

    // Out-of-band deletions come back with exactly the calls needed, the address kept.
    let mark = fake.mark();
    fake.with(|c| {
        assert!(c.remove(
            &Scope::Region(REGION.into()),
            "forwardingRules",
            &format!("{base}-udp")
        ));
        assert!(c.remove(&Scope::Global, "firewalls", &format!("{base}-fw")));
    });
    eventually(
        WAIT,
        "the deleted rule and firewall rule to come back",
        || async {
            (resource(&fake, "forwardingRules", &format!("{base}-udp")).is_some()
                && resource(&fake, "firewalls", &format!("{base}-fw")).is_some())
            .then_some(())
        },
    )
    .await;
    let calls = fake.calls_since(mark);
    assert_eq!(calls.get("forwardingRules.insert"), Some(&1), "{calls:?}");
    assert_eq!(calls.get("firewalls.insert"), Some(&1), "{calls:?}");
    for untouched in [
        "addresses.insert",
        "targetPools.insert",
        "forwardingRules.delete",
        "httpHealthChecks.insert",
    ] {
        assert_eq!(calls.get(untouched), None, "{untouched}: {calls:?}");
    }
    assert_eq!(
        resource(&fake, "addresses", &base).unwrap()["address"],
        ip.as_str()
    );

    // A node joins and one leaves: one addInstance and one removeInstance, no reads.
    let mark = fake.mark();
    let joined = gce_nodes(&admin, &fake, "gce-life", 3..4, ZONE).await;
    eventually(WAIT, "the new node's instance in the pool", || async {
        pool_instances(&fake, &base)
            .contains(&instance(&joined[0]))
            .then_some(())
    })
    .await;
    let calls = fake.calls_since(mark);
    assert_eq!(calls.get("targetPools.addInstance"), Some(&1), "{calls:?}");
    assert_eq!(
        calls.get("targetPools.get"),
        None,
        "no Get storm: {calls:?}"
    );
    let mark = fake.mark();
    Api::<Node>::all(admin.clone())
        .delete(&nodes[0].name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        WAIT,
        "the deleted node's instance out of the pool",
        || async { (!pool_instances(&fake, &base).contains(&instance(&nodes[0]))).then_some(()) },
    )
    .await;
    let calls = fake.calls_since(mark);
    assert_eq!(
        calls.get("targetPools.removeInstance"),
        Some(&1),
        "{calls:?}"
    );

    // Ports change: UDP goes, a port is added; the rule is made again, the address stays.
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"sessionAffinity": "None", "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "nodePort": 31080},
            {"name": "alt", "protocol": "TCP", "port": 8080, "nodePort": 31808},
        ]}})),
    )
    .await
    .unwrap();
    eventually(
        WAIT,
        "the rules and firewall to follow the ports",
        || async {
            let tcp = resource(&fake, "forwardingRules", &format!("{base}-tcp"))?;
            let fw = resource(&fake, "firewalls", &format!("{base}-fw"))?;
            let pool = resource(&fake, "targetPools", &base)?;
            (tcp["portRange"] == "80-8080"
                && resource(&fake, "forwardingRules", &format!("{base}-udp")).is_none()
                && allowed(&fw)
                    == BTreeMap::from([(
                        "tcp".to_string(),
                        vec!["80".to_string(), "8080".to_string()],
                    )])
                && pool["sessionAffinity"] == "NONE")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        resource(&fake, "addresses", &base).unwrap()["address"],
        ip.as_str()
    );
    assert_eq!(wait_for_ingress(&svcs, "web", WAIT).await, ip);

    let metrics = metrics_text(operator.metrics_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_gce_api_calls_total{")
                && l.contains("targetPools.addInstance")),
        "calls are counted:\n{metrics}"
    );

    // Deleted: nothing of the balancer is left.
    delete_and_wait(&svcs, "web", WAIT).await;
    assert_eq!(everything(&fake, &base), BTreeMap::new());
    drop(far);
    delete_nodes(&admin, "gce-life").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_requested_addresses_are_explained_and_never_harm_a_users_address() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "gce").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "gce-input").await.unwrap();
    let fake = GceFake::start(PROJECT).await.unwrap();
    gce_nodes(&admin, &fake, "gce-input", 0..2, ZONE).await;
    // A user's reserved address, and one ferry does not know at all.
    let reserved = "203.0.113.200";
    let (status, _) = fake.with(|c| {
        c.handle(
            "POST",
            &format!("projects/{PROJECT}/regions/{REGION}/addresses"),
            &BTreeMap::new(),
            json!({"name": "users-ip", "address": reserved})
                .to_string()
                .as_bytes(),
        )
    });
    assert_eq!(status, 200);
    let _operator = start_operator(cp, &fake, &["--gce-node-tags", "pool-a,pool-b"]);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);

    let http = || vec![port("http", "TCP", 80, 0)];
    let mut cases = vec![
        (
            gce_service("sctp", vec![port("s", "SCTP", 9000, 0)], &[]),
            "UnsupportedProtocol",
        ),
        (
            gce_service(
                "internal",
                http(),
                &[("networking.gke.io/load-balancer-type", "Internal")],
            ),
            "InternalNotSupported",
        ),
        (
            gce_service("gold", http(), &[("cloud.google.com/network-tier", "Gold")]),
            "InvalidAnnotation",
        ),
    ];
    let mut unreserved = gce_service("unreserved", http(), &[]);
    unreserved.spec.as_mut().unwrap().load_balancer_ip = Some("203.0.113.77".into());
    cases.push((unreserved, "LoadBalancerIPNotReserved"));
    for (svc, _) in &cases {
        svcs.create(&PostParams::default(), svc).await.unwrap();
    }
    for (svc, reason) in &cases {
        let message = wait_for_reason(&svcs, &svc.name_any(), reason).await;
        assert!(!message.is_empty(), "{reason} says why");
    }
    let unreserved = wait_for_reason(&svcs, "unreserved", "LoadBalancerIPNotReserved").await;
    assert!(unreserved.contains("203.0.113.77"), "{unreserved}");

    // The reserved address is taken as asked, on a Standard-tier Service.
    let mut pinned = gce_service("pinned", http(), &[]);
    pinned.spec.as_mut().unwrap().load_balancer_ip = Some(reserved.into());
    svcs.create(&PostParams::default(), &pinned).await.unwrap();
    assert_eq!(wait_for_ingress(&svcs, "pinned", WAIT).await, reserved);
    let base = base_of(&svcs.get("pinned").await.unwrap());
    assert!(
        resource(&fake, "addresses", &base).is_none(),
        "no address of ferry's own"
    );
    let fw = resource(&fake, "firewalls", &format!("{base}-fw")).unwrap();
    assert_eq!(fw["targetTags"], json!(["pool-a", "pool-b"]));

    // A second Service asking for it is told who has it.
    let mut second = gce_service("second", http(), &[]);
    second.spec.as_mut().unwrap().load_balancer_ip = Some(reserved.into());
    svcs.create(&PostParams::default(), &second).await.unwrap();
    let message = wait_for_reason(&svcs, "second", "LoadBalancerIPInUse").await;
    assert!(message.contains("forwardingRules"), "{message}");

    // Standard tier and a Local Service's health check port.
    let mut local = gce_service(
        "local",
        http(),
        &[("cloud.google.com/network-tier", "Standard")],
    );
    local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    svcs.create(&PostParams::default(), &local).await.unwrap();
    wait_for_ingress(&svcs, "local", WAIT).await;
    let local = svcs.get("local").await.unwrap();
    let hc_port = local
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .unwrap();
    let base_local = base_of(&local);
    assert_eq!(
        resource(&fake, "httpHealthChecks", &base_local).unwrap()["port"],
        hc_port
    );
    assert_eq!(
        resource(&fake, "addresses", &base_local).unwrap()["networkTier"],
        "STANDARD"
    );
    assert_eq!(
        resource(&fake, "forwardingRules", &format!("{base_local}-tcp")).unwrap()["networkTier"],
        "STANDARD"
    );

    // Deleting the Service that used the user's address leaves the address.
    delete_and_wait(&svcs, "pinned", WAIT).await;
    assert!(
        resource(&fake, "addresses", "users-ip").is_some(),
        "a user's address is never deleted"
    );
    assert_eq!(everything(&fake, &base), BTreeMap::new());
    // Nothing was made for the refused Services.
    for (svc, _) in &cases {
        let base = base_of(&svcs.get(&svc.name_any()).await.unwrap());
        assert_eq!(
            everything(&fake, &base),
            BTreeMap::new(),
            "{}",
            svc.name_any()
        );
    }
    sweep_class(&admin, CLASS).await;
    delete_nodes(&admin, "gce-input").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_operations_crashes_throttling_quota_and_orphans_are_survived() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "gce").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "gce-rough").await.unwrap();
    let fake = GceFake::start(PROJECT).await.unwrap();
    gce_nodes(&admin, &fake, "gce-rough", 0..2, ZONE).await;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let http = |n| vec![port("http", "TCP", 80, n)];

    // Slow Operations: the Service reads Provisioning (no Warning), then Ready.
    fake.slow_operations(4);
    let mut operator = start_operator(cp, &fake, &["--gce-operation-wait", "1s"]);
    svcs.create(
        &PostParams::default(),
        &gce_service("slow", http(31501), &[]),
    )
    .await
    .unwrap();
    let message = wait_for_reason(&svcs, "slow", "Provisioning").await;
    assert!(message.contains("still running"), "{message}");
    // The Operations already started stay slow; what follows is quick again.
    fake.slow_operations(0);
    wait_for_ingress(&svcs, "slow", WAIT).await;

    // The operator is killed while GCE is still making the address; the next one waits
    // for it (409 for a name GCE holds) rather than making another, and finishes.
    fake.slow_operations(10_000);
    svcs.create(
        &PostParams::default(),
        &gce_service("crash", http(31502), &[]),
    )
    .await
    .unwrap();
    eventually(WAIT, "an Operation in flight", || async {
        (fake.with(|c| c.running_operations()) > 0).then_some(())
    })
    .await;
    operator.kill();
    operator.restart().unwrap();
    let message = wait_for_reason(&svcs, "crash", "Provisioning").await;
    assert!(
        message.contains("being created") || message.contains("still running"),
        "{message}"
    );
    fake.slow_operations(0);
    fake.with(|c| c.finish_pending());
    wait_for_ingress(&svcs, "crash", WAIT).await;
    let crash = svcs.get("crash").await.unwrap();
    let crash_base = base_of(&crash);
    assert_eq!(
        everything(&fake, &crash_base)
            .values()
            .map(Vec::len)
            .sum::<usize>(),
        6,
        "one of each, no duplicate: {:?}",
        everything(&fake, &crash_base)
    );

    // Throttled calls are retried within the budget; a quota is the Service's condition.
    fake.fail_next("*", 3, 429, "rateLimitExceeded");
    fake.fail_next("forwardingRules.insert", 1, 403, "quotaExceeded");
    svcs.create(
        &PostParams::default(),
        &gce_service("busy", http(31503), &[]),
    )
    .await
    .unwrap();
    let quota = wait_for_reason(&svcs, "busy", "QuotaExceeded").await;
    assert!(quota.contains("quotaExceeded"), "{quota}");
    let metrics = metrics_text(operator.metrics_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_gce_api_calls_total{")
                && l.contains("outcome=\"throttled\"")),
        "throttled calls are counted:\n{metrics}"
    );
    svcs.patch(
        "busy",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"retry": "1"}}})),
    )
    .await
    .unwrap();
    wait_for_ingress(&svcs, "busy", WAIT).await;

    // Orphans: "crash" loses its finalizer while the operator is down and is deleted; a
    // resource with this cluster id but another cluster's identity is reported, not deleted.
    operator.kill();
    svcs.patch(
        "crash",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    svcs.delete("crash", &DeleteParams::default())
        .await
        .unwrap();
    let foreign_desc = json!({
        "ferry.dev/cluster": CLUSTER_ID,
        "ferry.dev/cluster-uid": "another-cluster",
        "ferry.dev/service-namespace": "elsewhere",
        "ferry.dev/service-name": "theirs",
        "ferry.dev/service-uid": "uid-theirs",
    })
    .to_string();
    let (status, _) = fake.with(|c| {
        c.handle(
            "POST",
            &format!("projects/{PROJECT}/global/httpHealthChecks"),
            &BTreeMap::new(),
            json!({"name": "ferry-0123456789abcdef", "description": foreign_desc})
                .to_string()
                .as_bytes(),
        )
    });
    assert_eq!(status, 200);
    let _operator = start_operator(cp, &fake, &["--orphan-interval", "2s"]);
    eventually(WAIT, "the orphaned balancer to be collected", || async {
        everything(&fake, &crash_base).is_empty().then_some(())
    })
    .await;
    assert!(
        resource(&fake, "httpHealthChecks", "ferry-0123456789abcdef").is_some(),
        "a foreign resource stays"
    );
    let busy_base = base_of(&svcs.get("busy").await.unwrap());
    assert_eq!(
        everything(&fake, &busy_base)
            .values()
            .map(Vec::len)
            .sum::<usize>(),
        6
    );

    delete_and_wait(&svcs, "busy", WAIT).await;
    delete_and_wait(&svcs, "slow", WAIT).await;
    assert_eq!(everything(&fake, &busy_base), BTreeMap::new());
    delete_nodes(&admin, "gce-rough").await;
}
