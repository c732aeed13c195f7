//! The kernel data plane: one nftables table, `inet ferry`, built whole at start (a single
//! `nft -f` transaction) and then changed in place, one transaction per change touching only
//! the frontends that differ (`changes`); a change nftables refuses replaces the table whole.
//!
//! A connection's first packet to a VIP port is *steered*: a NAT chain that binds nothing
//! (-150) looks the packet's `daddr . l4proto . dport` up in one verdict map (`dispatch4`,
//! `dispatch6`) and goes to that frontend's chain, which picks a backend NodePort (`numgen`
//! round robin, or ClientIP affinity) and rewrites the packet's destination to it. The kernel
//! runs a hook's NAT chains in order of priority until one binds the connection, and binds
//! one NAT per connection and hook: where the NodePort is the node's own and kube-proxy
//! implements NodePorts with DNAT (-100), kube-proxy's rule sees an ordinary NodePort
//! connection and takes it to a pod; where nothing did (another node's NodePort, or a process
//! listening on it), ferry's own NAT chain (-95) binds the connection to where it was
//! steered: one lookup per family in the verdict map `bind4`/`bind6` of `original VIP .
//! l4proto . backend port` goes to the chain that binds it (`masq4_tcp` marks it to
//! masquerade too, `bind4_tcp` does not). Either way conntrack's original tuple is the VIP's,
//! so replies leave from the VIP, and later packets follow the binding without entering any
//! of ferry's chains (a filter chain for steering ran for every packet crossing the node:
//! 0.53 µs of nftables per connection, ferry's or not, on 2026-12-04). A locally sent packet
//! is rerouted because its binding changes its destination. (DNAT to the node's own NodePort
//! before kube-proxy would take the only binding and reach a port nothing listens on.)
//!
//! A frontend whose backends share a NodePort, without affinity or source ranges (the usual
//! Service port), has no chain of its own: its `dispatch` element goes to the chain shared
//! by every frontend of its family, protocol and number of backends (`pick4_tcp_2`), which
//! takes its turn from the `picks4`/`picks6` map and its NodePort from `ports4`/`ports6`,
//! both keyed by the VIP port (with one backend there is no turn to take: its address is in
//! `one4`/`one6`, and no `numgen` counter shared by every CPU is written). So adding,
//! changing or removing such a frontend is a change of elements alone, and the table holds
//! a handful of chains however many frontends there are: nft lists every chain and named
//! object of the table before each transaction, so a
//! chain and a named counter per frontend made every change grow with the number of VIPs
//! (47.7 ms for one change among 4,000 frontends, against 19.6 ms with shared chains, on
//! 2026-12-04). Changes run on a libnftables context kept open (`nft::Session`), and the
//! frontends that differ are found by fingerprint: 3.8 ms (docs/results.md). Source ranges
//! and affinity give a frontend its own chain, `fe_<identity>`;
//! backends on differing ports, and affinity, add a chain per backend.
//! Affinity keeps a set of recent clients per backend whose elements expire after the
//! Service's timeout (refreshed by each new connection), so a returning client goes back to
//! its backend and a client quiet for longer is spread anew; changes leave the sets that stay
//! in place, and a whole replacement carries their clients over. Connections sent to another
//! node are masqueraded so replies come back through this one; with `externalTrafficPolicy:
//! Local` the backend is this node and the client's address is kept. Source ranges are
//! checked in the frontend's chain, for new connections only, as kube-proxy's nftables mode
//! does (`firewall-check`). Each frontend counts its new connections in its element of the
//! `seen4`/`seen6` set, whose elements carry counters (`counters`); the element outlives
//! changes to the frontend.
//!
//! A VIP is steered only while it is a local address of this node (`fib daddr type local`):
//! VIPs live on the interface for a bounded time that only a live forwarder renews
//! (`announce`), so the table of a forwarder that was killed stops acting with them.
//!
//! The ruleset is text for the `nft` tool, the interface kube-proxy's nftables mode uses too.
//! The rooms: `split` (which frontends nftables serves), `ruleset` (the whole table's text),
//! `changes` (one transaction from the table in place to the next); all three are pure and
//! carry most tests. This file runs them on the node (`Kernel`), and its tests have a kernel
//! in a network namespace of their own commit the text and carry traffic through it.

mod changes;
mod ruleset;
mod split;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use tracing::warn;

use crate::nft::{self, list};
use crate::plan::Frontend;

pub use changes::changes;
use changes::{delete_seen, differing_fingerprints, fingerprint, transaction};
use ruleset::element;
pub(crate) use ruleset::proto;
pub use ruleset::{
    AffinityClients, Identity, affinity_clients, by_identity, identity, ruleset, source_range_rule,
};
pub use split::{Forwarding, servable, split};

pub const TABLE: &str = "ferry";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot run nft: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    #[error("nft did not finish within {0:?}")]
    TimedOut(Duration),
}

/// `nft -j list table` of ferry's table (`None` when it cannot be read, e.g. before it exists).
async fn list_table() -> Option<String> {
    list(&["-j", "list", "table", "inet", TABLE]).await
}

/// `nft -j list set` of the `seen` set of each family in `families` (IPv4, IPv6): the
/// counted elements alone, without the chains and the other maps.
async fn list_seen(families: [bool; 2]) -> Vec<String> {
    let mut out = Vec::new();
    for (n, wanted) in [4, 6].iter().zip(families) {
        let set = format!("seen{n}");
        if wanted && let Some(listed) = list(&["-j", "list", "set", "inet", TABLE, &set]).await {
            out.push(listed);
        }
    }
    out
}

/// The most frontends a change may touch to run on the kept libnftables context.
const SESSION_FRONTENDS: usize = 64;

/// Programs the node's nftables.
#[derive(Debug, Default)]
pub struct Kernel {
    /// The frontends of the table in place, by identity; `None` until a whole table is in
    /// place (and after one could not be), when the next change replaces the table.
    in_place: Option<BTreeMap<Identity, Frontend>>,
    /// The fingerprint of each frontend in place, in the order of their identities.
    fingerprints: Vec<(Identity, u64)>,
    counted: crate::counters::Deltas,
    /// Services of frontends that are gone and whose counters are still in the table: read
    /// one last time and deleted at the next count, so removing a frontend does not wait for
    /// a listing.
    retired: BTreeMap<Identity, String>,
    /// Counts taken from a table before it was replaced, not yet reported.
    pending: Vec<(String, u64)>,
    /// Where the table's transactions run.
    session: nft::Session,
}

impl Kernel {
    /// Whether this node lets us program nftables: `nft` runs and accepts our table.
    pub async fn probe() -> Result<(), KernelError> {
        nft::run(&ruleset(&[], &AffinityClients::new())).await?;
        nft::run(&format!("delete table inet {TABLE}\n")).await
    }

    /// Makes the table serve `frontends`. Once a whole table is in place, a change touches
    /// only the frontends that differ, in one transaction (`changes`); where that fails, or
    /// cannot express the change, the table is replaced whole (`replace`).
    pub async fn apply(&mut self, frontends: &[Frontend]) -> Result<(), KernelError> {
        let wanted = by_identity(frontends);
        let owned = |wanted: BTreeMap<Identity, Cow<'_, Frontend>>| {
            wanted
                .into_iter()
                .map(|(k, f)| (k, f.into_owned()))
                .collect()
        };
        let Some(in_place) = &self.in_place else {
            return self.replace(owned(wanted)).await;
        };
        // The frontends that differ, by fingerprint: comparing the plan with the table in
        // place frontend by frontend reads thousands of records scattered over the heap
        // (4.5 ms for 4,000), their fingerprints a few pages.
        let fingerprints: Vec<(Identity, u64)> =
            wanted.iter().map(|(k, f)| (*k, fingerprint(f))).collect();
        let differ = differing_fingerprints(&self.fingerprints, &fingerprints);
        let Some(script) = transaction(in_place, &wanted, &differ) else {
            return self.replace(owned(wanted)).await;
        };
        if script.is_empty() {
            return Ok(());
        }
        // A change of a few frontends on the kept context; one of thousands (the first plan
        // after a start) through the program, so the forwarder does not keep the memory
        // libnftables took to parse it.
        let applied = if differ.len() <= SESSION_FRONTENDS {
            self.session.run(&script).await
        } else {
            nft::run(&script).await
        };
        if let Err(err) = applied {
            warn!(error = %err, "nftables refused a change to the table; replacing it whole");
            return self.replace(owned(wanted)).await;
        }
        // Only the frontends that differ change in the record too.
        self.fingerprints = fingerprints;
        let Some(in_place) = &mut self.in_place else {
            return Ok(());
        };
        for k in differ {
            match wanted.get(&k) {
                Some(f) => {
                    in_place.insert(k, f.clone().into_owned());
                    self.retired.remove(&k);
                }
                None => {
                    if let Some(gone) = in_place.remove(&k) {
                        self.retired.insert(k, gone.service);
                    }
                }
            }
        }
        Ok(())
    }

    /// Replaces the table with one for `wanted`. The recent clients of affinity sets the
    /// new table keeps are read from the old one and put back, so sticky clients do not
    /// start afresh (clients that arrive between the read and the replacement are not
    /// carried over); what the old table counted is read before it goes.
    async fn replace(&mut self, wanted: BTreeMap<Identity, Frontend>) -> Result<(), KernelError> {
        let frontends: Vec<Frontend> = wanted.values().cloned().collect();
        let script = ruleset(&frontends, &AffinityClients::new());
        let wants_clients = wanted.values().any(|f| f.affinity.is_some());
        let counting =
            self.in_place.as_ref().is_some_and(|p| !p.is_empty()) || !self.retired.is_empty();
        let listed = if wants_clients || counting {
            list_table().await
        } else {
            None
        };
        let kept = match &listed {
            Some(listed) if wants_clients => affinity_clients(listed),
            _ => AffinityClients::new(),
        };
        let counted = match &listed {
            Some(listed) => self.counts_in(listed),
            None => Vec::new(),
        };
        self.in_place = None;
        // The whole table through the program: a kept context would keep what it parsed
        // (tens of MiB for thousands of frontends).
        if kept.is_empty() {
            nft::run(&script).await?;
        } else {
            nft::run(&ruleset(&frontends, &kept)).await?;
        }
        self.fingerprints = wanted.iter().map(|(k, f)| (*k, fingerprint(f))).collect();
        self.in_place = Some(wanted);
        self.retired.clear();
        self.counted.reset();
        self.pending.extend(counted);
        Ok(())
    }

    /// New connections per Service (`namespace/name`) since the last call, as the table's
    /// steering counters have them (nothing when the table cannot be read). Counters of
    /// frontends removed since the last call are read this once, then deleted.
    pub async fn new_connections(&mut self) -> Vec<(String, u64)> {
        let mut out = std::mem::take(&mut self.pending);
        if self.in_place.as_ref().is_none_or(BTreeMap::is_empty) && self.retired.is_empty() {
            return out;
        }
        let frontends = self.in_place.iter().flat_map(BTreeMap::keys);
        let mut families = [false, false];
        for k in frontends.chain(self.retired.keys()) {
            if let Some(family) = families.get_mut(usize::from(k.0.is_ipv6())) {
                *family = true;
            }
        }
        for listed in list_seen(families).await {
            out.extend(self.counts_in(&listed));
        }
        let retired = std::mem::take(&mut self.retired);
        if !retired.is_empty() {
            if let Err(err) = self.session.run(&delete_seen(retired.keys())).await {
                warn!(error = %err, "removing the counts of removed frontends");
            }
            let gone: Vec<String> = retired.keys().map(element).collect();
            self.counted.forget(&gone);
        }
        out
    }

    /// What the table listed in `listed` counted since the last read, per Service.
    fn counts_in(&mut self, listed: &str) -> Vec<(String, u64)> {
        let deltas = self.counted.take(crate::counters::seen_counts(listed));
        if deltas.is_empty() {
            return Vec::new();
        }
        let services: BTreeMap<String, &String> = self
            .in_place
            .iter()
            .flat_map(|p| p.iter().map(|(k, f)| (k, &f.service)))
            .chain(self.retired.iter())
            .map(|(k, service)| (element(k), service))
            .collect();
        deltas
            .into_iter()
            .filter_map(|(name, n)| Some((services.get(&name)?.to_string(), n)))
            .collect()
    }

    /// Removes the table.
    pub async fn clear(&mut self) -> Result<(), KernelError> {
        self.in_place = None;
        self.retired.clear();
        self.session
            .run(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::Protocol;
    use ruleset::affinity_set;
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    use std::process::Stdio;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::process::Command;

    fn frontend(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend::for_test(vip, port, protocol, backends)
    }

    /// A network namespace of the test's own, removed when dropped; `None` where that
    /// cannot be made (not root, or no `ip`).
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Option<Netns> {
            let name = format!("ferry-kt-{tag}-{}", std::process::id());
            let made = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .ok()?;
            if !made.success() {
                eprintln!("skipped: cannot create a network namespace");
                return None;
            }
            Some(Netns(name))
        }

        async fn nft(&self, args: &[&str], script: &str) -> Result<String, String> {
            let mut child = Command::new("ip")
                .args(["netns", "exec", &self.0, "nft"])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(script.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }

        async fn apply(&self, script: &str) {
            if let Err(err) = self.nft(&["-f", "-"], script).await {
                panic!("{err}\n{script}");
            }
        }

        async fn listing(&self) -> String {
            self.nft(&["-j", "list", "table", "inet", TABLE], "")
                .await
                .unwrap()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }

    /// A table listing with what depends on the order objects were made in taken out:
    /// handles, and the order of objects and of set elements (rules keep their order in
    /// their chain).
    /// Without `clients`, the recent clients of affinity sets are taken out too; so are the
    /// elements of the `seen` sets in `retired`.
    fn normalised(json: &str, clients: bool, retired: &BTreeSet<Identity>) -> Vec<String> {
        let retired: Vec<String> = retired.iter().map(element).collect();
        let scrub_seen = |v: &mut serde_json::Value| {
            let Some(set) = v.get_mut("set") else { return };
            if !matches!(set["name"].as_str(), Some("seen4" | "seen6")) {
                return;
            }
            if let Some(serde_json::Value::Array(elems)) = set.get_mut("elem") {
                elems.retain(|e| {
                    let listed = serde_json::json!({"nftables": [
                        {"set": {"name": "seen4", "elem": [e]}}
                    ]});
                    let counted = crate::counters::seen_counts(&listed.to_string());
                    !counted.keys().any(|k| retired.contains(k))
                });
                if elems.is_empty() {
                    set.as_object_mut().map(|s| s.remove("elem"));
                }
            }
        };
        fn scrub(v: &mut serde_json::Value, clients: bool) {
            match v {
                serde_json::Value::Object(map) => {
                    map.remove("handle");
                    let affinity = map
                        .get("name")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| n.starts_with("aff_"));
                    if affinity && !clients {
                        map.remove("elem");
                    }
                    map.values_mut().for_each(|v| scrub(v, clients));
                    if let Some(serde_json::Value::Array(elems)) = map.get_mut("elem") {
                        elems.sort_by_key(|e| e.to_string());
                    }
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(|v| scrub(v, clients)),
                _ => {}
            }
        }
        let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
        if let Some(items) = value["nftables"].as_array_mut() {
            items.iter_mut().for_each(scrub_seen);
        }
        scrub(&mut value, clients);
        let mut out = Vec::new();
        let mut rules_in: BTreeMap<String, usize> = BTreeMap::new();
        for item in value["nftables"].as_array().unwrap() {
            if item.get("metainfo").is_some() {
                continue;
            }
            if let Some(rule) = item.get("rule") {
                let chain = rule["chain"].as_str().unwrap().to_string();
                let n = rules_in.entry(chain.clone()).or_default();
                out.push(format!("rule {chain} #{n}: {}", rule["expr"]));
                *n += 1;
            } else {
                out.push(item.to_string());
            }
        }
        out.sort();
        out
    }

    /// The whole ruleset, committed by the kernel in a network namespace of its own (`nft
    /// --check` stops before the kernel validates chain types), recent clients included and
    /// read back.
    #[tokio::test]
    async fn the_kernel_accepts_the_ruleset() {
        let Some(ns) = Netns::new("accept") else {
            return;
        };
        let mut sticky = frontend(
            "2001:db8::10",
            443,
            Protocol::Tcp,
            &["[2001:db8::1]:30443", "[2001:db8::2]:30443"],
        );
        sticky.affinity = Some(Duration::from_secs(10));
        sticky.source_ranges = vec!["2001:db8:1::/48".parse().unwrap()];
        let mut local = frontend("192.0.2.10", 53, Protocol::Udp, &["10.0.0.2:30053"]);
        local.local = true;
        let web = frontend(
            "192.0.2.11",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30080", "10.0.0.3:30081"],
        );
        let set = affinity_set(&sticky, &sticky.backends[1]);
        let client: IpAddr = "2001:db8:1::7".parse().unwrap();
        let kept = AffinityClients::from([(set.clone(), vec![(client, Duration::from_secs(8))])]);
        ns.apply(&ruleset(&[sticky, local, web], &kept)).await;
        let read = affinity_clients(&ns.listing().await);
        let back = read.get(&set).map(Vec::as_slice).unwrap_or_default();
        assert!(
            matches!(back, [(ip, left)] if *ip == client && left.as_secs() >= 6),
            "{read:?}"
        );
    }

    /// A sequence of changes applied one transaction each leaves exactly the table a whole
    /// build of the last plan makes, and an affinity set that stays keeps its clients.
    #[tokio::test]
    async fn changes_applied_one_by_one_leave_the_table_a_whole_build_makes() {
        let Some(ns) = Netns::new("steps") else {
            return;
        };
        let web = frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30080"],
        );
        let mut dns = frontend("192.0.2.11", 53, Protocol::Udp, &["10.0.0.1:30053"]);
        dns.local = true;
        let mut sticky = frontend(
            "2001:db8::10",
            443,
            Protocol::Tcp,
            &["[2001:db8::1]:30443", "[2001:db8::2]:30443"],
        );
        sticky.affinity = Some(Duration::from_secs(60));
        let start = vec![web.clone(), dns.clone(), sticky.clone()];

        let mut web_moved = web.clone();
        web_moved.backends = vec![
            "10.0.0.2:30080".parse().unwrap(),
            "10.0.0.3:30081".parse().unwrap(),
        ];
        let mut web_port = frontend("192.0.2.10", 8080, Protocol::Tcp, &["10.0.0.1:30088"]);
        web_port.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let mut sticky_grown = sticky.clone();
        sticky_grown
            .backends
            .push("[2001:db8::3]:30443".parse().unwrap());
        let mut web_swapped = web.clone();
        web_swapped.backends = vec![
            "10.0.0.2:30080".parse().unwrap(),
            "10.0.0.3:30080".parse().unwrap(),
        ];
        let mut web_single = web.clone();
        web_single.backends.truncate(1);
        let mut dns_cluster = dns.clone();
        dns_cluster.local = false;
        let plans: Vec<Vec<Frontend>> = vec![
            // A port added to a Service.
            vec![web.clone(), web_port.clone(), dns.clone(), sticky.clone()],
            // Backends changed (ports differ now), and a sticky Service gains a node.
            vec![
                web_moved.clone(),
                web_port.clone(),
                dns.clone(),
                sticky_grown.clone(),
            ],
            // Policy changed from Local to Cluster.
            vec![
                web_moved.clone(),
                web_port.clone(),
                dns_cluster.clone(),
                sticky_grown.clone(),
            ],
            // A Service removed.
            vec![web_moved.clone(), dns_cluster.clone(), sticky_grown.clone()],
            // Removed and added back; the sticky one back to two nodes.
            vec![web.clone(), web_port, dns_cluster, sticky.clone()],
            vec![],
            start.clone(),
            // The same number of nodes, others: only the turns of the round robin change.
            vec![web_swapped.clone(), dns.clone(), sticky.clone()],
            // A node leaves, and comes back: from turns to the one backend, and back.
            vec![web_single, dns.clone(), sticky.clone()],
            vec![web_swapped, dns, sticky],
        ];

        ns.apply(&ruleset(&start, &AffinityClients::new())).await;
        let client = "2001:db8:1::7";
        let set = affinity_set(&sticky_grown, &sticky_grown.backends[0]);
        ns.apply(&format!(
            "add element inet ferry {set} {{ {client} expires 50s }}\n"
        ))
        .await;
        let mut in_place = by_identity(&start);
        // The counted elements of removed frontends stay until the next count reads and
        // deletes them, here after every other step (so some are still there when their
        // frontend returns: steps 3 to 4 and 5 to 6).
        let mut retired: BTreeSet<Identity> = BTreeSet::new();
        for (step, plan) in plans.iter().enumerate() {
            let wanted = by_identity(plan);
            let script = changes(&in_place, &wanted).expect("expressible as a change");
            ns.apply(&script).await;
            retired.extend(in_place.keys().filter(|k| !wanted.contains_key(*k)));
            retired.retain(|k| !wanted.contains_key(k));
            let listed = ns.listing().await;
            let counted = crate::counters::seen_counts(&listed);
            for k in &retired {
                assert!(
                    counted.contains_key(&element(k)),
                    "step {step}: {k:?} counted until read"
                );
            }
            let incremental = normalised(&listed, false, &retired);
            if step % 2 == 0 && !retired.is_empty() {
                ns.apply(&delete_seen(&retired)).await;
                retired.clear();
            }

            let Some(whole) = Netns::new("whole") else {
                return;
            };
            whole.apply(&ruleset(plan, &AffinityClients::new())).await;
            // The recent clients of the affinity set are the only difference allowed.
            let expected = normalised(&whole.listing().await, false, &BTreeSet::new());
            let missing: Vec<&String> = expected
                .iter()
                .filter(|l| !incremental.contains(l))
                .collect();
            let extra: Vec<&String> = incremental
                .iter()
                .filter(|l| !expected.contains(l))
                .collect();
            assert!(
                incremental == expected,
                "step {step}: missing {missing:#?}\nextra {extra:#?}\n{script}"
            );
            if step < 4 {
                let kept = affinity_clients(&ns.listing().await);
                assert!(
                    kept.get(&set).is_some_and(|c| c.len() == 1),
                    "step {step}: {kept:?}\n{script}"
                );
            }
            in_place = wanted;
        }
        // Nothing changed, nothing to do.
        assert_eq!(changes(&in_place, &in_place.clone()), Some(String::new()));
    }

    /// Echoes lines on 30080, then for three seconds opens connections through the VIP
    /// 192.0.2.10:80 one after another and talks on one opened before; prints what worked.
    const TRAFFIC: &str = r#"
import socket, socketserver, threading, time
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
server = Server(("0.0.0.0", 30080), Echo)
threading.Thread(target=server.serve_forever, daemon=True).start()
def talk(s):
    s.sendall(b"x\n")
    return s.recv(2) == b"x\n"
held = socket.create_connection(("192.0.2.10", 80), timeout=1)
print("ready", flush=True)
ok = failed = held_ok = held_failed = 0
end = time.time() + 3
while time.time() < end:
    try:
        with socket.create_connection(("192.0.2.10", 80), timeout=1) as s:
            if talk(s): ok += 1
            else: failed += 1
    except OSError:
        failed += 1
    try:
        if talk(held): held_ok += 1
        else: held_failed += 1
    except OSError:
        held_failed += 1
print(f"ok={ok} failed={failed} held_ok={held_ok} held_failed={held_failed}", flush=True)
"#;

    /// Traffic to a Service that does not change keeps flowing, new connections and an
    /// established one alike, while another Service on the node changes again and again.
    #[tokio::test]
    async fn traffic_to_unchanged_services_flows_across_changes() {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let Some(ns) = Netns::new("traffic") else {
            return;
        };
        for args in [
            &["link", "set", "lo", "up"][..],
            &["address", "add", "192.0.2.10/32", "dev", "lo"],
            &["address", "add", "192.0.2.11/32", "dev", "lo"],
            &["address", "add", "10.250.0.1/32", "dev", "lo"],
            &["address", "add", "10.250.0.2/32", "dev", "lo"],
        ] {
            let done = std::process::Command::new("ip")
                .args(["-n", &ns.0])
                .args(args)
                .status()
                .unwrap();
            assert!(done.success(), "ip {args:?}");
        }
        let web = frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.250.0.1:30080", "10.250.0.2:30080"],
        );
        let other = frontend("192.0.2.11", 80, Protocol::Tcp, &["10.250.0.1:30081"]);
        let first = vec![web.clone(), other.clone()];
        ns.apply(&ruleset(&first, &AffinityClients::new())).await;

        let Ok(mut client) = Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c", TRAFFIC])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        else {
            eprintln!("skipped: no python3");
            return;
        };
        let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));

        let mut other_port = frontend("192.0.2.11", 81, Protocol::Tcp, &["10.250.0.1:30082"]);
        let mut moved = other.clone();
        moved.backends = vec!["10.250.0.2:30083".parse().unwrap()];
        let plans = [
            vec![web.clone(), other.clone(), other_port.clone()],
            vec![web.clone(), moved.clone(), other_port.clone()],
            vec![web.clone(), moved.clone()],
            vec![web.clone()],
            first.clone(),
        ];
        let mut in_place = by_identity(&first);
        let started = std::time::Instant::now();
        let mut applied = 0;
        while started.elapsed() < Duration::from_millis(2500) {
            for plan in &plans {
                let wanted = by_identity(plan);
                ns.apply(&changes(&in_place, &wanted).unwrap()).await;
                in_place = wanted;
                applied += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other_port.port += 1;
        }
        let report = lines.next_line().await.unwrap().unwrap_or_default();
        let figure = |name: &str| -> u64 {
            report
                .split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {report:?}"))
        };
        assert!(applied >= 20, "{applied} changes");
        assert_eq!(
            (figure("failed"), figure("held_failed")),
            (0, 0),
            "{report}"
        );
        assert!(figure("ok") > 100 && figure("held_ok") > 100, "{report}");
        // Every connection to the unchanged Service was counted once, in its element (the
        // held one and those opened one at a time), none of their later packets.
        let counted = crate::counters::seen_counts(&ns.listing().await);
        assert_eq!(
            counted.get("192.0.2.10 . tcp . 80").copied(),
            Some(1 + figure("ok") + figure("failed")),
            "{counted:?} {report}"
        );
    }
}
