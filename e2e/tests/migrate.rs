//! `ferry migrate` as a user runs it: the `ferry` binary on MetalLB configurations in the
//! shapes MetalLB's documentation uses (files and stdin), its pools accepted by the real
//! kube-apiserver's schema (server-side dry run), and `--from-cluster`. Every YAML file in
//! `../shared/metallb-samples/` beside the repository, when there is one, is migrated too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::shared;
use ferry_e2e::operator::binary;
use ferry_e2e::scenario::*;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, PostParams};
use serde::Deserialize;

/// Layer 2 as in MetalLB's docs: two pools (one IPv6, one restricted by namespace and
/// Service selector), an advertisement naming the first and one selecting by label.
const L2: &str = r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: production
  namespace: metallb-system
spec:
  addresses:
  - 192.168.1.240/28
  - 192.168.2.10 - 192.168.2.20
  - fc00:f853:0ccd:e799::/124
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: team-a
  namespace: metallb-system
  labels:
    zone: east
spec:
  addresses: ["192.168.3.0/24"]
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 10
    namespaces: [team-a]
    serviceSelectors:
    - matchLabels:
        exposed: "true"
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: production
  namespace: metallb-system
spec:
  ipAddressPools: [production]
  interfaces: [eth1]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: east
  namespace: metallb-system
spec:
  ipAddressPoolSelectors:
  - matchLabels:
      zone: east
  nodeSelectors:
  - matchLabels:
      kubernetes.io/hostname: node-a
"#;

/// BGP as in MetalLB's docs, with a pool nothing advertises.
const BGP: &str = r#"
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: router, namespace: metallb-system}
spec: {myASN: 64500, peerASN: 64501, peerAddress: 10.0.0.1}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: bgp-pool, namespace: metallb-system}
spec: {addresses: [198.51.100.0/26]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: idle, namespace: metallb-system}
spec: {addresses: [198.51.100.64/26]}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: bgp, namespace: metallb-system}
spec:
  ipAddressPools: [bgp-pool]
  communities: [no-advertise]
---
apiVersion: metallb.io/v1beta1
kind: Community
metadata: {name: communities, namespace: metallb-system}
spec:
  communities:
  - name: no-advertise
    value: "65535:65282"
"#;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn migrate(args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = std::process::Command::new(binary("ferry").unwrap())
        .arg("migrate")
        .args(args)
        .env("KUBECONFIG", shared_kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn shared_kubeconfig() -> PathBuf {
    shared().admin_kubeconfig.clone()
}

fn pools_of(yaml: &str) -> Vec<LoadBalancerPool> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml::from_value(v).unwrap())
        .collect()
}

/// Every pool passes the real apiserver's validation of the CRD (nothing is stored).
async fn accepted(pools: &[LoadBalancerPool]) {
    let admin = shared().admin_client().await.unwrap();
    let api: Api<LoadBalancerPool> = Api::all(admin);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    for p in pools {
        api.create(&dry, p)
            .await
            .unwrap_or_else(|e| panic!("pool {:?} refused: {e}", p.metadata.name));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metallb_configuration_becomes_pools_and_a_report() {
    let _serial = serial().await;
    let dir = shared().dir.join(format!("migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let l2 = write(&dir, "l2.yaml", L2);
    let bgp = write(&dir, "bgp.yaml", BGP);

    // Two files and stdin at once.
    let run = migrate(
        &[
            "-f",
            l2.to_str().unwrap(),
            "-f",
            "-",
            "--filename",
            bgp.to_str().unwrap(),
        ],
        Some(
            "kind: Service\napiVersion: v1\nmetadata: {name: web, namespace: shop, annotations: {metallb.universe.tf/address-pool: production}}\n",
        ),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let pools = pools_of(&run.stdout);
    let names: Vec<&str> = pools
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["production", "team-a", "bgp-pool", "idle"]);
    assert_eq!(
        pools[0].spec.addresses,
        [
            "192.168.1.240/28",
            "192.168.2.10-192.168.2.20",
            "fc00:f853:0ccd:e799::/124"
        ]
    );
    assert!(!pools[1].spec.auto_assign && pools[1].spec.avoid_buggy_ips);
    assert!(pools[1].spec.namespace_selector.is_some() && pools[1].spec.service_selector.is_some());
    accepted(&pools).await;
    for expected in [
        "IPAddressPool team-a: serviceAllocation.priority 10",
        "L2Advertisement production: interfaces",
        "L2Advertisement east: nodeSelectors",
        "BGPPeer router is not carried over",
        "BGPAdvertisement bgp is not carried over",
        "Community communities is not carried over",
        "pool bgp-pool: MetalLB advertises it over BGP only",
        "pool idle: no L2Advertisement advertises it",
        "Service shop/web: annotation metallb.universe.tf/address-pool read by ferry",
        "ipMode: Proxy",
    ] {
        assert!(
            run.stderr.contains(expected),
            "{expected:?} missing from:\n{}",
            run.stderr
        );
    }
    // The advertised pools are not reported as unadvertised.
    assert!(!run.stderr.contains("pool production:"), "{}", run.stderr);
    assert!(!run.stderr.contains("pool team-a:"), "{}", run.stderr);

    // A file that is not there, and YAML that is not: one line, exit 1.
    let missing = migrate(&["-f", "/nonexistent/metallb.yaml"], None);
    assert_eq!(missing.code, Some(1));
    assert_eq!(
        missing.stderr.trim().lines().count(),
        1,
        "{}",
        missing.stderr
    );
    let garbage = migrate(&["-f", "-"], Some("kind: [unclosed\n"));
    assert_eq!(garbage.code, Some(1), "{}", garbage.stderr);
    // Neither files nor --from-cluster: a flag error.
    assert_eq!(migrate(&[], None).code, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_the_cluster_reads_services_annotations() {
    let _serial = serial().await;
    let admin = shared().admin_client().await.unwrap();
    let ns = namespace(&admin, "migrate").await.unwrap();
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let mut svc = lb_service("legacy", &[80]);
    svc.spec.as_mut().unwrap().load_balancer_class = Some("example.com/none".into());
    svc.metadata.annotations = Some(
        [(
            "metallb.io/loadBalancerIPs".to_string(),
            "192.0.2.7".to_string(),
        )]
        .into(),
    );
    let created = svcs.create(&PostParams::default(), &svc).await;
    let run = migrate(&["--from-cluster"], None);
    let _ = Api::<Namespace>::all(admin)
        .delete(&ns, &DeleteParams::default())
        .await;
    created.unwrap();
    // No MetalLB CRDs here: no pools, and no error for their absence.
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(pools_of(&run.stdout).is_empty());
    assert!(
        run.stderr.contains(&format!(
            "Service {ns}/legacy: annotation metallb.io/loadBalancerIPs read by ferry"
        )),
        "{}",
        run.stderr
    );
}

/// Real-world samples, when someone has put them beside the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shared_metallb_sample_migrates() {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/metallb-samples");
    let Ok(entries) = std::fs::read_dir(&samples) else {
        return;
    };
    let _serial = serial().await;
    let mut seen = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        seen += 1;
        let run = migrate(&["-f", path.to_str().unwrap()], None);
        assert_eq!(run.code, Some(0), "{}: {}", path.display(), run.stderr);
        accepted(&pools_of(&run.stdout)).await;
    }
    eprintln!("migrated {seen} samples from {}", samples.display());
}
