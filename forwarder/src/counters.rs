//! New connections counted by the kernel data plane. Each frontend's steering chain
//! (`fe_<identity>` in `kernel::ruleset`) counts into a named counter object, `c_<identity>`,
//! and the chain is entered only by a connection's first packet, so the counter's packets are
//! the frontend's new connections (new flows for UDP) at no cost to established traffic.
//! Counters outlive changes to their chains; only a whole new table starts them again, so the
//! counts are read before a replacement and at each resync, and only what is new since the
//! last read is added to the Prometheus counters.

use std::collections::BTreeMap;

/// Packets counted per counter object (by name) in `nft -j list` output.
pub fn named_counts(json: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    let items = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for counter in items.iter().filter_map(|i| i.get("counter")) {
        let name = counter.get("name").and_then(|n| n.as_str());
        let packets = counter.get("packets").and_then(|p| p.as_u64());
        if let (Some(name), Some(packets)) = (name, packets) {
            out.insert(name.to_string(), packets);
        }
    }
    out
}

/// What the table counted since the last read, per counter: a counter only grows while it
/// lives, so a smaller count means a new counter and counts from zero.
#[derive(Debug, Default)]
pub struct Deltas {
    last: BTreeMap<String, u64>,
}

impl Deltas {
    pub fn take(&mut self, now: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let deltas = now
            .iter()
            .map(|(name, n)| {
                let before = self.last.get(name).copied().unwrap_or(0);
                (name.clone(), if *n >= before { n - before } else { *n })
            })
            .filter(|(_, d)| *d > 0)
            .collect();
        // Counters not listed this time are kept: a partial listing must not make the next
        // full one count them again from zero.
        self.last.extend(now);
        deltas
    }

    /// The table was replaced: its counters start from zero.
    pub fn reset(&mut self) {
        self.last.clear();
    }

    /// These counters were deleted: one of the same name later starts from zero.
    pub fn forget<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        for name in names {
            self.last.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = r#"{"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"counter": {"family": "inet", "name": "c_192_0_2_10_tcp_80", "table": "ferry",
                     "handle": 3, "packets": 7, "bytes": 420}},
        {"counter": {"family": "inet", "name": "c_192_0_2_11_udp_53", "table": "ferry",
                     "handle": 4, "packets": 3, "bytes": 180}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "fe_192_0_2_10_tcp_80",
                  "handle": 10, "expr": [{"counter": {"packets": 99, "bytes": 9000}}]}}
    ]}"#;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn only_named_counters_are_counted() {
        assert_eq!(
            named_counts(LISTED),
            counts(&[("c_192_0_2_10_tcp_80", 7), ("c_192_0_2_11_udp_53", 3)])
        );
        assert!(named_counts("not json").is_empty());
    }

    #[test]
    fn deltas_add_only_what_is_new_and_survive_a_replaced_table() {
        let mut d = Deltas::default();
        assert_eq!(d.take(counts(&[("a", 7)])), counts(&[("a", 7)]));
        assert_eq!(d.take(counts(&[("a", 10)])), counts(&[("a", 3)]));
        assert!(d.take(counts(&[("a", 10)])).is_empty());
        // A replaced table read without a reset: its smaller count is all new.
        assert_eq!(d.take(counts(&[("a", 2)])), counts(&[("a", 2)]));
        d.reset();
        assert_eq!(d.take(counts(&[("a", 4)])), counts(&[("a", 4)]));
        // A deleted counter, created again, counts from zero.
        d.forget([&"a".to_string()]);
        assert_eq!(d.take(counts(&[("a", 5)])), counts(&[("a", 5)]));
    }
}
