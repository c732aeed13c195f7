//! New connections counted by the kernel data plane. Each frontend's steering chain
//! (`fe_<i>` in `kernel::ruleset`) starts with a `counter`, and the chain is entered only by a
//! connection's first packet, so its packet count is the frontend's new connections (new
//! flows for UDP) at no cost to established traffic. The table is replaced on every change,
//! which starts its counters again: the counts are read before each replacement and at each
//! resync, and only what is new since the last read is added to the Prometheus counters.

use std::collections::BTreeMap;

/// Packets counted per steering chain index in `nft -j list table` output.
pub fn chain_counts(json: &str) -> BTreeMap<usize, u64> {
    let mut out = BTreeMap::new();
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    let items = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for rule in items.iter().filter_map(|i| i.get("rule")) {
        let Some(index) = rule
            .get("chain")
            .and_then(|c| c.as_str())
            .and_then(|c| c.strip_prefix("fe_"))
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        let packets = rule
            .get("expr")
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
            .next();
        if let Some(packets) = packets {
            *out.entry(index).or_default() += packets;
        }
    }
    out
}

/// What the table counted since the last read, per chain index: the table's counters
/// only grow while it lives, so a smaller count means a new table and counts from zero.
#[derive(Debug, Default)]
pub struct Deltas {
    last: BTreeMap<usize, u64>,
}

impl Deltas {
    pub fn take(&mut self, now: BTreeMap<usize, u64>) -> BTreeMap<usize, u64> {
        let deltas = now
            .iter()
            .map(|(i, n)| {
                let before = self.last.get(i).copied().unwrap_or(0);
                (*i, if *n >= before { n - before } else { *n })
            })
            .filter(|(_, d)| *d > 0)
            .collect();
        self.last = now;
        deltas
    }

    /// The table was replaced: its counters start from zero.
    pub fn reset(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = r#"{"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "ferry", "handle": 1}},
        {"chain": {"family": "inet", "table": "ferry", "name": "fe_0", "handle": 5}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "prerouting", "handle": 9,
                  "expr": [{"counter": {"packets": 99, "bytes": 9000}}]}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "fe_0", "handle": 10,
                  "expr": [{"counter": {"packets": 7, "bytes": 420}}]}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "fe_0", "handle": 11,
                  "expr": [{"vmap": {}}]}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "fe_12", "handle": 12,
                  "expr": [{"counter": {"packets": 3, "bytes": 180}}]}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "be_0_1", "handle": 13,
                  "expr": [{"counter": {"packets": 5, "bytes": 1}}]}}
    ]}"#;

    #[test]
    fn only_steering_chains_are_counted() {
        assert_eq!(chain_counts(LISTED), BTreeMap::from([(0, 7), (12, 3)]));
        assert!(chain_counts("not json").is_empty());
    }

    #[test]
    fn deltas_add_only_what_is_new_and_survive_a_replaced_table() {
        let mut d = Deltas::default();
        assert_eq!(d.take(BTreeMap::from([(0, 7)])), BTreeMap::from([(0, 7)]));
        assert_eq!(d.take(BTreeMap::from([(0, 10)])), BTreeMap::from([(0, 3)]));
        assert!(d.take(BTreeMap::from([(0, 10)])).is_empty());
        // A replaced table read without a reset: its smaller count is all new.
        assert_eq!(d.take(BTreeMap::from([(0, 2)])), BTreeMap::from([(0, 2)]));
        d.reset();
        assert_eq!(d.take(BTreeMap::from([(0, 4)])), BTreeMap::from([(0, 4)]));
    }
}
