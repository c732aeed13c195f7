//! The kernel data plane: one nftables table, `inet ferry`, replaced atomically (a single
//! `nft -f` transaction) whenever the frontends change.
//!
//! A connection's first packet to a VIP port is *steered*: a filter chain after conntrack
//! (-150) picks a backend NodePort (`numgen` round robin, or ClientIP affinity) and rewrites
//! the packet's destination to it. NAT chains run next, and the kernel binds one NAT per
//! connection and hook: where the NodePort is the node's own and kube-proxy implements
//! NodePorts with DNAT (-100), kube-proxy's rule sees an ordinary NodePort connection and
//! takes it to a pod; where nothing did (another node's NodePort, or a process listening on
//! it), ferry's own NAT chain (-95) binds the connection to where it was steered. Either way
//! conntrack's original tuple is the VIP's, so replies leave from the VIP, and later packets
//! follow the binding without being looked at again. (DNAT to the node's own NodePort before
//! kube-proxy would take the only binding and reach a port nothing listens on.)
//!
//! ClientIP affinity keeps a set of recent clients per backend whose elements expire after the
//! Service's timeout (refreshed by each new connection), so a returning client goes back to its
//! backend and a client quiet for longer is spread anew. A set is named after its frontend and
//! backend, and when the table is replaced the recent clients of the sets that stay are read
//! from the old table and written into the new one. Connections sent to another node are
//! masqueraded so replies come back through this one; with `externalTrafficPolicy: Local` the
//! backend is this node and the client's address is kept. Source ranges are enforced before
//! steering.
//!
//! A VIP is steered only while it is a local address of this node (`fib daddr type local`):
//! VIPs live on the interface for a bounded time that only a live forwarder renews
//! (`announce`), so the table of a forwarder that was killed stops acting with them.
//!
//! The ruleset is text for the `nft` tool, the interface kube-proxy's nftables mode uses too;
//! `ruleset` is pure and carries the tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use ferry_model::Protocol;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::plan::Frontend;

pub const TABLE: &str = "ferry";
/// Clients remembered per backend for ClientIP affinity; past this, new clients are spread
/// without being remembered until old ones expire.
const AFFINITY_CLIENTS: usize = 65_536;
/// Marks connections to masquerade ("ferry" in ASCII).
const MASQUERADE_MARK: &str = "0x66657279";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot run nft: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    #[error("nft did not finish within {0:?}")]
    TimedOut(Duration),
}

/// How long one `nft` run may take: a hung `nft` must not freeze VIP handover.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);

fn family_words(ip: &IpAddr) -> (&'static str, bool) {
    match ip {
        IpAddr::V4(_) => ("ip", false),
        IpAddr::V6(_) => ("ip6", true),
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The frontends the kernel can serve: backends of the VIP's family only (NAT does not cross
/// families), and at least one of them.
pub fn servable(frontends: &[Frontend]) -> Vec<Frontend> {
    frontends
        .iter()
        .filter(|f| f.protocol != Protocol::Sctp)
        .map(|f| Frontend {
            backends: f
                .backends
                .iter()
                .copied()
                .filter(|b| b.is_ipv6() == f.vip.is_ipv6())
                .collect(),
            ..f.clone()
        })
        .filter(|f| !f.backends.is_empty())
        .collect()
}

/// Whether this node routes packets of each family on (`net.ipv4.ip_forward`,
/// `net.ipv6.conf.all.forwarding`): NAT to another node's NodePort needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarding {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Forwarding {
    /// Both families on.
    pub const ON: Forwarding = Forwarding {
        ipv4: true,
        ipv6: true,
    };

    /// The node's settings now (a family whose setting cannot be read counts as off).
    pub fn read() -> Forwarding {
        let on = |path: &str| std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1");
        Forwarding {
            ipv4: on("/proc/sys/net/ipv4/ip_forward"),
            ipv6: on("/proc/sys/net/ipv6/conf/all/forwarding"),
        }
    }

    fn of(&self, ip: &IpAddr) -> bool {
        if ip.is_ipv6() { self.ipv6 } else { self.ipv4 }
    }
}

/// Splits a kernel-mode node's frontends into those for nftables and those its userspace side
/// serves: the ones asking for PROXY protocol (a header the kernel cannot write), the ones
/// whose backends are all of the other family (an IPv6 VIP on nodes with IPv4 addresses only:
/// NAT cannot cross families, a relay can), and the ones with backends on other nodes while
/// the node does not forward their family (NAT would send them nowhere; a relay connects from
/// the node itself). `own` are the node's addresses. SCTP, which the userspace side does not
/// relay, always stays with nftables.
pub fn split(
    frontends: &[Frontend],
    forwarding: Forwarding,
    own: &[IpAddr],
) -> (Vec<Frontend>, Vec<Frontend>) {
    frontends.iter().cloned().partition(|f| {
        if f.protocol == Protocol::Sctp {
            return true;
        }
        let mut natted = f
            .backends
            .iter()
            .filter(|b| b.is_ipv6() == f.vip.is_ipv6())
            .peekable();
        if natted.peek().is_none() {
            return false;
        }
        let routed = !forwarding.of(&f.vip) && natted.any(|b| !own.contains(&b.ip()));
        !f.proxy_protocol && !routed
    })
}

/// The rule that drops what `f`'s `loadBalancerSourceRanges` do not admit (everything, when
/// none is of the VIP's family), or `None` when it admits everyone.
pub fn source_range_rule(f: &Frontend) -> Option<String> {
    if f.source_ranges.is_empty() {
        return None;
    }
    let (fam, _) = family_words(&f.vip);
    let ranges: Vec<String> = f
        .source_ranges
        .iter()
        .filter(|r| r.addr().is_ipv6() == f.vip.is_ipv6())
        .map(ToString::to_string)
        .collect();
    let allowed = if ranges.is_empty() {
        String::new()
    } else {
        format!(" {fam} saddr != {{ {} }}", ranges.join(", "))
    };
    Some(format!(
        "{fam} daddr {} {} dport {}{allowed} drop",
        f.vip,
        proto(f.protocol),
        f.port
    ))
}

/// Recent clients of affinity sets, by set name: each client's address and how long it has
/// left in the set.
pub type AffinityClients = BTreeMap<String, Vec<(IpAddr, Duration)>>;

/// The name of the set of recent clients of `backend` behind `f`: the same for as long as the
/// frontend and the backend exist, so its clients can be carried into a new table.
fn affinity_set(f: &Frontend, backend: &SocketAddr) -> String {
    let word = |s: String| s.replace('.', "_").replace(':', "x");
    format!(
        "aff_{}_{}_{}_{}_{}",
        word(f.vip.to_string()),
        proto(f.protocol),
        f.port,
        word(backend.ip().to_string()),
        backend.port()
    )
}

/// The recent clients in `nft -j list table` output, for the affinity sets in it.
pub fn affinity_clients(json: &str) -> AffinityClients {
    let mut clients = AffinityClients::new();
    let Ok(listing) = serde_json::from_str::<serde_json::Value>(json) else {
        return clients;
    };
    let objects = listing["nftables"].as_array().into_iter().flatten();
    for set in objects.filter_map(|o| o.get("set")) {
        let Some(name) = set["name"].as_str().filter(|n| n.starts_with("aff_")) else {
            continue;
        };
        let elements = set["elem"].as_array().into_iter().flatten();
        let kept: Vec<(IpAddr, Duration)> = elements
            .filter_map(|e| {
                let elem = &e["elem"];
                let ip = elem["val"].as_str()?.parse().ok()?;
                let left = elem["expires"].as_u64().filter(|s| *s > 0)?;
                Some((ip, Duration::from_secs(left)))
            })
            .collect();
        if !kept.is_empty() {
            clients.insert(name.to_string(), kept);
        }
    }
    clients
}

/// The whole `inet ferry` table for `frontends`, as one transaction that replaces the old
/// table (creating it first, so deleting never fails); `kept` are recent clients to put back
/// into affinity sets the new table has too.
pub fn ruleset(frontends: &[Frontend], kept: &AffinityClients) -> String {
    let frontends = servable(frontends);
    let mut admit = String::new();
    let mut dispatch = String::new();
    let mut complete = String::new();
    let mut sets = String::new();
    let mut chains = String::new();
    for (i, f) in frontends.iter().enumerate() {
        let (fam, _) = family_words(&f.vip);
        let p = proto(f.protocol);
        // Only while the VIP is this node's address: a forwarder killed before it could
        // remove this table stops forwarding when its VIPs' lifetimes run out.
        let _ = writeln!(
            dispatch,
            "\t\t{fam} daddr {} {p} dport {} fib daddr type local goto fe_{i}",
            f.vip, f.port
        );
        let _ = writeln!(
            complete,
            "\t\tmeta l4proto {p} ct original {fam} daddr {} ct original proto-dst {} goto nat_{i}",
            f.vip, f.port
        );
        if let Some(rule) = source_range_rule(f) {
            let _ = writeln!(admit, "\t\t{rule}");
        }

        // fe_i picks a backend for a new connection and be_i_j steers the packet there;
        // nat_i binds the connection to where it was steered, unless the node's own NodePort
        // implementation (kube-proxy) already took it.
        // Only first packets enter fe_i: its counter counts new connections (`counters`).
        let _ = writeln!(
            chains,
            "\tchain fe_{i} {{\n\t\tcomment \"{} {}/{}\"\n\t\tcounter",
            f.service,
            f.port,
            p.to_uppercase()
        );
        let mut steer = String::new();
        let mut nat = format!("\tchain nat_{i} {{\n");
        if !f.local {
            let _ = writeln!(nat, "\t\tmeta mark set {MASQUERADE_MARK}");
        }
        let affinity = f
            .affinity
            .filter(|_| f.backends.len() > 1)
            .map(|t| t.as_secs().max(1));
        let addr_type = if f.vip.is_ipv6() {
            "ipv6_addr"
        } else {
            "ipv4_addr"
        };
        for (j, b) in f.backends.iter().enumerate() {
            let _ = writeln!(steer, "\tchain be_{i}_{j} {{");
            if let Some(secs) = affinity {
                // As kube-proxy's nftables mode: a set of recent clients per backend, each
                // element living `timeout` past the client's last new connection. A known
                // client goes back to its backend; a new one is spread and remembered.
                let set = affinity_set(f, b);
                let _ = write!(
                    sets,
                    "\tset {set} {{\n\t\ttype {addr_type}\n\t\tflags dynamic,timeout\n\t\ttimeout {secs}s\n\t\tsize {AFFINITY_CLIENTS}\n"
                );
                let timeout = Duration::from_secs(secs);
                let elements: Vec<String> = kept
                    .get(&set)
                    .into_iter()
                    .flatten()
                    .filter(|(ip, _)| ip.is_ipv6() == f.vip.is_ipv6())
                    .map(|(ip, left)| format!("{ip} expires {}s", left.min(&timeout).as_secs()))
                    .collect();
                if !elements.is_empty() {
                    let _ = writeln!(sets, "\t\telements = {{ {} }}", elements.join(", "));
                }
                sets.push_str("\t}\n");
                let _ = writeln!(chains, "\t\t{fam} saddr @{set} goto be_{i}_{j}");
                let _ = writeln!(steer, "\t\tupdate @{set} {{ {fam} saddr }}");
            }
            let _ = writeln!(
                steer,
                "\t\t{fam} daddr set {} {p} dport set {}\n\t}}",
                b.ip(),
                b.port()
            );
            let to = match b {
                SocketAddr::V4(b) => b.to_string(),
                SocketAddr::V6(b) => format!("[{}]:{}", b.ip(), b.port()),
            };
            let _ = writeln!(
                nat,
                "\t\t{fam} daddr {} {p} dport {} dnat {fam} to {to}",
                b.ip(),
                b.port()
            );
        }
        match f.backends.len() {
            1 => {
                let _ = writeln!(chains, "\t\tgoto be_{i}_0");
            }
            n => {
                let vmap: Vec<String> = (0..n).map(|j| format!("{j} : goto be_{i}_{j}")).collect();
                let _ = writeln!(
                    chains,
                    "\t\tnumgen inc mod {n} vmap {{ {} }}",
                    vmap.join(", ")
                );
            }
        }
        let _ = writeln!(chains, "\t}}");
        chains.push_str(&steer);
        nat.push_str("\t}\n");
        chains.push_str(&nat);
    }

    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    // Steering rewrites only a connection's first packet (later ones follow the conntrack
    // entry's NAT); it runs after conntrack (-200) and before NAT (-100), so the NodePort it
    // aims at is seen by whatever implements NodePorts here. Source ranges come first, while
    // the destination is still the VIP.
    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority -150; policy accept;\n{admit}\t\tct state != new accept\n{dispatch}\t}}"
    );
    // Locally sent packets are rerouted after their destination changes (a route chain).
    let _ = writeln!(
        s,
        "\tchain output {{\n\t\ttype route hook output priority -150; policy accept;\n\t\tct state != new accept\n{dispatch}\t}}"
    );
    // After kube-proxy's DNAT (-100): only one NAT binding per connection and hook, so a
    // connection kube-proxy took to a pod never reaches these.
    for hook in ["prerouting", "output"] {
        let _ = writeln!(
            s,
            "\tchain nat_{hook} {{\n\t\ttype nat hook {hook} priority -95; policy accept;\n{complete}\t}}"
        );
    }
    let _ = writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority 105; policy accept;\n\t\tmeta mark {MASQUERADE_MARK} masquerade\n\t}}"
    );
    s.push_str(&sets);
    s.push_str(&chains);
    s.push_str("}\n");
    s
}

pub(crate) async fn nft(script: &str) -> Result<(), KernelError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    // On a timeout the child is dropped, which kills it.
    let out = tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| KernelError::TimedOut(NFT_TIMEOUT))??;
    if out.status.success() {
        Ok(())
    } else {
        Err(KernelError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// `nft -j list table` of ferry's table (`None` when it cannot be read, e.g. before it exists).
async fn list_table() -> Option<String> {
    let listed = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(NFT_TIMEOUT, listed).await {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        _ => None,
    }
}

/// Programs the node's nftables.
#[derive(Debug, Default)]
pub struct Kernel {
    applied: Option<String>,
    /// The frontends of the table in place, in their chains' order (`fe_<i>` is the i-th).
    in_place: Vec<Frontend>,
    counted: crate::counters::Deltas,
    /// Counts taken from a table before it was replaced, not yet reported.
    pending: Vec<(String, u64)>,
}

impl Kernel {
    /// Whether this node lets us program nftables: `nft` runs and accepts our table.
    pub async fn probe() -> Result<(), KernelError> {
        nft(&ruleset(&[], &AffinityClients::new())).await?;
        nft(&format!("delete table inet {TABLE}\n")).await
    }

    /// Replaces the table with one for `frontends` (nothing to do when unchanged). The recent
    /// clients of affinity sets the new table keeps are read from the old one and put back,
    /// so a change to any Service on this node does not make sticky clients start afresh
    /// (clients that arrive between the read and the replacement are not carried over).
    pub async fn apply(&mut self, frontends: &[Frontend]) -> Result<(), KernelError> {
        let script = ruleset(frontends, &AffinityClients::new());
        if self.applied.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        // One read of the old table: its recent affinity clients, and what it counted
        // before it goes.
        let wants_clients = script.contains("\tset aff_");
        let listed = if wants_clients || !self.in_place.is_empty() {
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
        if kept.is_empty() {
            nft(&script).await?;
        } else {
            nft(&ruleset(frontends, &kept)).await?;
        }
        self.applied = Some(script);
        self.in_place = servable(frontends);
        self.counted.reset();
        self.pending.extend(counted);
        Ok(())
    }

    /// New connections per Service (`namespace/name`) since the last call, as the table's
    /// steering counters have them (nothing when the table cannot be read).
    pub async fn new_connections(&mut self) -> Vec<(String, u64)> {
        let mut out = std::mem::take(&mut self.pending);
        if self.in_place.is_empty() {
            return out;
        }
        if let Some(listed) = list_table().await {
            out.extend(self.counts_in(&listed));
        }
        out
    }

    /// What the table listed in `listed` counted since the last read, per Service.
    fn counts_in(&mut self, listed: &str) -> Vec<(String, u64)> {
        let deltas = self.counted.take(crate::counters::chain_counts(listed));
        deltas
            .into_iter()
            .filter_map(|(i, n)| Some((self.in_place.get(i)?.service.clone(), n)))
            .collect()
    }

    /// Removes the table.
    pub async fn clear(&mut self) -> Result<(), KernelError> {
        self.applied = None;
        self.in_place.clear();
        nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frontend(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend::for_test(vip, port, protocol, backends)
    }

    #[test]
    fn new_connections_are_steered_round_robin_then_bound_with_masquerade() {
        let r = ruleset(
            &[frontend(
                "192.0.2.10",
                80,
                Protocol::Tcp,
                &["10.0.0.1:30080", "10.0.0.2:30080"],
            )],
            &AffinityClients::new(),
        );
        // Steering: after conntrack, before NAT, first packets only.
        assert!(
            r.contains("type filter hook prerouting priority -150; policy accept;\n\t\tct state != new accept\n\t\tip daddr 192.0.2.10 tcp dport 80 fib daddr type local goto fe_0"),
            "{r}"
        );
        assert!(
            r.contains("type route hook output priority -150; policy accept;\n\t\tct state != new accept\n\t\tip daddr 192.0.2.10 tcp dport 80 fib daddr type local goto fe_0"),
            "{r}"
        );
        assert!(r.contains("numgen inc mod 2 vmap { 0 : goto be_0_0, 1 : goto be_0_1 }"));
        assert!(r.contains("chain be_0_1 {\n\t\tip daddr set 10.0.0.2 tcp dport set 30080\n\t}"));
        // Binding, after kube-proxy's NAT, for connections steered from this VIP port.
        for hook in ["prerouting", "output"] {
            assert!(
                r.contains(&format!("chain nat_{hook} {{\n\t\ttype nat hook {hook} priority -95; policy accept;\n\t\tmeta l4proto tcp ct original ip daddr 192.0.2.10 ct original proto-dst 80 goto nat_0\n")),
                "{r}"
            );
        }
        assert!(
            r.contains("chain nat_0 {\n\t\tmeta mark set 0x66657279\n\t\tip daddr 10.0.0.1 tcp dport 30080 dnat ip to 10.0.0.1:30080\n\t\tip daddr 10.0.0.2 tcp dport 30080 dnat ip to 10.0.0.2:30080\n\t}"),
            "{r}"
        );
        assert!(r.contains("meta mark 0x66657279 masquerade"));
    }

    #[test]
    fn local_policy_keeps_the_source_and_affinity_remembers_clients_per_backend() {
        let mut local = frontend("192.0.2.10", 53, Protocol::Udp, &["10.0.0.2:30053"]);
        local.local = true;
        let mut sticky = frontend(
            "2001:db8::10",
            443,
            Protocol::Tcp,
            &[
                "[2001:db8::1]:30443",
                "[2001:db8::2]:30443",
                "10.0.0.3:30443",
            ],
        );
        sticky.affinity = Some(Duration::from_secs(60));
        let r = ruleset(&[local, sticky], &AffinityClients::new());
        let fe0 = &r[r.find("chain fe_0").unwrap()..r.find("chain fe_1").unwrap()];
        assert!(!fe0.contains("meta mark set"), "{fe0}");
        assert!(fe0.contains("goto be_0_0"), "{fe0}");
        assert!(fe0.contains("chain be_0_0 {\n\t\tip daddr set 10.0.0.2 udp dport set 30053\n"));
        assert!(fe0.contains(
            "chain nat_0 {\n\t\tip daddr 10.0.0.2 udp dport 30053 dnat ip to 10.0.0.2:30053\n"
        ));
        // The IPv4 backend cannot serve an IPv6 VIP in the kernel: two backends, each with
        // its set of recent clients expiring after the Service's timeout.
        let fe1 = &r[r.find("chain fe_1").unwrap()..];
        // Set names follow the frontend and backend, not their places in the plan.
        let set_0 = "aff_2001xdb8xx10_tcp_443_2001xdb8xx1_30443";
        let set_1 = "aff_2001xdb8xx10_tcp_443_2001xdb8xx2_30443";
        assert!(
            fe1.contains(&format!("ip6 saddr @{set_0} goto be_1_0")),
            "{r}"
        );
        assert!(
            fe1.contains(&format!("ip6 saddr @{set_1} goto be_1_1")),
            "{r}"
        );
        assert!(!fe1.contains("10_0_0_3"), "{r}");
        assert!(
            fe1.contains("numgen inc mod 2 vmap { 0 : goto be_1_0, 1 : goto be_1_1 }"),
            "{r}"
        );
        assert!(
            r.contains(&format!(
                "set {set_1} {{\n\t\ttype ipv6_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 60s\n"
            )),
            "{r}"
        );
        assert!(r.contains(&format!(
            "chain be_1_1 {{\n\t\tupdate @{set_1} {{ ip6 saddr }}\n\t\tip6 daddr set 2001:db8::2 tcp dport set 30443\n"
        )), "{r}");
        assert!(
            r.contains("ip6 daddr 2001:db8::2 tcp dport 30443 dnat ip6 to [2001:db8::2]:30443\n"),
            "{r}"
        );
    }

    #[test]
    fn recent_clients_are_read_back_and_put_into_the_new_table() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "aff_192_0_2_10_tcp_80_10_0_0_1_30080",
              "table": "ferry", "type": "ipv4_addr", "timeout": 60,
              "elem": [{"elem": {"val": "198.51.100.7", "expires": 30}},
                       {"elem": {"val": "198.51.100.8", "expires": 0}}]}},
            {"set": {"family": "inet", "name": "other", "table": "ferry", "type": "ipv4_addr"}},
            {"chain": {"family": "inet", "table": "ferry", "name": "fe_0"}}]}"#;
        let kept = affinity_clients(json);
        assert_eq!(
            kept,
            AffinityClients::from([(
                "aff_192_0_2_10_tcp_80_10_0_0_1_30080".to_string(),
                vec![("198.51.100.7".parse().unwrap(), Duration::from_secs(30))]
            )])
        );
        assert!(affinity_clients("not json").is_empty());

        let mut sticky = frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30080"],
        );
        sticky.affinity = Some(Duration::from_secs(20));
        let r = ruleset(&[sticky], &kept);
        // Put back, never past the Service's (perhaps shortened) timeout.
        assert!(
            r.contains("set aff_192_0_2_10_tcp_80_10_0_0_1_30080 {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 20s\n\t\tsize 65536\n\t\telements = { 198.51.100.7 expires 20s }\n\t}"),
            "{r}"
        );
        assert_eq!(r.matches("elements").count(), 1, "{r}");
    }

    /// Runs `script` with `nft -f` in a network namespace of its own, then lists the table
    /// there as JSON; `None` where that cannot run (not root, or no nft).
    async fn in_private_netns(script: &str) -> Option<String> {
        let mut child = Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                "nft -f - && nft -j list table inet ferry",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        child
            .stdin
            .take()?
            .write_all(script.as_bytes())
            .await
            .ok()?;
        let out = child.wait_with_output().await.ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.starts_with("unshare:") || stderr.contains("not found") {
            eprintln!("skipped: {stderr}");
            return None;
        }
        assert!(out.status.success(), "{stderr}\n{script}");
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The whole ruleset, committed by the kernel in a network namespace of its own (`nft
    /// --check` stops before the kernel validates chain types), recent clients included and
    /// read back.
    #[tokio::test]
    async fn the_kernel_accepts_the_ruleset() {
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
            &["10.0.0.1:30080", "10.0.0.2:30080", "10.0.0.3:30080"],
        );
        let set = affinity_set(&sticky, &sticky.backends[1]);
        let client: IpAddr = "2001:db8:1::7".parse().unwrap();
        let kept = AffinityClients::from([(set.clone(), vec![(client, Duration::from_secs(8))])]);
        let script = ruleset(&[sticky, local, web], &kept);
        let Some(listing) = in_private_netns(&script).await else {
            return;
        };
        let read = affinity_clients(&listing);
        let back = read.get(&set).map(Vec::as_slice).unwrap_or_default();
        assert!(
            matches!(back, [(ip, left)] if *ip == client && left.as_secs() >= 6),
            "{read:?}"
        );
    }

    #[test]
    fn source_ranges_drop_everyone_else() {
        let mut f = frontend("192.0.2.10", 80, Protocol::Tcp, &["10.0.0.1:30080"]);
        f.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let r = ruleset(&[f], &AffinityClients::new());
        assert!(
            r.contains("ip daddr 192.0.2.10 tcp dport 80 ip saddr != { 198.51.100.0/24 } drop"),
            "{r}"
        );
    }

    #[test]
    fn what_the_kernel_cannot_serve_goes_to_the_userspace_side() {
        let plain = frontend("192.0.2.10", 80, Protocol::Tcp, &["10.0.0.1:30080"]);
        let mut proxied = frontend("192.0.2.10", 443, Protocol::Tcp, &["10.0.0.1:30443"]);
        proxied.proxy_protocol = true;
        let across = frontend("2001:db8::10", 80, Protocol::Tcp, &["10.0.0.1:30080"]);
        let mixed = frontend(
            "2001:db8::11",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "[2001:db8::1]:30080"],
        );
        let (kernel, userspace) = split(&[plain, proxied, across, mixed], Forwarding::ON, &[]);
        assert_eq!(ports(&kernel), ["192.0.2.10:80", "2001:db8::11:80"]);
        assert_eq!(ports(&userspace), ["192.0.2.10:443", "2001:db8::10:80"]);
    }

    fn ports(v: &[Frontend]) -> Vec<String> {
        v.iter().map(|f| format!("{}:{}", f.vip, f.port)).collect()
    }

    #[test]
    fn without_forwarding_only_vips_served_by_the_node_itself_stay_in_the_kernel() {
        let own: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let spread = frontend(
            "2001:db8::10",
            80,
            Protocol::Tcp,
            &["[2001:db8::1]:30080", "[2001:db8::2]:30080"],
        );
        let mut local = frontend("2001:db8::11", 80, Protocol::Tcp, &["[2001:db8::1]:30081"]);
        local.local = true;
        let v4 = frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30080"],
        );
        let sctp = frontend("2001:db8::12", 80, Protocol::Sctp, &["[2001:db8::2]:30082"]);
        let all = [spread, local, v4, sctp];

        let no_ipv6 = Forwarding {
            ipv4: true,
            ipv6: false,
        };
        let (kernel, userspace) = split(&all, no_ipv6, &own);
        assert_eq!(
            ports(&kernel),
            ["2001:db8::11:80", "192.0.2.10:80", "2001:db8::12:80"]
        );
        assert_eq!(ports(&userspace), ["2001:db8::10:80"]);

        let no_ipv4 = Forwarding {
            ipv4: false,
            ipv6: true,
        };
        let (_, userspace) = split(&all, no_ipv4, &own);
        assert_eq!(ports(&userspace), ["192.0.2.10:80"]);
    }

    #[test]
    fn an_empty_plan_leaves_an_empty_table() {
        let r = ruleset(&[], &AffinityClients::new());
        assert!(r.starts_with("table inet ferry\ndelete table inet ferry\n"));
        assert!(!r.contains("goto"));
    }
}
