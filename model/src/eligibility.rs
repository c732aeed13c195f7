//! Which nodes a balancer sends traffic to, following the upstream cloud-provider predicates:
//! excluded by label, being deleted (autoscaler taint or deletionTimestamp), or without an
//! address the provider can use. Readiness is deliberately not a predicate: health checks
//! handle it, and target lists do not churn when a kubelet flaps.

use std::net::IpAddr;

use crate::NodeTarget;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The provider-neutral view of a node, or `None` when it must not be a target.
pub fn target_of(node: &Node) -> Option<NodeTarget> {
    if node.labels().contains_key(EXCLUDE_LABEL) || node.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = node.spec.as_ref();
    if spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
    {
        return None;
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let of_type = |kind: &str| -> Vec<IpAddr> {
        addresses
            .iter()
            .filter(|a| a.type_ == kind)
            .filter_map(|a| a.address.parse().ok())
            .collect()
    };
    Some(NodeTarget {
        name: node.name_any(),
        internal_ips: of_type("InternalIP"),
        external_ips: of_type("ExternalIP"),
        provider_id: spec.and_then(|s| s.provider_id.clone()),
        zone: node.labels().get(ZONE_LABEL).cloned(),
    })
}

/// Eligible targets among `nodes`, sorted by name, keeping only those `usable` accepts.
pub fn eligible_targets<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    usable: impl Fn(&NodeTarget) -> bool,
) -> Vec<NodeTarget> {
    let mut targets: Vec<NodeTarget> = nodes
        .into_iter()
        .filter_map(target_of)
        .filter(|t| usable(t))
        .collect();
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    targets
}

/// Why a node is not a VIP target, for users; the same predicates as `target_of` plus the
/// forwarder's own (an InternalIP to forward from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ineligible {
    /// Labelled `node.kubernetes.io/exclude-from-external-load-balancers`.
    Excluded,
    /// It has a deletionTimestamp.
    BeingDeleted,
    /// The cluster autoscaler is about to remove it.
    AutoscalerTaint,
    /// It reports no InternalIP address.
    NoInternalIp,
}

impl Ineligible {
    pub fn describe(self) -> &'static str {
        match self {
            Ineligible::Excluded => {
                "labelled node.kubernetes.io/exclude-from-external-load-balancers"
            }
            Ineligible::BeingDeleted => "being deleted",
            Ineligible::AutoscalerTaint => "tainted ToBeDeletedByClusterAutoscaler",
            Ineligible::NoInternalIp => "no InternalIP address",
        }
    }
}

/// Why `node` is no target of a VIP, or `None` when it is one: the predicates in the order
/// `target_of` applies them, then the InternalIP the forwarder needs.
pub fn ineligibility(node: &Node) -> Option<Ineligible> {
    if node.labels().contains_key(EXCLUDE_LABEL) {
        return Some(Ineligible::Excluded);
    }
    if node.metadata.deletion_timestamp.is_some() {
        return Some(Ineligible::BeingDeleted);
    }
    let target = match target_of(node) {
        Some(t) => t,
        None => return Some(Ineligible::AutoscalerTaint),
    };
    if target.internal_ips.is_empty() {
        return Some(Ineligible::NoInternalIp);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::node;

    #[test]
    fn a_plain_node_is_a_target_with_its_addresses() {
        let t = target_of(
            &node("n1")
                .ip("10.0.0.1")
                .provider_id("aws:///z/i-1")
                .zone("z")
                .build(),
        )
        .unwrap();
        assert_eq!(t.internal_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(t.provider_id.as_deref(), Some("aws:///z/i-1"));
        assert_eq!(t.zone.as_deref(), Some("z"));
    }

    #[test]
    fn upstream_predicates_exclude_nodes() {
        assert!(target_of(&node("x").ip("10.0.0.1").label(EXCLUDE_LABEL, "").build()).is_none());
        assert!(target_of(&node("x").ip("10.0.0.1").taint(TO_BE_DELETED_TAINT).build()).is_none());
        assert!(target_of(&node("x").ip("10.0.0.1").deleting().build()).is_none());
        // Other taints and NotReady do not exclude.
        assert!(
            target_of(
                &node("x")
                    .ip("10.0.0.1")
                    .taint("node.kubernetes.io/not-ready")
                    .not_ready()
                    .build()
            )
            .is_some()
        );
    }

    #[test]
    fn nodes_without_a_usable_address_are_left_out_and_the_rest_sorted() {
        let nodes = [
            node("b").ip("10.0.0.2").build(),
            node("c").build(),
            node("a").ip("10.0.0.1").build(),
        ];
        let names: Vec<_> = eligible_targets(&nodes, |t| !t.internal_ips.is_empty())
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn ineligibility_names_the_first_reason_and_agrees_with_target_of() {
        let cases = [
            (node("a").ip("10.0.0.1").build(), None),
            (
                node("a")
                    .ip("10.0.0.1")
                    .label(EXCLUDE_LABEL, "")
                    .deleting()
                    .build(),
                Some(Ineligible::Excluded),
            ),
            (
                node("a").ip("10.0.0.1").deleting().build(),
                Some(Ineligible::BeingDeleted),
            ),
            (
                node("a").ip("10.0.0.1").taint(TO_BE_DELETED_TAINT).build(),
                Some(Ineligible::AutoscalerTaint),
            ),
            (node("a").build(), Some(Ineligible::NoInternalIp)),
            (
                node("a")
                    .ip("10.0.0.1")
                    .not_ready()
                    .taint("node.kubernetes.io/not-ready")
                    .build(),
                None,
            ),
        ];
        for (n, want) in cases {
            assert_eq!(ineligibility(&n), want, "{n:?}");
            let eligible = eligible_targets([&n], |t| !t.internal_ips.is_empty());
            assert_eq!(eligible.is_empty(), want.is_some());
        }
    }
}
