//! The Helm chart (`helm/ferry`), through the real `helm` built from its Go module: it lints,
//! renders what each provider needs, refuses bad values with one line, grants exactly the RBAC
//! the other tests run ferry under, sets only environment variables the binaries read, and
//! installs, upgrades and uninstalls on the real kube-apiserver.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use ferry_crds::LoadBalancerPool;
use ferry_e2e::chart::{chart, documents, helm, kind, render};
use ferry_e2e::control_plane::shared;
use ferry_e2e::operator::binary;
use ferry_e2e::repo_root;
use ferry_e2e::scenario::*;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::Api;
use serde_yaml::Value;

const WAIT: Duration = Duration::from_secs(30);

fn find<'a>(docs: &'a [Value], k: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind(d) == k)
}

/// The container's env as name → value (values from the downward API as `fieldRef:<path>`).
fn env(workload: &Value) -> BTreeMap<String, String> {
    ferry_e2e::chart::container_env(workload)
        .into_iter()
        .collect()
}

#[test]
fn the_chart_lints_and_renders_each_provider() {
    let lint = helm(&["lint", chart().to_str().unwrap_or_default()], None);
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );

    // Local: the operator, a forwarder on every node with the host's network.
    let docs = render(&[]).unwrap();
    let operator = find(&docs, "Deployment").expect("the operator's Deployment");
    let forwarder = find(&docs, "DaemonSet").expect("the forwarder's DaemonSet");
    let op_env = env(operator);
    assert_eq!(op_env["FERRY_PROVIDER"], "local");
    assert_eq!(op_env["FERRY_LOAD_BALANCER_CLASS"], "ferry.dev/local");
    assert_eq!(op_env["FERRY_LOCAL_REPAIR_INTERVAL"], "3m");
    assert!(
        !op_env.contains_key("FERRY_AWS_API_RATE"),
        "only the chosen provider's settings reach the operator"
    );
    assert_eq!(op_env["POD_NAMESPACE"], "fieldRef:metadata.namespace");
    assert_eq!(operator["spec"]["replicas"].as_i64(), Some(2));
    let pod = &forwarder["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["tolerations"][0]["operator"].as_str(), Some("Exists"));
    let fw_env = env(forwarder);
    assert_eq!(fw_env["NODE_NAME"], "fieldRef:spec.nodeName");
    assert_eq!(fw_env["FERRY_LEASE_NAMESPACE"], "ferry-system");
    assert_eq!(
        fw_env["FERRY_LOAD_BALANCER_CLASS"], op_env["FERRY_LOAD_BALANCER_CLASS"],
        "both components serve the same class"
    );
    let caps = &pod["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(
        caps["add"],
        serde_yaml::from_str::<Value>("[NET_ADMIN, NET_RAW, NET_BIND_SERVICE]").unwrap()
    );
    assert!(
        docs.iter().all(|d| kind(d) != "LoadBalancerPool"),
        "no pool unless asked for"
    );

    // Helm conventions: a disruption budget and soft anti-affinity for the two replicas,
    // security contexts that can be overridden (no hard-coded UID).
    let pdb = find(&docs, "PodDisruptionBudget").expect("a disruption budget");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
    let op_pod = &operator["spec"]["template"]["spec"];
    assert!(
        op_pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_sequence()
    );
    assert_eq!(op_pod["securityContext"]["runAsUser"].as_i64(), Some(65532));
    assert_eq!(
        op_pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let single = render(&[
        "operator.replicas=1",
        "operator.podSecurityContext.runAsUser=1000",
    ])
    .unwrap();
    assert!(
        find(&single, "PodDisruptionBudget").is_none(),
        "no budget for one replica"
    );
    let single_pod = &find(&single, "Deployment").unwrap()["spec"]["template"]["spec"];
    assert_eq!(
        single_pod["securityContext"]["runAsUser"].as_i64(),
        Some(1000)
    );

    // A ServiceAccount of one's own (IRSA, Workload Identity), bound by the chart's RBAC;
    // names from fullnameOverride.
    let own = render(&[
        "fullnameOverride=lb",
        "operator.serviceAccount.create=false",
        "operator.serviceAccount.name=mine",
    ])
    .unwrap();
    let accounts: Vec<&str> = own
        .iter()
        .filter(|d| kind(d) == "ServiceAccount")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    assert_eq!(accounts, ["lb-forwarder"], "only the forwarder's is made");
    let op = find(&own, "Deployment").unwrap();
    assert_eq!(op["metadata"]["name"].as_str(), Some("lb-operator"));
    assert_eq!(
        op["spec"]["template"]["spec"]["serviceAccountName"].as_str(),
        Some("mine")
    );
    assert!(
        own.iter()
            .filter(|d| kind(d) == "ClusterRoleBinding" || kind(d) == "RoleBinding")
            .any(|d| d["subjects"][0]["name"].as_str() == Some("mine")),
        "the chart's RBAC binds the given account"
    );

    // AWS: no forwarder; the cluster id, region and class reach the operator.
    let docs = render(&["provider=aws", "clusterId=prod-1", "aws.region=eu-west-1"]).unwrap();
    assert!(find(&docs, "DaemonSet").is_none(), "AWS needs no forwarder");
    let op_env = env(find(&docs, "Deployment").unwrap());
    assert_eq!(op_env["FERRY_PROVIDER"], "aws");
    assert_eq!(op_env["FERRY_CLUSTER_ID"], "prod-1");
    assert_eq!(op_env["FERRY_AWS_REGION"], "eu-west-1");
    assert_eq!(op_env["FERRY_AWS_API_RATE"], "10");
    assert!(!op_env.contains_key("FERRY_LOCAL_REPAIR_INTERVAL"));
    assert_eq!(op_env["FERRY_LOAD_BALANCER_CLASS"], "ferry.dev/aws");

    // GCE: project, region and the rest reach the operator; a key Secret is mounted.
    let docs = render(&[
        "provider=gce",
        "clusterId=prod-1",
        "gce.project=my-proj",
        "gce.region=europe-west4",
        "gce.nodeTags=gke-prod-pool",
        "gce.credentialsSecret=ferry-gce-key",
    ])
    .unwrap();
    assert!(find(&docs, "DaemonSet").is_none(), "GCE needs no forwarder");
    let operator = find(&docs, "Deployment").unwrap();
    let op_env = env(operator);
    assert_eq!(op_env["FERRY_GCE_PROJECT"], "my-proj");
    assert_eq!(op_env["FERRY_GCE_REGION"], "europe-west4");
    assert_eq!(op_env["FERRY_GCE_NODE_TAGS"], "gke-prod-pool");
    assert_eq!(op_env["FERRY_GCE_NETWORK"], "default");
    assert_eq!(op_env["FERRY_LOAD_BALANCER_CLASS"], "ferry.dev/gce");
    assert!(!op_env.contains_key("FERRY_GCE_CREDENTIALS_SECRET"));
    assert_eq!(
        op_env["GOOGLE_APPLICATION_CREDENTIALS"],
        "/var/run/secrets/ferry-gce/key.json"
    );
    let pod = &operator["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"].as_str(),
        Some("ferry-gce-key")
    );

    // Pools come with the release when listed.
    let docs = render(&[
        "pools[0].name=lan",
        "pools[0].addresses[0]=192.168.1.240/28",
        "pools[0].autoAssign=true",
    ])
    .unwrap();
    let pool = find(&docs, "LoadBalancerPool").expect("the pool");
    assert_eq!(pool["metadata"]["name"].as_str(), Some("lan"));
    assert_eq!(
        pool["spec"]["addresses"][0].as_str(),
        Some("192.168.1.240/28")
    );
    assert!(pool["spec"].get("name").is_none());
    assert_eq!(
        pool["spec"]["loadBalancerClasses"][0].as_str(),
        Some("ferry.dev/local"),
        "a release's pools serve the release's class"
    );
    let docs = render(&[
        "loadBalancerClass=example.com/dmz",
        "pools[0].name=dmz",
        "pools[0].addresses[0]=192.168.2.240/28",
    ])
    .unwrap();
    let pool = find(&docs, "LoadBalancerPool").expect("the pool");
    assert_eq!(
        pool["spec"]["loadBalancerClasses"][0].as_str(),
        Some("example.com/dmz")
    );
}

#[test]
fn bad_values_fail_with_one_line_naming_the_value() {
    for (set, says) in [
        (
            vec!["provider=aws"],
            "clusterId is required with provider aws",
        ),
        (vec!["provider=azure"], "provider must be local, aws or gce"),
        (
            vec!["provider=gce", "clusterId=c", "gce.project=p"],
            "gce.project and gce.region are required",
        ),
        (vec!["forwarder.mode=fast"], "forwarder.mode must be auto"),
        (vec!["pools[0].name=empty"], "pool empty needs addresses"),
        // A misspelt key fails rather than being ignored (values.schema.json).
        (
            vec!["opertor.replicas=3"],
            "additional properties 'opertor' not allowed",
        ),
        (
            vec!["gce.projet=p"],
            "additional properties 'projet' not allowed",
        ),
        // A value that moved is refused, never silently dropped.
        (
            vec!["operator.aws.region=eu-west-1"],
            "operator.aws moved to aws",
        ),
    ] {
        let err = render(&set).expect_err("refused");
        assert!(err.contains(says), "{set:?}: {err}");
    }
}

/// The RBAC objects of a manifest, by kind, namespace and name, without labels.
fn rbac(docs: &[Value]) -> BTreeMap<(String, String, String), Value> {
    docs.iter()
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&kind(d))
        })
        .map(|d| {
            let mut d = d.clone();
            let meta = &d["metadata"];
            let key = (
                kind(&d).to_string(),
                meta["namespace"].as_str().unwrap_or_default().to_string(),
                meta["name"].as_str().unwrap_or_default().to_string(),
            );
            if let Some(m) = d.get_mut("metadata").and_then(Value::as_mapping_mut) {
                m.remove("labels");
                m.remove("annotations");
            }
            (key, d)
        })
        .collect()
}

#[test]
fn the_chart_grants_exactly_the_rbac_the_tests_run_ferry_under() {
    // Every other test runs the operator and forwarders under e2e/rbac.yaml; a chart that
    // granted less would fail in clusters only, one that granted more would go unnoticed.
    let tested = std::fs::read_to_string(repo_root().join("e2e").join("rbac.yaml")).unwrap();
    let tested = rbac(&documents(&tested));
    let chart = rbac(&render(&[]).unwrap());
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        tested.keys().collect::<Vec<_>>()
    );
    for (key, object) in &chart {
        assert_eq!(object, &tested[key], "{key:?} differs from e2e/rbac.yaml");
    }
}

#[test]
fn every_variable_the_chart_sets_is_one_the_binaries_read() {
    let aws = render(&[
        "provider=aws",
        "clusterId=c",
        "aws.region=r",
        "forwarder.enabled=true",
        "forwarder.interface=eth1",
    ])
    .unwrap();
    let local = render(&[]).unwrap();
    let gce = render(&[
        "provider=gce",
        "clusterId=c",
        "gce.project=p",
        "gce.region=r",
        "gce.nodeTags=a\\,b",
        "gce.credentialsSecret=s",
    ])
    .unwrap();
    for (docs, workload, bin) in [
        (&gce, "Deployment", "ferry-operator"),
        (&aws, "Deployment", "ferry-operator"),
        (&aws, "DaemonSet", "ferry-forwarder"),
        (&local, "Deployment", "ferry-operator"),
    ] {
        let help = Command::new(binary(bin).unwrap())
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for name in env(find(docs, workload).unwrap()).keys() {
            // POD_NAMESPACE is read directly, not through a flag; Google's auth library
            // reads GOOGLE_APPLICATION_CREDENTIALS; HOST_IP is only expanded by the kubelet
            // into the forwarder's listen addresses.
            if name == "POD_NAMESPACE"
                || name == "GOOGLE_APPLICATION_CREDENTIALS"
                || name == "HOST_IP"
            {
                continue;
            }
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{bin} has no flag reading {name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_upgrades_and_uninstalls_on_a_real_api_server() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let kubeconfig = Some(cp.admin_kubeconfig.as_path());
    let chart = chart();
    let chart = chart.to_str().unwrap_or_default();
    let ns = "edge-system";
    let run = |args: &[&str]| {
        let out = helm(args, kubeconfig);
        assert!(
            out.status.success(),
            "helm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // A pool no Service will draw from (autoAssign off), named for this test.
    let notes = run(&[
        "install",
        "edge",
        chart,
        "-n",
        ns,
        "--create-namespace",
        "--set",
        "pools[0].name=edge-test",
        "--set",
        "pools[0].addresses[0]=198.51.100.252/30",
        "--set",
        "pools[0].autoAssign=false",
    ]);
    // The notes say what the namespace needs and how the CRD is upgraded.
    assert!(
        notes.contains(&format!(
            "kubectl label namespace {ns} pod-security.kubernetes.io/enforce=privileged"
        )),
        "{notes}"
    );
    assert!(notes.contains("kubectl apply --server-side -f"), "{notes}");
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), ns);
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
    let operator = deployments.get("edge-ferry-operator").await.unwrap();
    assert_eq!(operator.spec.and_then(|s| s.replicas), Some(2));
    daemonsets.get("edge-ferry-forwarder").await.unwrap();
    let pool = pools.get("edge-test").await.unwrap();
    assert_eq!(pool.spec.addresses, vec!["198.51.100.252/30".to_string()]);

    // To AWS: the DaemonSet goes, the operator is told.
    run(&[
        "upgrade",
        "edge",
        chart,
        "-n",
        ns,
        "--reuse-values",
        "--set",
        "provider=aws",
        "--set",
        "clusterId=edge",
    ]);
    eventually(WAIT, "the DaemonSet gone", || async {
        daemonsets
            .get_opt("edge-ferry-forwarder")
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    let operator = deployments.get("edge-ferry-operator").await.unwrap();
    let env = operator
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "FERRY_PROVIDER" && e.value.as_deref() == Some("aws"))
    );

    run(&["uninstall", "edge", "-n", ns]);
    eventually(WAIT, "the release's objects gone", || async {
        let gone = deployments
            .get_opt("edge-ferry-operator")
            .await
            .ok()
            .flatten()
            .is_none()
            && pools.get_opt("edge-test").await.ok().flatten().is_none();
        gone.then_some(())
    })
    .await;
}

/// A client with a bound service-account token of the chart's forwarder identity, as the
/// kubelet gives the forwarder's pod on `node`: the token names the node.
async fn forwarder_on(
    admin: &kube::Client,
    ns: &str,
    service_account: &str,
    node: &str,
) -> kube::Client {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
    use kube::api::PostParams;
    let cp = shared();
    let node_obj: Node = serde_json::from_value(serde_json::json!({
        "metadata": { "name": node }
    }))
    .unwrap();
    let _ = Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node_obj)
        .await;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": format!("forwarder-{node}") },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "containers": [{ "name": "forwarder", "image": "ferry" }],
        },
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": {
                "kind": "Pod", "apiVersion": "v1",
                "name": pod.metadata.name, "uid": pod.metadata.uid,
            },
        },
    }))
    .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let token: TokenRequest = accounts
        .create_subresource("token", service_account, &PostParams::default(), &request)
        .await
        .unwrap();
    let token: String = token.status.and_then(|s| s.token).unwrap_or_default();
    let path = cp.dir.join(format!("forwarder-on-{node}.kubeconfig"));
    std::fs::write(&path, cp.kubeconfig_via(&cp.url, &token)).unwrap();
    ferry_e2e::control_plane::client_from(&path).await.unwrap()
}

async fn write_lease(client: &kube::Client, ns: &str, name: &str) -> Result<(), kube::Error> {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Patch, PatchParams};
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": name },
        "spec": { "holderIdentity": "someone", "leaseDurationSeconds": 2 },
    });
    Api::<Lease>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("ferry-forwarder").force(),
            &Patch::Apply(lease),
        )
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_can_write_only_its_own_heartbeat_lease_and_announced_condition() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let kubeconfig = Some(cp.admin_kubeconfig.as_path());
    let chart = chart();
    let ns = "guard-system";
    let out = helm(
        &[
            "install",
            "guard",
            chart.to_str().unwrap_or_default(),
            "-n",
            ns,
            "--create-namespace",
        ],
        kubeconfig,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = forwarder_on(&admin, ns, "guard-ferry-forwarder", "guard-node-a").await;
    // The policy is enforced once the API server has loaded it.
    eventually(WAIT, "the lease policy in force", || async {
        write_lease(&a, ns, "ferry-forwarder-guard-node-b")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    write_lease(&a, ns, "ferry-forwarder-guard-node-a")
        .await
        .expect("its own heartbeat Lease");
    for other in ["ferry-forwarder-guard-node-b", "guard-ferry-operator"] {
        match write_lease(&a, ns, other).await {
            Err(kube::Error::Api(e)) => {
                assert!(e.code == 403 || e.code == 422, "{e:?}");
                assert!(e.message.contains("only the heartbeat Lease"), "{e:?}");
            }
            other_result => panic!("writing {other} as guard-node-a's forwarder: {other_result:?}"),
        }
    }
    // Nor can it delete another node's heartbeat.
    write_lease(&admin, ns, "ferry-forwarder-guard-node-b")
        .await
        .unwrap();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(a.clone(), ns);
    assert!(
        leases
            .delete("ferry-forwarder-guard-node-b", &Default::default())
            .await
            .is_err()
    );

    // In a Service's status, it may write its own condition and nothing else.
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(admin.clone(), ns);
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "guarded" },
        "spec": { "type": "LoadBalancer", "loadBalancerClass": "example.com/other",
                  "ports": [{ "port": 80 }] },
    }))
    .unwrap();
    svcs.create(&Default::default(), &svc).await.unwrap();
    let status = |body: serde_json::Value| {
        let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(a.clone(), ns);
        async move {
            api.patch_status(
                "guarded",
                &kube::api::PatchParams::apply("ferry-forwarder").force(),
                &kube::api::Patch::Apply(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": { "name": "guarded" },
                    "status": body,
                })),
            )
            .await
            .map(|_| ())
        }
    };
    let condition = |type_: &str| {
        serde_json::json!({ "type": type_, "status": "True", "reason": "Announced",
            "message": "announcing", "lastTransitionTime": "2026-01-01T00:00:00Z" })
    };
    eventually(WAIT, "the Service status policy in force", || async {
        status(serde_json::json!({ "loadBalancer": { "ingress": [{ "ip": "192.0.2.99" }] } }))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    status(serde_json::json!({ "conditions": [condition("ferry.dev/Announced")] }))
        .await
        .expect("its own condition");
    for (what, body) in [
        (
            "the operator's condition",
            serde_json::json!({ "conditions": [condition("ferry.dev/LoadBalancerReady")] }),
        ),
        (
            "the ingress",
            serde_json::json!({ "loadBalancer": { "ingress": [{ "ip": "192.0.2.99" }] } }),
        ),
    ] {
        match status(body).await {
            Err(kube::Error::Api(e)) => {
                assert!(e.code == 403 || e.code == 422, "{what}: {e:?}");
                assert!(
                    e.message.contains("only the ferry.dev/Announced"),
                    "{what}: {e:?}"
                );
            }
            other => panic!("a forwarder writing {what}: {other:?}"),
        }
    }
    let out = helm(&["uninstall", "guard", "-n", ns], kubeconfig);
    assert!(out.status.success());
    for node in ["guard-node-a"] {
        let _ = Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone())
            .delete(node, &Default::default())
            .await;
    }
}
