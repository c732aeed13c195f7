//! Which node announces a VIP: rendezvous (highest-random-weight) hashing of (VIP, node) over
//! the candidate nodes. Every forwarder computes the same answer from the same inputs, so no
//! election traffic is needed, and losing a node moves only the VIPs it owned. `standings`
//! says, node by node in rendezvous order, why each is or is not a candidate: the forwarder
//! takes the owner from it, and `ferry explain` shows it.
//!
//! The hash is FNV-1a with a 64-bit finaliser, written out here rather than taken from `std`:
//! every forwarder in a cluster must agree on it across builds and Rust versions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::NodeTarget;

/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn fnv1a(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: FNV alone clusters for inputs that differ in their last bytes.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `node` for `vip`; the candidate with the highest weight owns the VIP.
pub fn weight(vip: &IpAddr, node: &str) -> u64 {
    let vip_bytes: Vec<u8> = match vip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let h = fnv1a(vip_bytes, 0xcbf2_9ce4_8422_2325);
    let h = fnv1a([0xff], h);
    mix(fnv1a(node.bytes(), h))
}

/// The owner of `vip` among `candidates`, or `None` when there is none. Ties (practically
/// impossible) go to the smaller name, so the answer never depends on the order given.
pub fn owner<'a>(vip: &IpAddr, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|node| (weight(vip, node), node))
        .max_by(|(wa, na), (wb, nb)| wa.cmp(wb).then_with(|| nb.cmp(na)))
        .map(|(_, node)| node)
}

/// Where a node stands for one VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Standing {
    /// It may announce the VIP; the first candidate in rendezvous order does.
    Candidate,
    /// Its forwarder's heartbeat is not fresh (or it runs none).
    NoLiveForwarder,
    /// Its forwarder said it cannot serve this VIP (its forwarding could not be set up there).
    Refused,
    /// `externalTrafficPolicy: Local` and the node has no ready endpoint of the Service.
    NoLocalEndpoints,
}

impl Standing {
    /// Why a node that is not a candidate is not, in words for users.
    pub fn describe(self) -> &'static str {
        match self {
            Standing::Candidate => "candidate",
            Standing::NoLiveForwarder => "no live forwarder",
            Standing::Refused => "its forwarder cannot serve this VIP",
            Standing::NoLocalEndpoints => "no ready local endpoint (externalTrafficPolicy: Local)",
        }
    }
}

/// One eligible node's standing for a VIP, with its rendezvous weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStanding {
    pub node: String,
    pub weight: u64,
    pub standing: Standing,
}

/// What decides who announces a VIP, besides the eligible nodes.
pub struct Candidacy<'a> {
    /// Nodes whose forwarder is alive.
    pub live: &'a BTreeSet<String>,
    /// VIPs each node has said it cannot serve.
    pub refused: &'a BTreeMap<String, BTreeSet<IpAddr>>,
    /// With `externalTrafficPolicy: Local`: the nodes with ready endpoints of every Service on
    /// the VIP; `None` when no Service on it is `Local`.
    pub local_endpoints: Option<&'a BTreeSet<String>>,
}

/// Every eligible node's standing for `vip`, in rendezvous order: the first `Candidate` is the
/// owner (the same node `owner` picks among the candidates). The first reason that applies is
/// given: no live forwarder, refused, no local endpoints.
pub fn standings(vip: &IpAddr, targets: &[NodeTarget], c: &Candidacy<'_>) -> Vec<NodeStanding> {
    let mut out: Vec<NodeStanding> = targets
        .iter()
        .map(|t| {
            let standing = if !c.live.contains(&t.name) {
                Standing::NoLiveForwarder
            } else if c.refused.get(&t.name).is_some_and(|r| r.contains(vip)) {
                Standing::Refused
            } else if c
                .local_endpoints
                .is_some_and(|with| !with.contains(&t.name))
            {
                Standing::NoLocalEndpoints
            } else {
                Standing::Candidate
            };
            NodeStanding {
                node: t.name.clone(),
                weight: weight(vip, &t.name),
                standing,
            }
        })
        .collect();
    out.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.node.cmp(&b.node)));
    out
}

/// The owner among `standings` (as `standings` orders them): the first candidate.
pub fn owner_of(standings: &[NodeStanding]) -> Option<&str> {
    standings
        .iter()
        .find(|s| s.standing == Standing::Candidate)
        .map(|s| s.node.as_str())
}

/// Nodes with at least one ready endpoint of the Service `namespace/name`.
pub fn nodes_with_ready_endpoints(
    slices: &[Arc<EndpointSlice>],
    namespace: &str,
    name: &str,
) -> BTreeSet<String> {
    slices
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace)
                && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn target(name: &str) -> NodeTarget {
        NodeTarget {
            name: name.into(),
            internal_ips: vec![],
            external_ips: vec![],
            provider_id: None,
            zone: None,
        }
    }

    fn names(set: &[&str]) -> BTreeSet<String> {
        set.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn standings_name_the_owner_owner_would_pick_and_say_why_the_others_are_not() {
        let targets: Vec<NodeTarget> = ["n1", "n2", "n3", "n4"].map(target).to_vec();
        let v = vip(7);
        let live = names(&["n1", "n2", "n3"]);
        let refused = BTreeMap::from([("n2".to_string(), BTreeSet::from([v]))]);
        let with_endpoints = names(&["n2", "n3", "n4"]);
        let s = standings(
            &v,
            &targets,
            &Candidacy {
                live: &live,
                refused: &refused,
                local_endpoints: Some(&with_endpoints),
            },
        );
        let by_node: BTreeMap<&str, Standing> =
            s.iter().map(|s| (s.node.as_str(), s.standing)).collect();
        assert_eq!(by_node["n1"], Standing::NoLocalEndpoints);
        assert_eq!(by_node["n2"], Standing::Refused);
        assert_eq!(by_node["n3"], Standing::Candidate);
        assert_eq!(by_node["n4"], Standing::NoLiveForwarder);
        assert_eq!(owner_of(&s), Some("n3"));
        assert!(
            s.windows(2).all(|w| w[0].weight >= w[1].weight),
            "rendezvous order"
        );
    }

    #[test]
    fn no_candidate_no_owner() {
        let targets = vec![target("n1")];
        let live = BTreeSet::new();
        let s = standings(
            &vip(1),
            &targets,
            &Candidacy {
                live: &live,
                refused: &BTreeMap::new(),
                local_endpoints: None,
            },
        );
        assert_eq!(owner_of(&s), None);
        assert_eq!(s[0].standing, Standing::NoLiveForwarder);
    }

    proptest! {
        #[test]
        fn the_first_candidate_is_the_owner(i in 0u32..10_000, nodes in proptest::collection::btree_set("[a-z]{1,8}", 1..8), dead in proptest::collection::btree_set("[a-z]{1,8}", 0..4)) {
            let targets: Vec<NodeTarget> = nodes.iter().map(|n| target(n)).collect();
            let live: BTreeSet<String> = nodes.difference(&dead).cloned().collect();
            let s = standings(&vip(i), &targets, &Candidacy { live: &live, refused: &BTreeMap::new(), local_endpoints: None });
            prop_assert_eq!(owner_of(&s), owner(&vip(i), live.iter().map(String::as_str)));
        }
    }

    fn vip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + i))
    }

    #[test]
    fn no_candidates_no_owner() {
        assert_eq!(owner(&vip(1), []), None);
    }

    #[test]
    fn the_weight_is_stable_across_builds() {
        // Forwarders of different versions must agree; this pins the function.
        assert_eq!(
            weight(&"192.0.2.10".parse().unwrap(), "node-a"),
            0xa494_a5dd_5d69_169d
        );
    }

    #[test]
    fn vips_spread_over_nodes() {
        let nodes = ["n1", "n2", "n3"];
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..3000 {
            *per_node.entry(owner(&vip(i), nodes).unwrap()).or_default() += 1;
        }
        for n in nodes {
            let share = per_node[n];
            assert!((800..1200).contains(&share), "{n} owns {share} of 3000");
        }
    }

    proptest! {
        #[test]
        fn order_of_candidates_does_not_matter(i in 0u32..10_000, mut nodes in proptest::collection::vec("[a-z]{1,8}", 1..8)) {
            let a = owner(&vip(i), nodes.iter().map(String::as_str)).map(str::to_string);
            nodes.reverse();
            let b = owner(&vip(i), nodes.iter().map(String::as_str)).map(str::to_string);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn losing_a_node_moves_only_its_vips(i in 0u32..10_000, nodes in proptest::collection::btree_set("[a-z]{1,8}", 2..8), gone in 0usize..8) {
            let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let gone = nodes[gone % nodes.len()];
            let before = owner(&vip(i), nodes.iter().copied()).unwrap();
            let after = owner(&vip(i), nodes.iter().copied().filter(|n| *n != gone)).unwrap();
            if before != gone {
                prop_assert_eq!(before, after);
            }
        }
    }
}
