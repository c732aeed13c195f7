//! New connections counted by the kernel data plane. Every frontend has an element in the
//! table's `seen4`/`seen6` set (`daddr . l4proto . dport`, in `kernel::ruleset`), a set whose
//! elements carry a counter; the steering chains, entered only by a connection's first packet,
//! look the packet up in it, so an element's packets are its frontend's new connections (new
//! flows for UDP) at no cost to established traffic. Elements outlive changes to their
//! frontends; only a whole new table starts them again, so the counts are read before a
//! replacement and at each resync, and only what is new since the last read is added to the
//! Prometheus counters.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Packets counted per element of the `seen4`/`seen6` sets in `nft -j list` output, by the
/// element as the table writes it (`192.0.2.10 . tcp . 80`).
pub fn seen_counts(json: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    let items = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let sets = items.iter().filter_map(|i| i.get("set")).filter(|s| {
        matches!(
            s.get("name").and_then(|n| n.as_str()),
            Some("seen4" | "seen6")
        )
    });
    for set in sets {
        let elements = set.get("elem").and_then(|e| e.as_array());
        for elem in elements.into_iter().flatten().filter_map(|e| e.get("elem")) {
            let packets = elem
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(|p| p.as_u64());
            if let (Some(key), Some(packets)) = (element(elem.get("val")), packets) {
                out.insert(key, packets);
            }
        }
    }
    out
}

/// `{"concat": [address, protocol, port]}` as the table writes the element.
fn element(val: Option<&serde_json::Value>) -> Option<String> {
    let parts = val?.get("concat")?.as_array()?;
    let [ip, proto, port] = parts.as_slice() else {
        return None;
    };
    let ip: IpAddr = ip.as_str()?.parse().ok()?;
    let port = match port {
        serde_json::Value::Number(n) => n.as_u64()?,
        other => other.as_str()?.parse().ok()?,
    };
    Some(format!("{ip} . {} . {port}", proto.as_str()?))
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
        {"set": {"family": "inet", "name": "seen4", "table": "ferry",
                 "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 3,
                 "elem": [{"elem": {"val": {"concat": ["192.0.2.10", "tcp", 80]},
                                    "counter": {"packets": 7, "bytes": 420}}},
                          {"elem": {"val": {"concat": ["192.0.2.11", "udp", 53]},
                                    "counter": {"packets": 3, "bytes": 180}}}],
                 "stmt": [{"counter": null}]}},
        {"set": {"family": "inet", "name": "seen6", "table": "ferry",
                 "type": ["ipv6_addr", "inet_proto", "inet_service"], "handle": 4,
                 "elem": [{"elem": {"val": {"concat": ["2001:db8:0::10", "tcp", "443"]},
                                    "counter": {"packets": 2, "bytes": 120}}}]}},
        {"set": {"family": "inet", "name": "bound4", "table": "ferry",
                 "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 5,
                 "elem": [{"elem": {"val": {"concat": ["192.0.2.12", "tcp", 80]},
                                    "counter": {"packets": 99, "bytes": 9000}}}]}},
        {"rule": {"family": "inet", "table": "ferry", "chain": "pick4_tcp_2",
                  "handle": 10, "expr": [{"counter": {"packets": 99, "bytes": 9000}}]}}
    ]}"#;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn only_the_elements_of_the_seen_sets_are_counted() {
        assert_eq!(
            seen_counts(LISTED),
            counts(&[
                ("192.0.2.10 . tcp . 80", 7),
                ("192.0.2.11 . udp . 53", 3),
                ("2001:db8::10 . tcp . 443", 2),
            ])
        );
        assert!(seen_counts("not json").is_empty());
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
