//! Which node announces a VIP: rendezvous (highest-random-weight) hashing of (VIP, node) over
//! the candidate nodes. Every forwarder computes the same answer from the same inputs, so no
//! election traffic is needed, and losing a node moves only the VIPs it owned.
//!
//! The hash is FNV-1a with a 64-bit finaliser, written out here rather than taken from `std`:
//! every forwarder in a cluster must agree on it across builds and Rust versions.

use std::net::IpAddr;

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

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
