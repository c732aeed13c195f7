//! The chart's monitoring bundle: rendered with the real `helm` (off by default, valid when on,
//! strict about its values), its alerting rules checked and unit-tested with the real
//! `promtool` exactly as the chart renders them, and every metric the rules and the dashboard
//! name found on a running operator's and forwarder's `/metrics`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ferry_e2e::chart::{chart, helm, kind, render};
use ferry_e2e::cluster::{Cluster, NODES};
use ferry_e2e::control_plane::shared;
use ferry_e2e::forwarder::NodePorts;
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::process::ProcessUnderTest;
use ferry_e2e::repo_root;
use ferry_e2e::scenario::*;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use serde_yaml::Value;

const WAIT: Duration = Duration::from_secs(30);

const BUNDLE_ON: [&str; 3] = [
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
];

fn named<'a>(docs: &'a [Value], k: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| kind(d) == k && d["metadata"]["name"].as_str() == Some(name))
}

/// The rules' `spec` as the chart renders it (`set` on top of the bundle turned on).
fn rendered_rules(set: &[&str]) -> Value {
    let mut all: Vec<&str> = BUNDLE_ON.to_vec();
    all.extend_from_slice(set);
    let docs = render(&all).unwrap();
    docs.iter()
        .find(|d| kind(d) == "PrometheusRule")
        .expect("a PrometheusRule")["spec"]
        .clone()
}

fn rules(spec: &Value) -> Vec<&Value> {
    spec["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .collect()
}

/// The dashboard's JSON as the chart renders it.
fn rendered_dashboard() -> serde_json::Value {
    let docs = render(&BUNDLE_ON).unwrap();
    let cm = named(&docs, "ConfigMap", "ferry-dashboard").expect("the dashboard ConfigMap");
    serde_json::from_str(cm["data"]["ferry.json"].as_str().unwrap_or_default())
        .expect("the dashboard is JSON")
}

fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

/// The `ferry_*` metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bferry_[a-z0-9_]+").unwrap();
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs (Debian's prometheus package; test.sh installs it)")
}

/// A directory for this test's files, removed on drop even when the test fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_bundle_is_off_by_default_and_valid_when_on() {
    // Off: nothing of the Prometheus Operator's (the chart installs without its CRDs), no
    // dashboard, but the metrics Services.
    let docs = render(&[]).unwrap();
    assert!(
        docs.iter().all(|d| !d["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .starts_with("monitoring.coreos.com")),
        "monitoring.coreos.com objects rendered by default"
    );
    assert!(named(&docs, "ConfigMap", "ferry-dashboard").is_none());
    let operator = named(&docs, "Service", "ferry-operator-metrics").expect("operator metrics");
    assert_eq!(operator["spec"]["ports"][0]["port"].as_i64(), Some(8080));
    assert_eq!(
        operator["spec"]["selector"]["app.kubernetes.io/component"].as_str(),
        Some("operator")
    );
    let forwarder = named(&docs, "Service", "ferry-forwarder-metrics").expect("forwarder metrics");
    assert_eq!(forwarder["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(forwarder["spec"]["ports"][0]["port"].as_i64(), Some(9470));
    assert_eq!(
        forwarder["spec"]["ports"][0]["targetPort"].as_str(),
        Some("metrics")
    );

    // On: a ServiceMonitor per component selecting its Service, the rules, the dashboard.
    let chart = chart();
    let mut lint = vec!["lint", chart.to_str().unwrap_or_default()];
    for s in BUNDLE_ON {
        lint.extend(["--set", s]);
    }
    let out = helm(&lint, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let docs = render(&BUNDLE_ON).unwrap();
    for component in ["operator", "forwarder"] {
        let sm = named(&docs, "ServiceMonitor", &format!("ferry-{component}"))
            .unwrap_or_else(|| panic!("the {component}'s ServiceMonitor"));
        assert_eq!(sm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
        let svc = named(&docs, "Service", &format!("ferry-{component}-metrics")).unwrap();
        let selector = sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
        for (k, v) in selector {
            assert_eq!(
                &svc["metadata"]["labels"][k], v,
                "the {component}'s ServiceMonitor selects its Service ({k:?})"
            );
        }
        assert_eq!(sm["spec"]["endpoints"][0]["port"].as_str(), Some("metrics"));
    }
    // The forwarder's per-VIP series carry a `node` label of their own: the scrape must not
    // set one over it.
    let sm = named(&docs, "ServiceMonitor", "ferry-forwarder").unwrap();
    for r in sm["spec"]["endpoints"][0]["relabelings"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        assert_ne!(r["targetLabel"].as_str(), Some("node"), "{r:?}");
    }
    let spec = rendered_rules(&[]);
    let alerts = rules(&spec);
    assert!(alerts.len() >= 8, "{spec:?}");
    for rule in &alerts {
        let name = rule["alert"].as_str().unwrap_or_default();
        assert!(!name.is_empty(), "only alerts: {rule:?}");
        assert!(
            rule["labels"]["severity"].as_str().is_some(),
            "{name}: no severity"
        );
        for a in ["summary", "description"] {
            assert!(
                !rule["annotations"][a]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
                "{name}: no {a}"
            );
        }
    }
    let dashboard = rendered_dashboard();
    assert_eq!(dashboard["uid"].as_str(), Some("ferry-overview"));
    assert!(dashboard_exprs(&dashboard).len() >= 10);
    let cm = named(&docs, "ConfigMap", "ferry-dashboard").unwrap();
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );

    // The sidecar's label and the ServiceMonitors' are the user's to choose.
    let mut set = BUNDLE_ON.to_vec();
    set.extend([
        "monitoring.dashboard.labels.grafana_dashboard=null",
        "monitoring.dashboard.labels.dashboards=ferry",
        "monitoring.serviceMonitor.labels.release=kube-prometheus-stack",
    ]);
    let docs = render(&set).unwrap();
    let cm = named(&docs, "ConfigMap", "ferry-dashboard").unwrap();
    assert_eq!(
        cm["metadata"]["labels"]["dashboards"].as_str(),
        Some("ferry")
    );
    assert!(cm["metadata"]["labels"]["grafana_dashboard"].is_null());
    let sm = named(&docs, "ServiceMonitor", "ferry-operator").unwrap();
    assert_eq!(
        sm["metadata"]["labels"]["release"].as_str(),
        Some("kube-prometheus-stack")
    );

    // Thresholds come from values.
    let tuned = rendered_rules(&["monitoring.prometheusRule.alerts.poolUsedPercent=95"]);
    let nearly_full = rules(&tuned)
        .into_iter()
        .find(|r| r["alert"].as_str() == Some("FerryPoolNearlyFull"))
        .unwrap()
        .clone();
    assert!(
        nearly_full["expr"]
            .as_str()
            .unwrap_or_default()
            .contains("> 95"),
        "{nearly_full:?}"
    );

    // Peers unheard are an alert only where heartbeats are on, naming the port to open.
    let named_alert = |spec: &Value, name: &str| {
        rules(spec)
            .into_iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .cloned()
    };
    let unheard = named_alert(
        &rendered_rules(&["forwarder.peerPort=9555"]),
        "FerryPeersUnheard",
    )
    .expect("FerryPeersUnheard with heartbeats on");
    assert!(
        unheard["annotations"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("UDP port 9555"),
        "{unheard:?}"
    );
    assert!(
        named_alert(
            &rendered_rules(&["forwarder.peerPort=0"]),
            "FerryPeersUnheard"
        )
        .is_none(),
        "no heartbeats, no alert for peers never heard"
    );

    // Without the forwarder (a cloud provider) there is nothing of it to scrape.
    let mut set = BUNDLE_ON.to_vec();
    set.extend(["provider=aws", "clusterId=c1"]);
    let docs = render(&set).unwrap();
    assert!(named(&docs, "Service", "ferry-forwarder-metrics").is_none());
    assert!(named(&docs, "ServiceMonitor", "ferry-forwarder").is_none());
    assert!(named(&docs, "ServiceMonitor", "ferry-operator").is_some());
}

#[test]
fn misspelt_monitoring_values_are_refused() {
    for (set, key) in [
        ("monitoring.serviceMonitor.enable=true", "enable"),
        (
            "monitoring.prometheusRule.alerts.poolUsedPrecent=90",
            "poolUsedPrecent",
        ),
        ("monitoring.dashbaord.enabled=true", "dashbaord"),
        ("forwarder.listenOn=everywhere", "listenOn"),
    ] {
        let err = render(&[set]).expect_err(set);
        assert!(err.contains(key), "{set}: {err}");
    }
    let err = render(&["monitoring.prometheusRule.alerts.noLeaderFor=five"]).unwrap_err();
    assert!(err.contains("noLeaderFor"), "{err}");
}

#[test]
fn the_forwarder_listens_on_its_nodes_address() {
    let env_of = |docs: &[Value]| -> Vec<(String, String)> {
        let ds = docs.iter().find(|d| kind(d) == "DaemonSet").unwrap();
        ferry_e2e::chart::container_env(ds)
    };
    let value = |env: &[(String, String)], name: &str| {
        env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    };
    let docs = render(&[]).unwrap();
    let env = env_of(&docs);
    assert_eq!(
        value(&env, "HOST_IP").as_deref(),
        Some("fieldRef:status.hostIP")
    );
    // $(HOST_IP) expands only to variables defined before it.
    let position = |name: &str| env.iter().position(|(n, _)| n == name).unwrap();
    assert!(position("HOST_IP") < position("FERRY_METRICS_ADDR"));
    assert_eq!(
        value(&env, "FERRY_METRICS_ADDR").as_deref(),
        Some("$(HOST_IP):9470")
    );
    assert_eq!(
        value(&env, "FERRY_HEALTH_ADDR").as_deref(),
        Some("$(HOST_IP):9471")
    );
    // The probes name the port, and kubelet probes the pod's IP: on the host network, the
    // node's address the endpoints listen on.
    let ds = docs.iter().find(|d| kind(d) == "DaemonSet").unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(container["livenessProbe"]["httpGet"]["host"].is_null());
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"].as_str(),
        Some("health")
    );

    let env = env_of(&render(&["forwarder.listenOn=hostIPv6"]).unwrap());
    assert_eq!(
        value(&env, "FERRY_METRICS_ADDR").as_deref(),
        Some("[$(HOST_IP)]:9470")
    );
    let env = env_of(&render(&["forwarder.listenOn=all"]).unwrap());
    assert_eq!(value(&env, "HOST_IP"), None);
    assert_eq!(
        value(&env, "FERRY_HEALTH_ADDR").as_deref(),
        Some("0.0.0.0:9471")
    );
}

#[test]
fn the_rendered_rules_pass_promtool() {
    let scratch = Scratch::new("alert-rules");
    let rules = serde_yaml::to_string(&rendered_rules(&[])).unwrap();
    std::fs::write(scratch.0.join("rules.yaml"), rules).unwrap();
    std::fs::copy(
        repo_root()
            .join("e2e")
            .join("tests")
            .join("monitoring")
            .join("alerts_test.yaml"),
        scratch.0.join("alerts_test.yaml"),
    )
    .unwrap();

    let check = promtool(&["check", "rules", "rules.yaml"], &scratch.0);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = promtool(&["test", "rules", "alerts_test.yaml"], &scratch.0);
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

/// The sample names a `/metrics` text can hold: each family's `# TYPE` line (printed for
/// every registered family, with samples or not) with its type's suffixes, and every sample.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty())
        {
            names.insert(name.to_string());
        }
    }
    names
}

/// An operator of a cloud provider, under the test's control plane.
fn cloud_operator(args: &[&str], env: &[(&str, &str)]) -> OperatorProcess {
    let cp = shared();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    OperatorProcess::start_with_env(&cp.operator_kubeconfig, &cp.dir, args, &env).unwrap()
}

/// A port held on every address of each node, so that a userspace forwarder cannot bind a VIP
/// on it: a Service on that port fails to be forwarded everywhere.
const SQUATTED_PORT: u16 = 8089;
const SQUAT: &str = "import socket, time\n\
s = socket.socket()\n\
s.bind(('0.0.0.0', 8089))\n\
s.listen()\n\
time.sleep(600)\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_name_only_metrics_the_binaries_expose() {
    let _serial = serial().await;
    // prometheus-client prints nothing, not even `# TYPE`, for a labelled family without a
    // sample, so each series the rules read is made to exist: userspace forwarding (its
    // connection counters), a Service answered, a Service no node can announce, one no node
    // can forward, and cloud operators that make calls.
    let c = Cluster::start("monitoring", NodePorts::KubeProxy, &["--mode", "userspace"]).await;
    let ip = c.http_service("web", 30080, json!({})).await;
    c.wait_for_traffic(&ip, 80).await;
    // Local traffic with no endpoints anywhere: no node can announce it.
    c.service(
        "nowhere",
        json!({ "type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [
            { "name": "http", "port": 80, "nodePort": 30081, "protocol": "TCP" } ] }),
        json!({}),
    )
    .await;
    let _squatters: Vec<ProcessUnderTest> = c
        .topo
        .nodes
        .iter()
        .map(|h| {
            let ns = h.ns().name.clone();
            ProcessUnderTest::start(
                "port squatter",
                c.cp.dir.join(format!("squatter-{ns}.log")),
                move || {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", &ns, "python3", "-c", SQUAT]);
                    Ok(cmd)
                },
            )
            .unwrap()
        })
        .collect();
    // The squatters hold the port before the forwarders try it.
    for h in &c.topo.nodes {
        eventually(WAIT, "the port squatted", || async {
            h.ns()
                .exec("ss", &["-Hltn", "sport = :8089"])
                .ok()
                .filter(|out| out.contains(":8089"))
        })
        .await;
    }
    c.service(
        "squatted",
        json!({ "type": "LoadBalancer", "ports": [
            { "name": "http", "port": SQUATTED_PORT, "nodePort": 30090, "protocol": "TCP" } ] }),
        json!({}),
    )
    .await;

    // Cloud operators whose API is a closed port on loopback (nothing listens on port 1),
    // each with a Service of its own class: their calls fail, and are counted.
    let aws = cloud_operator(
        &[
            "--provider",
            "aws",
            "--cluster-id",
            "monitoring",
            "--load-balancer-class",
            "ferry.dev/monitoring-aws",
            "--default-class=false",
        ],
        &[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let gce = cloud_operator(
        &[
            "--provider",
            "gce",
            "--cluster-id",
            "monitoring",
            "--load-balancer-class",
            "ferry.dev/monitoring-gce",
            "--default-class=false",
            "--gce-project",
            "monitoring",
            "--gce-region",
            "us-central1",
            "--gce-endpoint",
            "http://127.0.0.1:1",
            "--gce-anonymous",
        ],
        &[],
    );
    for cloud in ["aws", "gce"] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": format!("on-{cloud}") },
            "spec": { "type": "LoadBalancer",
                      "loadBalancerClass": format!("ferry.dev/monitoring-{cloud}"),
                      "ports": [ { "name": "http", "port": 80, "protocol": "TCP" } ] },
        }))
        .unwrap();
        c.svcs.create(&PostParams::default(), &svc).await.unwrap();
    }

    let scrape = |what: &'static str, addr: SocketAddr, wanted: &'static [&'static str]| async move {
        eventually(WAIT, what, || async {
            let text = metrics_text(addr).await;
            let names = exposed(&text);
            wanted.iter().all(|w| names.contains(*w)).then_some(names)
        })
        .await
    };
    let mut names = BTreeSet::new();
    names.extend(
        scrape(
            "the local operator's metrics",
            c._operator.metrics_addr,
            &[
                "ferry_leader",
                "ferry_reconciles_total",
                "ferry_pool_addresses",
            ],
        )
        .await,
    );
    names.extend(
        scrape(
            "the AWS operator's calls",
            aws.metrics_addr,
            &["ferry_aws_api_calls_total", "ferry_reconcile_errors_total"],
        )
        .await,
    );
    names.extend(
        scrape(
            "the GCE operator's calls",
            gce.metrics_addr,
            &["ferry_gce_api_calls_total"],
        )
        .await,
    );
    for node in NODES {
        let forwarder = c.forwarder(node);
        names.extend(
            eventually(
                WAIT,
                "a forwarder's failures and unannounced VIP",
                || async {
                    let names = exposed(&forwarder.metrics().unwrap_or_default());
                    [
                        "ferry_forwarder_forwarding_failures_total",
                        "ferry_forwarder_vip_unannounced",
                    ]
                    .iter()
                    .all(|w| names.contains(*w))
                    .then_some(names)
                },
            )
            .await,
        );
    }
    assert!(
        names.contains("ferry_forwarder_connections_total"),
        "{names:?}"
    );

    let mut named: Vec<(String, String)> = Vec::new();
    for rule in rules(&rendered_rules(&[])) {
        let alert = rule["alert"].as_str().unwrap_or_default().to_string();
        for m in metric_names(rule["expr"].as_str().unwrap_or_default()) {
            named.push((format!("alert {alert}"), m));
        }
    }
    for expr in dashboard_exprs(&rendered_dashboard()) {
        for m in metric_names(&expr) {
            named.push((format!("dashboard: {expr}"), m));
        }
    }
    assert!(named.len() > 20, "{named:?}");
    let unknown: Vec<String> = named
        .iter()
        .filter(|(_, m)| !names.contains(m))
        .map(|(w, m)| format!("{m} (in {w})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics no binary exposes:\n{}\nexposed: {names:?}",
        unknown.join("\n")
    );
    for name in ["web", "nowhere", "squatted"] {
        delete_and_wait(&c.svcs, name, WAIT).await;
    }
    // The cloud Services cannot be released through a cloud that is not there.
    for name in ["on-aws", "on-gce"] {
        assert!(
            force_delete(&c.svcs, name, WAIT).await,
            "Service {name} is not gone after {WAIT:?}"
        );
    }
}

/// Uninstalls the release when dropped, so a failed test leaves nothing behind.
struct Release {
    name: &'static str,
    namespace: &'static str,
    kubeconfig: PathBuf,
}

impl Release {
    fn helm(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["-n", self.namespace, "--kubeconfig"]);
        let kubeconfig = self.kubeconfig.to_str().unwrap_or_default().to_string();
        all.push(&kubeconfig);
        helm(&all, None)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.helm(&["uninstall", self.name, "--wait"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_installs_on_a_real_api_server_without_the_prometheus_operator() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    let release = Release {
        name: "mon",
        namespace: "mon-system",
        kubeconfig: cp.admin_kubeconfig.clone(),
    };
    let chart = chart();
    let chart = chart.to_str().unwrap_or_default();
    let out = release.helm(&[
        "install",
        release.name,
        chart,
        "--create-namespace",
        "--set",
        "monitoring.dashboard.enabled=true",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The notes say where the metrics are and how to get the rest.
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(
        notes.contains("Service mon-ferry-operator-metrics (port 8080)")
            && notes.contains("mon-ferry-forwarder-metrics (port 9470)")
            && notes.contains("monitoring.serviceMonitor.enabled=true"),
        "{notes}"
    );
    let services: Api<Service> = Api::namespaced(admin.clone(), release.namespace);
    let forwarder = services.get("mon-ferry-forwarder-metrics").await.unwrap();
    assert_eq!(
        forwarder.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    services.get("mon-ferry-operator-metrics").await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), release.namespace);
    let dashboard = maps.get("mon-ferry-dashboard").await.unwrap();
    assert_eq!(
        dashboard
            .metadata
            .labels
            .unwrap_or_default()
            .get("grafana_dashboard")
            .map(String::as_str),
        Some("1")
    );

    // Asking for a ServiceMonitor where its CRD is absent fails the upgrade, saying so,
    // and leaves the release as it was.
    let out = release.helm(&[
        "upgrade",
        release.name,
        chart,
        "--reuse-values",
        "--set",
        "monitoring.serviceMonitor.enabled=true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("ServiceMonitor"), "{err}");
    services.get("mon-ferry-operator-metrics").await.unwrap();
}
