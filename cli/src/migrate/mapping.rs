//! The pure mapping from MetalLB's configuration to ferry's: `IPAddressPool`s (and the
//! legacy ConfigMap's layer2 pools) become `LoadBalancerPool`s of the same name; everything
//! that has no equivalent, or means something else under ferry, goes into the report.

use std::collections::{BTreeMap, BTreeSet};

use ferry_crds::{LoadBalancerPool, LoadBalancerPoolSpec};
use ferry_model::desired::{
    METALLB_IPS_ANNOTATION, METALLB_LEGACY_IPS_ANNOTATION, METALLB_LEGACY_POOL_ANNOTATION,
    METALLB_LEGACY_SHARED_IP_ANNOTATION, METALLB_POOL_ANNOTATION, METALLB_SHARED_IP_ANNOTATION,
};
use ferry_model::ranges::AddressRange;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector, SelectorExt};
use serde_yaml::Value;

/// The label every namespace carries with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The pools to create and the report of what did not carry over.
#[derive(Debug, Default)]
pub struct Migration {
    pub pools: Vec<LoadBalancerPool>,
    /// One line each, prefixed `warning:` (lost or changed meaning) or `note:`.
    pub report: Vec<String>,
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

fn strings(v: &Value, path: &[&str]) -> Vec<String> {
    get(v, path)
        .and_then(Value::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn selectors(v: &Value, path: &[&str]) -> Result<Vec<LabelSelector>, String> {
    match get(v, path) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(s) => serde_yaml::from_value(s.clone()).map_err(|e| e.to_string()),
    }
}

/// Documents flattened: `List`s (`kubectl get -o yaml`) give their items.
fn flatten(docs: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for d in docs {
        match get(d, &["items"]).and_then(Value::as_sequence) {
            Some(items) if str_of(d, &["kind"]).is_some_and(|k| k.ends_with("List")) => {
                out.extend(items.iter())
            }
            _ => out.push(d),
        }
    }
    out
}

/// MetalLB writes ranges as `a-b` with optional spaces; ferry takes `a-b` or a CIDR.
fn address(text: &str) -> Result<String, String> {
    let normal: String = text.split('-').map(str::trim).collect::<Vec<_>>().join("-");
    normal
        .parse::<AddressRange>()
        .map(|_| normal.clone())
        .map_err(|e| format!("{text:?}: {e}"))
}

/// One selector from MetalLB's list of names and list of selectors (any of which admits), or
/// `None` with the reason when ferry's single selector cannot say it.
fn one_selector(
    names: &[String],
    selectors: Vec<LabelSelector>,
) -> Result<Option<LabelSelector>, String> {
    match (names.is_empty(), selectors.len()) {
        (true, 0) => Ok(None),
        (false, 0) => Ok(Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: NAMESPACE_NAME_LABEL.into(),
                operator: "In".into(),
                values: Some(names.to_vec()),
            }]),
            match_labels: None,
        })),
        (true, 1) => Ok(selectors.into_iter().next()),
        _ => Err(format!(
            "{} names and {} selectors, any of which admits: ferry's pool takes one selector",
            names.len(),
            selectors.len()
        )),
    }
}

/// Whether `selector` (MetalLB's `ipAddressPoolSelectors` entry) matches `labels`.
fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

struct MetallbPool {
    name: String,
    labels: BTreeMap<String, String>,
    pool: Option<LoadBalancerPool>,
}

fn ip_address_pool(doc: &Value, report: &mut Vec<String>) -> Option<MetallbPool> {
    let name = str_of(doc, &["metadata", "name"])?.to_string();
    let labels: BTreeMap<String, String> = get(doc, &["metadata", "labels"])
        .and_then(|l| serde_yaml::from_value(l.clone()).ok())
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for a in strings(doc, &["spec", "addresses"]) {
        match address(&a) {
            Ok(a) => addresses.push(a),
            Err(e) => report.push(format!(
                "warning: IPAddressPool {name}: address {e}; left out"
            )),
        }
    }
    let mut spec = LoadBalancerPoolSpec::with_addresses(&[]);
    spec.addresses = addresses;
    spec.auto_assign = get(doc, &["spec", "autoAssign"])
        .and_then(Value::as_bool)
        .unwrap_or(true);
    spec.avoid_buggy_ips = get(doc, &["spec", "avoidBuggyIPs"])
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let alloc = ["spec", "serviceAllocation"];
    if get(doc, &alloc).is_some() {
        if let Some(p) = get(doc, &["spec", "serviceAllocation", "priority"]) {
            report.push(format!(
                "warning: IPAddressPool {name}: serviceAllocation.priority {} is not carried over: ferry tries pools oldest first",
                serde_yaml::to_string(p).unwrap_or_default().trim()
            ));
        }
        let names = strings(doc, &["spec", "serviceAllocation", "namespaces"]);
        match selectors(doc, &["spec", "serviceAllocation", "namespaceSelectors"])
            .and_then(|s| one_selector(&names, s))
        {
            Ok(s) => spec.namespace_selector = s,
            Err(e) => report.push(format!(
                "warning: IPAddressPool {name}: serviceAllocation namespaces not carried over ({e}); the pool admits every namespace — add a namespaceSelector by hand"
            )),
        }
        match selectors(doc, &["spec", "serviceAllocation", "serviceSelectors"])
            .and_then(|s| one_selector(&[], s))
        {
            Ok(s) => spec.service_selector = s,
            Err(e) => report.push(format!(
                "warning: IPAddressPool {name}: serviceAllocation.serviceSelectors not carried over ({e}); the pool admits every Service — add a serviceSelector by hand"
            )),
        }
    }
    let pool = if spec.addresses.is_empty() {
        report.push(format!(
            "warning: IPAddressPool {name}: no usable address; no pool written"
        ));
        None
    } else {
        Some(LoadBalancerPool::new(&name, spec))
    };
    Some(MetallbPool { name, labels, pool })
}

/// The layer2 pools of MetalLB's ConfigMap configuration (before v0.13).
fn legacy_config(doc: &Value, report: &mut Vec<String>) -> Vec<MetallbPool> {
    let Some(text) = str_of(doc, &["data", "config"]) else {
        return Vec::new();
    };
    let config: Value = match serde_yaml::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            report.push(format!(
                "warning: legacy ConfigMap: its config is not YAML ({e})"
            ));
            return Vec::new();
        }
    };
    if get(&config, &["address-pools"]).is_none() && get(&config, &["peers"]).is_none() {
        // Some other program's ConfigMap with a `config` key.
        return Vec::new();
    }
    report.push(
        "note: legacy ConfigMap configuration (MetalLB before v0.13) read; its layer2 pools are carried over"
            .into(),
    );
    if get(&config, &["peers"]).is_some() || get(&config, &["bgp-communities"]).is_some() {
        report.push("warning: legacy ConfigMap: BGP peers and communities are not carried over: ferry announces over ARP/NDP only".into());
    }
    let mut out = Vec::new();
    for p in get(&config, &["address-pools"])
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = str_of(p, &["name"]).unwrap_or("unnamed").to_string();
        let protocol = str_of(p, &["protocol"]).unwrap_or("layer2");
        if protocol != "layer2" {
            report.push(format!(
                "warning: legacy pool {name}: protocol {protocol} is not carried over (ferry announces over ARP/NDP only); no pool written"
            ));
            continue;
        }
        // Re-shape it as an IPAddressPool and map that.
        let mut spec = serde_yaml::Mapping::new();
        if let Some(a) = get(p, &["addresses"]) {
            spec.insert("addresses".into(), a.clone());
        }
        if let Some(a) = get(p, &["auto-assign"]) {
            spec.insert("autoAssign".into(), a.clone());
        }
        if let Some(a) = get(p, &["avoid-buggy-ips"]) {
            spec.insert("avoidBuggyIPs".into(), a.clone());
        }
        let mut meta = serde_yaml::Mapping::new();
        meta.insert("name".into(), name.into());
        let mut obj = serde_yaml::Mapping::new();
        obj.insert("metadata".into(), Value::Mapping(meta));
        obj.insert("spec".into(), Value::Mapping(spec));
        if let Some(mut pool) = ip_address_pool(&Value::Mapping(obj), report) {
            // Legacy layer2 pools were announced without an advertisement object.
            pool.labels
                .insert("ferry.dev/legacy-layer2".into(), "true".into());
            out.push(pool);
        }
    }
    out
}

/// Which pools an advertisement covers: named, selected, or (neither given) all of them.
fn advertised(doc: &Value, pools: &[MetallbPool]) -> BTreeSet<String> {
    let named = strings(doc, &["spec", "ipAddressPools"]);
    let selectors = selectors(doc, &["spec", "ipAddressPoolSelectors"]).unwrap_or_default();
    pools
        .iter()
        .filter(|p| {
            (named.is_empty() && selectors.is_empty())
                || named.contains(&p.name)
                || selectors.iter().any(|s| matches(s, &p.labels))
        })
        .map(|p| p.name.clone())
        .collect()
}

fn kind_name(doc: &Value) -> (&str, &str) {
    (
        str_of(doc, &["kind"]).unwrap_or(""),
        str_of(doc, &["metadata", "name"]).unwrap_or("unnamed"),
    )
}

fn service_annotations(doc: &Value, report: &mut Vec<String>) {
    let (_, name) = kind_name(doc);
    let namespace = str_of(doc, &["metadata", "namespace"]).unwrap_or("default");
    let annotations: BTreeMap<String, String> = get(doc, &["metadata", "annotations"])
        .and_then(|a| serde_yaml::from_value(a.clone()).ok())
        .unwrap_or_default();
    for key in annotations.keys() {
        let what = match key.as_str() {
            METALLB_IPS_ANNOTATION | METALLB_LEGACY_IPS_ANNOTATION => {
                "read by ferry as is (same as ferry.dev/load-balancer-ips)"
            }
            METALLB_SHARED_IP_ANNOTATION | METALLB_LEGACY_SHARED_IP_ANNOTATION => {
                "read by ferry as is (same as ferry.dev/allow-shared-ip)"
            }
            METALLB_POOL_ANNOTATION | METALLB_LEGACY_POOL_ANNOTATION => {
                "read by ferry as is (same as ferry.dev/address-pool); the migrated pools keep their names"
            }
            k if k.starts_with("metallb.io/") || k.starts_with("metallb.universe.tf/") => {
                "has no ferry equivalent and is ignored"
            }
            _ => continue,
        };
        report.push(format!(
            "note: Service {namespace}/{name}: annotation {key} {what}"
        ));
    }
}

/// Maps MetalLB's documents (any order, unrelated ones ignored) to ferry pools and a report.
pub fn migrate(docs: &[Value]) -> Migration {
    let docs = flatten(docs);
    let mut report = Vec::new();
    let mut pools: Vec<MetallbPool> = Vec::new();
    for d in &docs {
        match kind_name(d) {
            ("IPAddressPool", _) => pools.extend(ip_address_pool(d, &mut report)),
            ("ConfigMap", _) if get(d, &["data", "config"]).is_some() => {
                pools.extend(legacy_config(d, &mut report))
            }
            _ => {}
        }
    }
    let mut by_l2 = BTreeSet::new();
    let mut by_bgp = BTreeSet::new();
    for d in &docs {
        match kind_name(d) {
            ("L2Advertisement", name) => {
                by_l2.extend(advertised(d, &pools));
                if !strings(d, &["spec", "interfaces"]).is_empty() {
                    report.push(format!(
                        "warning: L2Advertisement {name}: interfaces are not carried over: ferry's forwarder announces on the interface that holds the node's address (see --interface)"
                    ));
                }
                if get(d, &["spec", "nodeSelectors"]).is_some_and(|v| !v.is_null()) {
                    report.push(format!(
                        "warning: L2Advertisement {name}: nodeSelectors are not carried over: any eligible node may announce; label the others node.kubernetes.io/exclude-from-external-load-balancers"
                    ));
                }
            }
            ("BGPAdvertisement", name) => {
                by_bgp.extend(advertised(d, &pools));
                report.push(format!(
                    "warning: BGPAdvertisement {name} is not carried over: ferry announces over ARP/NDP only"
                ));
            }
            (kind @ ("BGPPeer" | "Community" | "BFDProfile"), name) => report.push(format!(
                "warning: {kind} {name} is not carried over: ferry has no BGP"
            )),
            ("Service", _) => service_annotations(d, &mut report),
            _ => {}
        }
    }
    for p in &pools {
        let legacy = p.labels.contains_key("ferry.dev/legacy-layer2");
        if legacy || by_l2.contains(&p.name) {
            continue;
        }
        if by_bgp.contains(&p.name) {
            report.push(format!(
                "warning: pool {}: MetalLB advertises it over BGP only; ferry will announce it over ARP/NDP on the local network",
                p.name
            ));
        } else {
            report.push(format!(
                "warning: pool {}: no L2Advertisement advertises it, so MetalLB allocates its addresses but never announces them; ferry will announce them",
                p.name
            ));
        }
    }
    let out: Vec<LoadBalancerPool> = pools.into_iter().filter_map(|p| p.pool).collect();
    if !out.is_empty() {
        report.push("note: ferry publishes ipMode: Proxy and forwards the traffic itself; MetalLB publishes no ipMode (VIP) and leaves forwarding to kube-proxy. Add `ipMode: VIP` to a pool (or annotate Services ferry.dev/ip-mode: VIP) to keep MetalLB's behaviour".into());
    }
    Migration { pools: out, report }
}

/// The pools as multi-document YAML.
pub fn pools_yaml(pools: &[LoadBalancerPool]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for p in pools {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(p)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::source::documents;

    fn run(yaml: &str) -> Migration {
        migrate(&documents(yaml).unwrap())
    }

    fn has(report: &[String], needle: &str) -> bool {
        report.iter().any(|l| l.contains(needle))
    }

    const POOLS: &str = r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: first-pool
  namespace: metallb-system
spec:
  addresses:
  - 192.168.10.0/24
  - 192.168.9.1 - 192.168.9.5
  - fc00:f853:0ccd:e799::/124
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: cheap
  namespace: metallb-system
  labels:
    tier: cheap
spec:
  addresses: ["192.168.20.0/28"]
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 50
    namespaces: [team-a, team-b]
    serviceSelectors:
    - matchExpressions:
      - {key: app, operator: In, values: [web]}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: l2
  namespace: metallb-system
spec:
  ipAddressPools: [first-pool]
"#;

    #[test]
    fn pools_keep_addresses_flags_and_selectors() {
        let m = run(POOLS);
        assert_eq!(m.pools.len(), 2);
        let first = &m.pools[0];
        assert_eq!(first.metadata.name.as_deref(), Some("first-pool"));
        assert_eq!(
            first.spec.addresses,
            [
                "192.168.10.0/24",
                "192.168.9.1-192.168.9.5",
                "fc00:f853:0ccd:e799::/124"
            ]
        );
        assert!(first.spec.auto_assign);
        assert!(first.metadata.namespace.is_none());
        let cheap = &m.pools[1];
        assert!(!cheap.spec.auto_assign);
        assert!(cheap.spec.avoid_buggy_ips);
        let ns = cheap.spec.namespace_selector.clone().unwrap();
        let want = Selector::try_from(ns).unwrap();
        assert!(want.matches(&BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            "team-b".to_string()
        )])));
        assert!(!want.matches(&BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            "team-c".to_string()
        )])));
        assert!(cheap.spec.service_selector.is_some());
        assert!(has(&m.report, "cheap: serviceAllocation.priority 50"));
        // Only first-pool is advertised: cheap is allocated but never announced by MetalLB.
        assert!(has(
            &m.report,
            "pool cheap: no L2Advertisement advertises it"
        ));
        assert!(!has(&m.report, "pool first-pool:"));
    }

    #[test]
    fn the_yaml_is_loadbalancerpools_without_status() {
        let m = run(POOLS);
        let yaml = pools_yaml(&m.pools).unwrap();
        assert!(!yaml.contains("status"), "{yaml}");
        let back: Vec<LoadBalancerPool> = documents(&yaml)
            .unwrap()
            .into_iter()
            .map(|d| serde_yaml::from_value(d).unwrap())
            .collect();
        assert_eq!(back, m.pools);
        assert!(yaml.contains("apiVersion: ferry.dev/v1alpha1"));
    }

    #[test]
    fn selected_pools_and_advertisements_for_all_count_as_advertised() {
        let by_selector = format!(
            "{}\n---\napiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: sel}}\nspec:\n  ipAddressPoolSelectors:\n  - matchLabels: {{tier: cheap}}\n  interfaces: [eth0]\n  nodeSelectors:\n  - matchLabels: {{kubernetes.io/hostname: n1}}\n",
            POOLS
        );
        let m = run(&by_selector);
        assert!(
            !has(&m.report, "no L2Advertisement advertises"),
            "{:?}",
            m.report
        );
        assert!(has(&m.report, "L2Advertisement sel: interfaces"));
        assert!(has(&m.report, "L2Advertisement sel: nodeSelectors"));
        let all = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: p}\nspec: {addresses: [10.0.0.0/30]}\n---\nkind: L2Advertisement\nmetadata: {name: all}\n";
        assert!(!has(&run(all).report, "advertises"));
    }

    #[test]
    fn bgp_is_reported_and_not_carried_over() {
        let yaml = r#"
kind: IPAddressPool
metadata: {name: bgp-pool}
spec: {addresses: [10.0.0.0/29]}
---
kind: BGPAdvertisement
metadata: {name: adv}
spec: {ipAddressPools: [bgp-pool], communities: [65535:65282]}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: peer}
spec: {myASN: 64500, peerASN: 64501, peerAddress: 10.0.0.1}
---
kind: Community
metadata: {name: c}
"#;
        let m = run(yaml);
        assert_eq!(m.pools.len(), 1);
        assert!(has(&m.report, "BGPAdvertisement adv is not carried over"));
        assert!(has(&m.report, "BGPPeer peer is not carried over"));
        assert!(has(&m.report, "Community c is not carried over"));
        assert!(has(
            &m.report,
            "pool bgp-pool: MetalLB advertises it over BGP only"
        ));
    }

    #[test]
    fn bad_addresses_and_or_of_selectors_are_reported_not_guessed() {
        let yaml = r#"
kind: IPAddressPool
metadata: {name: p}
spec:
  addresses: [10.0.0.0/30, not-an-address]
  serviceAllocation:
    namespaceSelectors:
    - matchLabels: {a: b}
    - matchLabels: {c: d}
"#;
        let m = run(yaml);
        assert_eq!(m.pools[0].spec.addresses, ["10.0.0.0/30"]);
        assert!(m.pools[0].spec.namespace_selector.is_none());
        assert!(has(&m.report, "address \"not-an-address\""));
        assert!(has(&m.report, "namespaces not carried over"));
    }

    #[test]
    fn the_legacy_configmap_gives_its_layer2_pools() {
        let yaml = r#"
apiVersion: v1
kind: ConfigMap
metadata: {namespace: metallb-system, name: config}
data:
  config: |
    peers:
    - peer-address: 10.0.0.1
      peer-asn: 64501
      my-asn: 64500
    address-pools:
    - name: default
      protocol: layer2
      addresses:
      - 192.168.1.240-192.168.1.250
      auto-assign: false
    - name: bgp
      protocol: bgp
      addresses: [198.51.100.0/24]
"#;
        let m = run(yaml);
        assert_eq!(m.pools.len(), 1);
        assert_eq!(m.pools[0].spec.addresses, ["192.168.1.240-192.168.1.250"]);
        assert!(!m.pools[0].spec.auto_assign);
        assert!(has(&m.report, "legacy pool bgp: protocol bgp"));
        assert!(has(&m.report, "BGP peers"));
        assert!(!has(&m.report, "no L2Advertisement"));
    }

    #[test]
    fn other_configmaps_are_not_metallbs() {
        let m = run(
            "kind: ConfigMap\nmetadata: {name: config}\ndata:\n  config: |\n    log-level: debug\n",
        );
        assert!(m.pools.is_empty());
        assert!(m.report.is_empty(), "{:?}", m.report);
    }

    #[test]
    fn service_annotations_and_lists_are_read() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: web
    namespace: shop
    annotations:
      metallb.universe.tf/loadBalancerIPs: 192.168.10.5
      metallb.io/allow-shared-ip: key
      metallb.io/address-pool: first-pool
      metallb.io/ip-allocated-from-pool: first-pool
"#;
        let m = run(yaml);
        assert!(has(
            &m.report,
            "shop/web: annotation metallb.universe.tf/loadBalancerIPs read by ferry"
        ));
        assert!(has(&m.report, "metallb.io/allow-shared-ip read by ferry"));
        assert!(has(&m.report, "metallb.io/address-pool read by ferry"));
        assert!(has(
            &m.report,
            "metallb.io/ip-allocated-from-pool has no ferry equivalent"
        ));
        assert!(m.pools.is_empty());
    }
}
