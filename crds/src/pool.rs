//! `LoadBalancerPool`: a cluster-scoped set of addresses the local provider hands out to
//! LoadBalancer Services. Parsing and validation of the ranges live with the allocator in
//! `ferry-providers`; this file only describes the resource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type on a pool: `True` when every range parses and none overlaps an older pool.
pub const POOL_READY_CONDITION: &str = "Ready";

/// Addresses that the local provider may assign to `type: LoadBalancer` Services.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "LoadBalancerPool",
    plural = "loadbalancerpools",
    shortname = "lbpool",
    category = "ferry",
    status = "LoadBalancerPoolStatus",
    derive = "PartialEq",
    doc = "A pool of addresses that ferry's local provider assigns to LoadBalancer Services.",
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    printcolumn = r#"{"name":"Auto Assign","type":"boolean","jsonPath":".spec.autoAssign"}"#,
    printcolumn = r#"{"name":"Classes","type":"string","priority":1,"jsonPath":".spec.loadBalancerClasses"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerPoolSpec {
    /// Address ranges, IPv4 or IPv6: a CIDR (`192.0.2.0/28`, `2001:db8::/120`) or an
    /// inclusive range (`192.0.2.10-192.0.2.20`).
    pub addresses: Vec<String>,

    /// Whether Services that ask for no particular address or pool get addresses from this
    /// pool. A Service can still request an address in a pool with `autoAssign: false`.
    #[serde(default = "default_true")]
    pub auto_assign: bool,

    /// Skip IPv4 addresses ending in `.0` or `.255`, which some clients and routers mishandle.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,

    /// Only Services whose labels match may get addresses from this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,

    /// Only Services in namespaces whose labels match may get addresses from this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// How traffic reaches the addresses of this pool, published as the ingress `ipMode`.
    /// `Proxy` (default): ferry's forwarder carries VIP traffic to the NodePorts. `VIP`: ferry
    /// only announces the address and kube-proxy forwards it. A Service may override this
    /// with the `ferry.dev/ip-mode` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_mode: Option<IpMode>,

    /// The `loadBalancerClass`es of the ferry instances that may allocate from this pool.
    /// Empty (the default) means `ferry.dev/local`, the local provider's default class; an
    /// instance serving another class uses only pools that name it, so two local instances
    /// never hand out the same address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_classes: Vec<String>,
}

impl LoadBalancerPoolSpec {
    /// A pool of `addresses` with the defaults a user gets from YAML that names nothing else.
    pub fn with_addresses(addresses: &[&str]) -> Self {
        Self {
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            service_selector: None,
            namespace_selector: None,
            ip_mode: None,
            load_balancer_classes: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// The ingress `ipMode` a pool's addresses are published with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum IpMode {
    /// ferry's forwarder proxies VIP traffic to the NodePorts; kube-proxy leaves the VIP alone.
    Proxy,
    /// Traffic arrives with the VIP as destination and kube-proxy delivers it.
    #[serde(rename = "VIP")]
    Vip,
}

/// What the operator observed of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerPoolStatus {
    /// Number of assignable addresses (saturates at 2^63-1 for large IPv6 ranges).
    pub total: i64,
    /// Number of addresses held by Services.
    pub allocated: i64,
    /// `total - allocated`.
    pub available: i64,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` tells whether the pool is usable and, if not, why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
