//! The kernel data plane: one nftables table, `inet ferry`, built whole at start (a single
//! `nft -f` transaction) and then changed in place, one transaction per change touching only
//! the frontends that differ (`changes`); a change nftables refuses replaces the table whole.
//!
//! A connection's first packet to a VIP port is *steered*: a filter chain after conntrack
//! (-150) looks the packet's `daddr . l4proto . dport` up in one verdict map (`dispatch4`,
//! `dispatch6`) and goes to that frontend's chain, which picks a backend NodePort (`numgen`
//! round robin, or ClientIP affinity) and rewrites the packet's destination to it. NAT chains
//! run next, and the kernel binds one NAT per connection and hook: where the NodePort is the
//! node's own and kube-proxy implements NodePorts with DNAT (-100), kube-proxy's rule sees an
//! ordinary NodePort connection and takes it to a pod; where nothing did (another node's
//! NodePort, or a process listening on it), ferry's own NAT chain (-95) binds the connection
//! to where it was steered (one rule per family, matching the set `bound4`/`bound6` of
//! `original VIP . l4proto . backend port`; `masquerade4`/`masquerade6` mark those to
//! masquerade). Either way conntrack's original tuple is the VIP's, so replies leave from the
//! VIP, and later packets follow the binding without being looked at again. (DNAT to the
//! node's own NodePort before kube-proxy would take the only binding and reach a port nothing
//! listens on.)
//!
//! A frontend whose backends share a NodePort, without affinity or source ranges (the usual
//! Service port), has no chain of its own: its `dispatch` element goes to the chain shared
//! by every frontend of its family, protocol and number of backends (`pick4_tcp_2`), which
//! takes its turn from the `picks4`/`picks6` map and its NodePort from `ports4`/`ports6`,
//! both keyed by the VIP port. So adding, changing or removing such a frontend is a change
//! of elements alone, and the table holds a handful of chains however many frontends there
//! are: nft lists every chain and named object of the table before each transaction, so a
//! chain and a named counter per frontend made every change grow with the number of VIPs
//! (47.7 ms for one change among 4,000 frontends, against 19.6 ms with shared chains, on
//! 2026-12-04). Changes run on a libnftables context kept open (`nft::Session`), and the
//! frontends that differ are found by fingerprint: 3.8 ms (docs/results.md). Source ranges and affinity give a frontend its own chain, `fe_<identity>`;
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
//! The ruleset is text for the `nft` tool, the interface kube-proxy's nftables mode uses too;
//! `ruleset` and `changes` are pure and carry the tests.

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash as _, Hasher as _};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_model::Protocol;
use tracing::warn;

use crate::nft::{self, list};
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

/// `f` as the kernel can serve it: backends of the VIP's family only (NAT does not cross
/// families), and at least one of them; `None` when it cannot. Borrowed when it can serve
/// `f` as it is (so a plan of thousands of frontends is not copied for every change).
fn servable_one(f: &Frontend) -> Option<Cow<'_, Frontend>> {
    if f.protocol == Protocol::Sctp {
        return None;
    }
    let of_family = |b: &SocketAddr| b.is_ipv6() == f.vip.is_ipv6();
    if !f.backends.is_empty() && f.backends.iter().all(of_family) {
        return Some(Cow::Borrowed(f));
    }
    let backends: Vec<SocketAddr> = f.backends.iter().copied().filter(of_family).collect();
    if backends.is_empty() {
        return None;
    }
    Some(Cow::Owned(Frontend {
        backends,
        service: f.service.clone(),
        source_ranges: f.source_ranges.clone(),
        ..*f
    }))
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

/// A frontend's name in the table, from what identifies it (VIP, protocol, port) and never
/// from its place in the plan: its chains, counter and affinity sets keep their names for as
/// long as the frontend exists, so a change to another frontend leaves them alone.
pub fn identity(f: &Frontend) -> String {
    name(&key(f))
}

/// What identifies a frontend in the table: its VIP, protocol and port.
pub type Identity = (IpAddr, Protocol, u16);

fn key(f: &Frontend) -> Identity {
    (f.vip, f.protocol, f.port)
}

/// The name of the frontend `(vip, protocol, port)` in the table's object names.
fn name((vip, protocol, port): &Identity) -> String {
    format!("{}_{}_{port}", word(&vip.to_string()), proto(*protocol))
}

/// An address as a part of an nftables name (letters, digits and `_`).
fn word(s: &str) -> String {
    s.replace('.', "_").replace(':', "x")
}

/// The name of the set of recent clients of `backend` behind `f`: the same for as long as the
/// frontend and the backend exist, so its clients stay when the frontend changes otherwise.
fn affinity_set(f: &Frontend, backend: &SocketAddr) -> String {
    format!(
        "aff_{}_{}_{}",
        identity(f),
        word(&backend.ip().to_string()),
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

/// What the table holds for one frontend: its element in the dispatch map and what it leads
/// to (a shared pick chain, or chains of its own: the steering chain `fe_<identity>` first,
/// then one per backend where a backend needs its own), its affinity sets, and its elements
/// in the table-wide maps and sets.
#[derive(Debug, PartialEq)]
struct Objects {
    ident: String,
    v6: bool,
    /// `daddr . l4proto . dport` of the VIP port, the key in the `dispatch`, `ports` and
    /// `seen` maps and sets.
    dispatch: String,
    /// The verdict of its `dispatch` element.
    target: String,
    /// The shared chain that steers it, for a frontend without chains of its own.
    shape: Option<Shape>,
    /// `(name, rules)`, one rule a line.
    chains: Vec<(String, String)>,
    /// `(name, declaration)`.
    sets: Vec<(String, String)>,
    /// `(key, backend address)` in the `picks` map: the backend of each round-robin turn.
    picks: Vec<(String, String)>,
    /// `(key, NodePort)` in the `ports` map, for a frontend steered by a shared chain.
    ports: Vec<(String, String)>,
}

/// A shared pick chain: family (IPv6 or not), protocol and number of backends. Every
/// frontend whose backends share one port, without affinity or source ranges (the usual
/// Service), is steered by the chain of its shape, its backends and port coming from the
/// `picks` and `ports` maps: a change to it is a change of elements, and the table holds a
/// handful of chains however many frontends there are.
type Shape = (bool, &'static str, usize);

fn shape_chain((v6, p, n): &Shape) -> String {
    format!("pick{}_{p}_{n}", if *v6 { 6 } else { 4 })
}

/// The rules of the shared chain for `shape`.
fn shape_rules(shape: &Shape) -> String {
    let (v6, p, n) = *shape;
    let (fam, n4) = if v6 { ("ip6", 6) } else { ("ip", 4) };
    // The destination first, picked by the original port; then the port, looked up by the
    // original VIP (conntrack's original tuple, as the address has changed by then).
    format!(
        "fib daddr type != local return\n\
         {fam} daddr . meta l4proto . th dport @seen{n4}\n\
         {fam} daddr set {fam} daddr . meta l4proto . th dport . numgen inc mod {n} map @picks{n4} \
         {p} dport set ct original {fam} daddr . meta l4proto . th dport map @ports{n4}\n"
    )
}

/// The key of a connection's NAT binding: its original VIP, protocol and the port steering
/// sent it to (what the NAT chains can match; `ct original proto-dst` cannot be part of a
/// concatenation in nft 1.0).
type Binding = (IpAddr, &'static str, u16);

/// The frontend `(vip, protocol, port)` as an element of the table's maps and sets.
fn element((vip, protocol, port): &Identity) -> String {
    format!("{vip} . {} . {port}", proto(*protocol))
}

fn objects(f: &Frontend) -> Objects {
    let ident = identity(f);
    let (fam, v6) = family_words(&f.vip);
    let p = proto(f.protocol);
    let fe = format!("fe_{ident}");
    let dispatch = format!("{} . {p} . {}", f.vip, f.port);
    let affinity = f
        .affinity
        .filter(|_| f.backends.len() > 1)
        .map(|t| t.as_secs().max(1));
    let shared_port = f
        .backends
        .first()
        .map(SocketAddr::port)
        .filter(|port| f.backends.iter().all(|b| b.port() == *port));
    let n = if v6 { 6 } else { 4 };
    // The usual frontend: no chain of its own, only elements.
    if let (Some(shape), Some(port)) = (shape(f), shared_port) {
        return Objects {
            ident,
            v6,
            target: format!("goto {}", shape_chain(&shape)),
            shape: Some(shape),
            chains: Vec::new(),
            sets: Vec::new(),
            picks: f
                .backends
                .iter()
                .enumerate()
                .map(|(j, b)| (format!("{dispatch} . {j}"), b.ip().to_string()))
                .collect(),
            ports: vec![(dispatch.clone(), port.to_string())],
            dispatch,
        };
    }
    // Only while the VIP is this node's address: a forwarder killed before it could remove
    // this table stops forwarding when its VIPs' lifetimes run out.
    let mut steer = String::from("fib daddr type != local return\n");
    // As kube-proxy's nftables mode (`firewall-check`, entered for new connections only):
    // source ranges decide whether a connection starts, not what an admitted one carries.
    if let Some(rule) = admission(f) {
        let _ = writeln!(steer, "{rule}");
    }
    // Only first packets enter here: the element counts admitted new connections
    // (`counters`).
    let _ = writeln!(steer, "{fam} daddr . meta l4proto . th dport @seen{n}");
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    let mut picks = Vec::new();
    match (affinity, shared_port) {
        // Source ranges on backends sharing their port: one statement picks the node and no
        // chain per backend is needed.
        (None, Some(port)) => {
            // The turns live in one map shared by all frontends rather than in an anonymous
            // map per rule: nft reads every set of the table (anonymous ones with their
            // elements) before each transaction, so 4,000 of them would make every change
            // slow; a named map's elements it does not read.
            let to = match f.backends.as_slice() {
                [one] => one.ip().to_string(),
                all => {
                    picks.extend(all.iter().enumerate().map(|(j, b)| {
                        (
                            format!("{} . {p} . {} . {j}", f.vip, f.port),
                            b.ip().to_string(),
                        )
                    }));
                    format!(
                        "{fam} daddr . meta l4proto . th dport . numgen inc mod {} map @picks{n}",
                        all.len()
                    )
                }
            };
            let _ = writeln!(steer, "{fam} daddr set {to} {p} dport set {port}");
        }
        _ => {
            let addr_type = if v6 { "ipv6_addr" } else { "ipv4_addr" };
            let mut picks = Vec::new();
            for (j, b) in f.backends.iter().enumerate() {
                let be = format!("be_{ident}_{j}");
                let mut rules = String::new();
                if let Some(secs) = affinity {
                    // As kube-proxy's nftables mode: a set of recent clients per backend,
                    // each element living `timeout` past the client's last new connection.
                    // A known client goes back to its backend; a new one is spread and
                    // remembered.
                    let set = affinity_set(f, b);
                    sets.push((
                        set.clone(),
                        format!(
                            "type {addr_type}; flags dynamic,timeout; timeout {secs}s; size {AFFINITY_CLIENTS};"
                        ),
                    ));
                    let _ = writeln!(steer, "{fam} saddr @{set} goto {be}");
                    let _ = writeln!(rules, "update @{set} {{ {fam} saddr }}");
                }
                let _ = writeln!(
                    rules,
                    "{fam} daddr set {} {p} dport set {}",
                    b.ip(),
                    b.port()
                );
                picks.push(format!("{j} : goto {be}"));
                chains.push((be, rules));
            }
            match picks.as_slice() {
                [_] => {
                    let _ = writeln!(steer, "goto be_{ident}_0");
                }
                _ => {
                    let _ = writeln!(
                        steer,
                        "numgen inc mod {} vmap {{ {} }}",
                        picks.len(),
                        picks.join(", ")
                    );
                }
            }
        }
    }
    chains.insert(0, (fe.clone(), steer));
    Objects {
        dispatch,
        target: format!("goto {fe}"),
        shape: None,
        ident,
        v6,
        chains,
        sets,
        picks,
        ports: Vec::new(),
    }
}

/// The rule in a steering chain that drops new connections `f`'s `loadBalancerSourceRanges`
/// do not admit (all of them, when none is of the VIP's family), or `None` when it admits
/// everyone.
fn admission(f: &Frontend) -> Option<String> {
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
    Some(if ranges.is_empty() {
        "drop".to_string()
    } else {
        format!("{fam} saddr != {{ {} }} drop", ranges.join(", "))
    })
}

/// The NAT bindings of `frontends`: every connection steered from a VIP port to one of its
/// backend ports, and those of them to masquerade (all but `externalTrafficPolicy: Local`).
fn bindings<'a>(
    frontends: impl IntoIterator<Item = &'a Frontend>,
) -> (BTreeSet<Binding>, BTreeSet<Binding>) {
    let mut bound = BTreeSet::new();
    let mut masqueraded = BTreeSet::new();
    for f in frontends {
        for b in &f.backends {
            let key = (f.vip, proto(f.protocol), b.port());
            bound.insert(key);
            if !f.local {
                masqueraded.insert(key);
            }
        }
    }
    (bound, masqueraded)
}

fn binding_element((vip, p, port): &Binding) -> String {
    format!("{vip} . {p} . {port}")
}

/// The servable frontends of a plan by identity (the first of any two with one identity).
pub fn by_identity(frontends: &[Frontend]) -> BTreeMap<Identity, Cow<'_, Frontend>> {
    let mut out = BTreeMap::new();
    for f in frontends {
        if let std::collections::btree_map::Entry::Vacant(at) = out.entry(key(f))
            && let Some(f) = servable_one(f)
        {
            at.insert(f);
        }
    }
    out
}

/// The table's fixed part: the dispatch maps, the binding sets and the base chains.
fn skeleton() -> String {
    let mut s = String::new();
    for (n, addr) in [(4, "ipv4_addr"), (6, "ipv6_addr")] {
        let _ = writeln!(
            s,
            "\tmap dispatch{n} {{\n\t\ttype {addr} . inet_proto . inet_service : verdict\n\t}}"
        );
        let fam = if n == 4 { "ip" } else { "ip6" };
        let _ = writeln!(
            s,
            "\tmap picks{n} {{\n\t\ttypeof {fam} daddr . meta l4proto . th dport . numgen inc mod 2 : {fam} daddr\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tmap ports{n} {{\n\t\ttype {addr} . inet_proto . inet_service : inet_service\n\t}}"
        );
        for set in ["bound", "masquerade"] {
            let _ = writeln!(
                s,
                "\tset {set}{n} {{\n\t\ttype {addr} . inet_proto . inet_service\n\t}}"
            );
        }
        // Each frontend's new connections, counted by its element: elements are not read
        // before a change, as named counters are (nft lists every object first).
        let _ = writeln!(
            s,
            "\tset seen{n} {{\n\t\ttype {addr} . inet_proto . inet_service\n\t\tcounter\n\t}}"
        );
    }
    // Steering rewrites only a connection's first packet (later ones follow the conntrack
    // entry's NAT); it runs after conntrack (-200) and before NAT (-100), so the NodePort it
    // aims at is seen by whatever implements NodePorts here. One lookup per family finds the
    // frontend's chain.
    let dispatch = "\t\tct state != new accept\n\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n\t\tip6 daddr . meta l4proto . th dport vmap @dispatch6\n";
    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority -150; policy accept;\n{dispatch}\t}}"
    );
    // Locally sent packets are rerouted after their destination changes (a route chain).
    let _ = writeln!(
        s,
        "\tchain output {{\n\t\ttype route hook output priority -150; policy accept;\n{dispatch}\t}}"
    );
    // After kube-proxy's DNAT (-100): only one NAT binding per connection and hook, so a
    // connection kube-proxy took to a pod never reaches these. The others are bound to
    // where steering sent them (the packet's destination now).
    let mut complete = String::new();
    for (n, fam) in [(4, "ip"), (6, "ip6")] {
        let key = format!("ct original {fam} daddr . meta l4proto . th dport");
        let _ = writeln!(
            complete,
            "\t\tmeta l4proto {{ tcp, udp }} {key} @masquerade{n} meta mark set {MASQUERADE_MARK}\n\t\tmeta l4proto {{ tcp, udp }} {key} @bound{n} dnat {fam} to {fam} daddr : th dport"
        );
    }
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
    s
}

fn indent(rules: &str) -> String {
    rules.lines().map(|l| format!("\t\t{l}\n")).collect()
}

/// Declarations of sets and of chains with their rules, inside a table block.
fn declare(sets: &[&(String, String)], chains: &[&(String, String)]) -> String {
    let mut s = String::new();
    for (name, decl) in sets {
        let _ = writeln!(s, "\tset {name} {{ {decl} }}");
    }
    for (name, rules) in chains {
        let _ = write!(s, "\tchain {name} {{\n{}\t}}\n", indent(rules));
    }
    s
}

/// The whole `inet ferry` table for `frontends`, as one transaction that replaces the old
/// table (creating it first, so deleting never fails); `kept` are recent clients to put back
/// into affinity sets the new table has too.
pub fn ruleset(frontends: &[Frontend], kept: &AffinityClients) -> String {
    let frontends = by_identity(frontends);
    let mut body = skeleton();
    let mut tail = String::new();
    let mut dispatch: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut picks: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut ports: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut shapes = BTreeSet::new();
    for f in frontends.values() {
        let o = objects(f);
        shapes.extend(o.shape);
        let sets: Vec<&(String, String)> = o.sets.iter().collect();
        let chains: Vec<&(String, String)> = o.chains.iter().collect();
        body.push_str(&declare(&sets, &chains));
        let family = usize::from(o.v6);
        dispatch[family].push(format!("{} : {}", o.dispatch, o.target));
        picks[family].extend(o.picks.iter().map(|(k, v)| format!("{k} : {v}")));
        ports[family].extend(o.ports.iter().map(|(k, v)| format!("{k} : {v}")));
        seen[family].push(o.dispatch.clone());
        for (name, _) in &o.sets {
            let timeout = f.affinity.unwrap_or_default().max(Duration::from_secs(1));
            let clients: Vec<String> = kept
                .get(name)
                .into_iter()
                .flatten()
                .filter(|(ip, _)| ip.is_ipv6() == f.vip.is_ipv6())
                .map(|(ip, left)| format!("{ip} expires {}s", left.min(&timeout).as_secs()))
                .collect();
            if !clients.is_empty() {
                let _ = writeln!(
                    tail,
                    "add element inet {TABLE} {name} {{ {} }}",
                    clients.join(", ")
                );
            }
        }
    }
    for shape in &shapes {
        let _ = write!(
            body,
            "\tchain {} {{\n{}\t}}\n",
            shape_chain(shape),
            indent(&shape_rules(shape))
        );
    }
    let (bound, masqueraded) = bindings(frontends.values().map(|f| &**f));
    let mut s =
        format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{body}}}\n");
    for (map, of) in [
        ("seen", &seen),
        ("ports", &ports),
        ("picks", &picks),
        ("dispatch", &dispatch),
    ] {
        for (n, items) in [4, 6].iter().zip(of) {
            s.push_str(&add_elements(&format!("{map}{n}"), items));
        }
    }
    for (set, of) in [("bound", &bound), ("masquerade", &masqueraded)] {
        for v6 in [false, true] {
            let items: Vec<String> = of
                .iter()
                .filter(|(ip, _, _)| ip.is_ipv6() == v6)
                .map(binding_element)
                .collect();
            let n = if v6 { 6 } else { 4 };
            s.push_str(&add_elements(&format!("{set}{n}"), &items));
        }
    }
    s.push_str(&tail);
    s
}

fn add_elements(set: &str, items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    format!(
        "add element inet {TABLE} {set} {{ {} }}\n",
        items.join(", ")
    )
}

fn delete_elements(set: &str, items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    format!(
        "delete element inet {TABLE} {set} {{ {} }}\n",
        items.join(", ")
    )
}

/// The `(key, value)` elements of `before` that `after` does not have (their keys, to
/// delete) and those of `after` that `before` does not have (to add): a map element whose
/// value changes is deleted and added again.
fn element_changes(
    before: &[(String, String)],
    after: &[(String, String)],
) -> (Vec<String>, Vec<String>) {
    let gone = before
        .iter()
        .filter(|kv| !after.contains(kv))
        .map(|(k, _)| k.clone())
        .collect();
    let new = after
        .iter()
        .filter(|kv| !before.contains(kv))
        .map(|(k, v)| format!("{k} : {v}"))
        .collect();
    (gone, new)
}

/// The shared chain that steers `f`, when its backends share one port and it has neither
/// affinity nor source ranges; `None` when it needs chains of its own.
fn shape(f: &Frontend) -> Option<Shape> {
    let port = f.backends.first()?.port();
    let affinity = f.affinity.is_some() && f.backends.len() > 1;
    let shared = f.backends.iter().all(|b| b.port() == port);
    (shared && !affinity && f.source_ranges.is_empty())
        .then(|| (f.vip.is_ipv6(), proto(f.protocol), f.backends.len()))
}

/// One transaction that turns the table of `old` into the table of `new` (both by
/// identity, as `by_identity` gives), touching only the frontends that differ: their
/// elements, chains and sets, nothing of the others. Affinity sets that stay keep their
/// clients. `None` when only a full replacement can do it (an affinity set whose timeout
/// changed: a set cannot be redeclared in place). Empty when nothing changed.
pub fn changes(
    old: &BTreeMap<Identity, Cow<'_, Frontend>>,
    new: &BTreeMap<Identity, Cow<'_, Frontend>>,
) -> Option<String> {
    transaction(old, new, &differing(old, new))
}

/// The frontends of `old` and `new` that differ (added, removed or changed).
fn differing<A: Borrow<Frontend>, B: Borrow<Frontend>>(
    old: &BTreeMap<Identity, A>,
    new: &BTreeMap<Identity, B>,
) -> Vec<Identity> {
    old.iter()
        .filter(|(k, f)| new.get(*k).map(Borrow::borrow) != Some((*f).borrow()))
        .map(|(k, _)| *k)
        .chain(new.keys().filter(|k| !old.contains_key(*k)).copied())
        .collect()
}

/// A frontend's fingerprint, to find the frontends a plan changes without reading every
/// frontend of the table in place.
fn fingerprint(f: &Frontend) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    f.hash(&mut hasher);
    hasher.finish()
}

/// The keys where two sorted `(key, fingerprint)` sequences differ, in one pass.
fn differing_fingerprints(old: &[(Identity, u64)], new: &[(Identity, u64)]) -> Vec<Identity> {
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    let mut out = Vec::new();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return out,
            (Some((k, _)), None) => {
                out.push(*k);
                old.next();
            }
            (None, Some((k, _))) => {
                out.push(*k);
                new.next();
            }
            (Some((a, x)), Some((b, y))) => match a.cmp(b) {
                std::cmp::Ordering::Less => {
                    out.push(*a);
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(*b);
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if x != y {
                        out.push(*a);
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
}

/// `changes`, given the frontends that differ.
fn transaction<A: Borrow<Frontend>, B: Borrow<Frontend>>(
    old: &BTreeMap<Identity, A>,
    new: &BTreeMap<Identity, B>,
    differ: &[Identity],
) -> Option<String> {
    let old_of = |k: &Identity| old.get(k).map(Borrow::borrow);
    let new_of = |k: &Identity| new.get(k).map(Borrow::borrow);
    let mut add_sets = String::new();
    let mut flush = String::new();
    // Per family (IPv4, IPv6): elements to delete and to add, by map or set.
    let mut drop: BTreeMap<&str, [Vec<String>; 2]> = BTreeMap::new();
    let mut add: BTreeMap<&str, [Vec<String>; 2]> = BTreeMap::new();
    let mut drop_chains = String::new();
    let mut drop_sets = String::new();
    let mut declared = String::new();
    // Only the frontends that differ are looked at.
    if differ.is_empty() {
        return Some(String::new());
    }
    let mut shapes_before = BTreeSet::new();
    let mut shapes_after = BTreeSet::new();
    for key in differ {
        let before = old_of(key).map(objects);
        let after = new_of(key).map(objects);
        shapes_before.extend(before.as_ref().and_then(|o| o.shape));
        shapes_after.extend(after.as_ref().and_then(|o| o.shape));
        for (map, of) in [
            (
                "picks",
                (|o: &Objects| &o.picks[..]) as fn(&Objects) -> &[(String, String)],
            ),
            ("ports", |o: &Objects| &o.ports[..]),
        ] {
            let (gone, new) = element_changes(
                before.as_ref().map_or(&[], of),
                after.as_ref().map_or(&[], of),
            );
            if let Some(b) = &before {
                drop.entry(map).or_default()[usize::from(b.v6)].extend(gone);
            }
            if let Some(a) = &after {
                add.entry(map).or_default()[usize::from(a.v6)].extend(new);
            }
        }
        let verdict = |o: &Objects| (o.dispatch.clone(), o.target.clone());
        if before.as_ref().map(verdict) != after.as_ref().map(verdict) {
            if let Some(b) = &before {
                drop.entry("dispatch").or_default()[usize::from(b.v6)].push(b.dispatch.clone());
            }
            if let Some(a) = &after {
                add.entry("dispatch").or_default()[usize::from(a.v6)]
                    .push(format!("{} : {}", a.dispatch, a.target));
            }
        }
        let had = |name: &str| -> Option<&(String, String)> {
            before.as_ref()?.chains.iter().find(|(n, _)| n == name)
        };
        let had_set = |name: &str| -> Option<&(String, String)> {
            before.as_ref()?.sets.iter().find(|(n, _)| n == name)
        };
        if let Some(a) = &after {
            if before.is_none() {
                // Kept when the frontend goes, until its count is read (`Kernel::retired`).
                add.entry("seen").or_default()[usize::from(a.v6)].push(a.dispatch.clone());
            }
            let mut new_sets = Vec::new();
            for set in &a.sets {
                match had_set(&set.0) {
                    Some(kept) if kept == set => {}
                    Some(_) => return None,
                    None => new_sets.push(set),
                }
            }
            // A chain whose rules stay as they are is left alone (a change of backends that
            // keeps their number and port touches only the `picks` elements); the others
            // are emptied and filled anew.
            let mut chains: Vec<&(String, String)> = Vec::new();
            for chain in &a.chains {
                match had(&chain.0) {
                    Some(kept) if kept == chain => continue,
                    Some(_) => {
                        let _ = writeln!(flush, "flush chain inet {TABLE} {}", chain.0);
                    }
                    None => {}
                }
                chains.push(chain);
            }
            let mut decl = declare(&new_sets, &chains);
            // Sets first: the chains' rules name them.
            let split = decl.find("\tchain ").unwrap_or(decl.len());
            add_sets.push_str(&decl[..split]);
            declared.push_str(&decl.split_off(split));
        }
        if let Some(b) = &before {
            let keeps = |name: &str| {
                after
                    .as_ref()
                    .is_some_and(|a| a.chains.iter().any(|(n, _)| n == name))
            };
            // The steering chain first: it is what jumps to the backends' chains.
            for (name, _) in b.chains.iter().filter(|(n, _)| !keeps(n)) {
                let _ = writeln!(drop_chains, "delete chain inet {TABLE} {name}");
            }
            let stays = |name: &str| {
                after
                    .as_ref()
                    .is_some_and(|a| a.sets.iter().any(|(n, _)| n == name))
            };
            for (name, _) in b.sets.iter().filter(|(n, _)| !stays(n)) {
                let _ = writeln!(drop_sets, "delete set inet {TABLE} {name}");
            }
        }
    }
    // A shared chain comes with its first frontend and goes with its last. Only when a
    // differing frontend's shape changes are the others looked at.
    if shapes_before != shapes_after {
        // Whether a frontend that stays as it is uses `s` (usually the first few do).
        let in_use = |s: &Shape| {
            new.iter()
                .filter(|(k, _)| !differ.contains(k))
                .any(|(_, f)| shape(f.borrow()).as_ref() == Some(s))
        };
        for s in shapes_after.difference(&shapes_before) {
            if !in_use(s) {
                let _ = write!(
                    declared,
                    "\tchain {} {{\n{}\t}}\n",
                    shape_chain(s),
                    indent(&shape_rules(s))
                );
            }
        }
        for s in shapes_before.difference(&shapes_after) {
            if !in_use(s) {
                let _ = writeln!(drop_chains, "delete chain inet {TABLE} {}", shape_chain(s));
            }
        }
    }
    let (bound_before, masq_before) = bindings(differ.iter().filter_map(old_of));
    let (bound_after, masq_after) = bindings(differ.iter().filter_map(new_of));
    // A binding another frontend still has stays (two frontends share one only where a
    // Service maps two of its ports to one NodePort, which Kubernetes refuses, but the
    // table must not depend on that).
    let unchanged = || {
        new.iter()
            .filter(|(k, _)| !differ.contains(k))
            .map(|(_, f)| f.borrow())
    };
    let still = |b: &Binding, masquerade: bool| {
        unchanged().any(|f| {
            f.vip == b.0
                && proto(f.protocol) == b.1
                && (!masquerade || !f.local)
                && f.backends.iter().any(|be| be.port() == b.2)
        })
    };
    for (set, before, after) in [
        ("bound", &bound_before, &bound_after),
        ("masquerade", &masq_before, &masq_after),
    ] {
        for v6 in [false, true] {
            let of_family = |b: &&Binding| b.0.is_ipv6() == v6;
            let masquerade = set == "masquerade";
            let gone = before
                .difference(after)
                .filter(of_family)
                .filter(|b| !still(b, masquerade))
                .map(binding_element);
            drop.entry(set).or_default()[usize::from(v6)].extend(gone);
            let new = after
                .difference(before)
                .filter(of_family)
                .map(binding_element);
            add.entry(set).or_default()[usize::from(v6)].extend(new);
        }
    }
    let elements = |of: &BTreeMap<&str, [Vec<String>; 2]>,
                    names: &[&str],
                    write: fn(&str, &[String]) -> String| {
        let mut s = String::new();
        for name in names {
            for (n, items) in [4, 6].iter().zip(of.get(name).into_iter().flatten()) {
                s.push_str(&write(&format!("{name}{n}"), items));
            }
        }
        s
    };
    let mut s = String::new();
    if !add_sets.is_empty() {
        let _ = write!(s, "table inet {TABLE} {{\n{add_sets}}}\n");
    }
    s.push_str(&flush);
    // What leads to a chain goes before the chain; what a chain's rules read comes before
    // what leads to the chain.
    s.push_str(&elements(
        &drop,
        &["dispatch", "picks", "ports", "bound", "masquerade"],
        delete_elements,
    ));
    s.push_str(&drop_chains);
    s.push_str(&drop_sets);
    if !declared.is_empty() {
        let _ = write!(s, "table inet {TABLE} {{\n{declared}}}\n");
    }
    s.push_str(&elements(
        &add,
        &["seen", "picks", "ports", "dispatch", "bound", "masquerade"],
        add_elements,
    ));
    Some(s)
}

/// Deletes the `seen` elements of `frontends`: those of removed frontends, once read for the
/// last time.
fn delete_seen<'a>(frontends: impl IntoIterator<Item = &'a Identity>) -> String {
    let (v6, v4): (Vec<&Identity>, Vec<&Identity>) =
        frontends.into_iter().partition(|k| k.0.is_ipv6());
    [(4, v4), (6, v6)]
        .iter()
        .map(|(n, of)| {
            let items: Vec<String> = of.iter().map(|k| element(k)).collect();
            delete_elements(&format!("seen{n}"), &items)
        })
        .collect()
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
    use std::process::Stdio;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::process::Command;

    fn frontend(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend::for_test(vip, port, protocol, backends)
    }

    /// The text of chain `name` in `r`, up to the next declaration.
    fn chain<'a>(r: &'a str, name: &str) -> &'a str {
        let at = r
            .find(&format!("chain {name} {{"))
            .unwrap_or_else(|| panic!("no chain {name} in\n{r}"));
        let rest = &r[at..];
        &rest[..rest.find("\t}").unwrap_or(rest.len())]
    }

    #[test]
    fn new_connections_are_dispatched_by_one_lookup_then_bound_with_masquerade() {
        let r = ruleset(
            &[frontend(
                "192.0.2.10",
                80,
                Protocol::Tcp,
                &["10.0.0.1:30080", "10.0.0.2:30080"],
            )],
            &AffinityClients::new(),
        );
        // Steering: after conntrack, before NAT, first packets only, one map lookup.
        assert!(
            r.contains("type filter hook prerouting priority -150; policy accept;\n\t\tct state != new accept\n\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n"),
            "{r}"
        );
        assert!(
            r.contains("type route hook output priority -150; policy accept;\n\t\tct state != new accept\n\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n"),
            "{r}"
        );
        // No chain of its own: the shared chain of TCP frontends with two backends sharing
        // a NodePort steers it, only while the VIP is local, counts it in its `seen4`
        // element, and picks the backend (its turns in `picks4`) and the port (`ports4`).
        assert!(
            r.contains(
                "add element inet ferry dispatch4 { 192.0.2.10 . tcp . 80 : goto pick4_tcp_2 }"
            ),
            "{r}"
        );
        assert_eq!(
            chain(&r, "pick4_tcp_2"),
            "chain pick4_tcp_2 {\n\t\tfib daddr type != local return\n\t\tip daddr . meta l4proto . th dport @seen4\n\t\tip daddr set ip daddr . meta l4proto . th dport . numgen inc mod 2 map @picks4 tcp dport set ct original ip daddr . meta l4proto . th dport map @ports4\n"
        );
        assert!(
            r.contains("add element inet ferry picks4 { 192.0.2.10 . tcp . 80 . 0 : 10.0.0.1, 192.0.2.10 . tcp . 80 . 1 : 10.0.0.2 }"),
            "{r}"
        );
        assert!(
            r.contains("add element inet ferry ports4 { 192.0.2.10 . tcp . 80 : 30080 }"),
            "{r}"
        );
        assert!(
            r.contains("add element inet ferry seen4 { 192.0.2.10 . tcp . 80 }"),
            "{r}"
        );
        assert!(!r.contains("chain fe_"), "{r}");
        assert!(!r.contains("chain be_"), "{r}");
        assert!(!r.contains("counter c_"), "{r}");
        // Binding, after kube-proxy's NAT, for connections steered from this VIP port.
        for hook in ["prerouting", "output"] {
            assert!(
                r.contains(&format!("chain nat_{hook} {{\n\t\ttype nat hook {hook} priority -95; policy accept;\n\t\tmeta l4proto {{ tcp, udp }} ct original ip daddr . meta l4proto . th dport @masquerade4 meta mark set 0x66657279\n\t\tmeta l4proto {{ tcp, udp }} ct original ip daddr . meta l4proto . th dport @bound4 dnat ip to ip daddr : th dport\n")),
                "{r}"
            );
        }
        assert!(r.contains("add element inet ferry bound4 { 192.0.2.10 . tcp . 30080 }"));
        assert!(r.contains("add element inet ferry masquerade4 { 192.0.2.10 . tcp . 30080 }"));
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
        assert!(
            r.contains(
                "add element inet ferry dispatch4 { 192.0.2.10 . udp . 53 : goto pick4_udp_1 }"
            ),
            "{r}"
        );
        assert!(
            chain(&r, "pick4_udp_1").contains(
                "ip daddr set ip daddr . meta l4proto . th dport . numgen inc mod 1 map @picks4 udp dport set"
            ),
            "{r}"
        );
        assert!(
            r.contains("add element inet ferry picks4 { 192.0.2.10 . udp . 53 . 0 : 10.0.0.2 }"),
            "{r}"
        );
        assert!(r.contains("add element inet ferry bound4 { 192.0.2.10 . udp . 30053 }"));
        assert!(!r.contains("add element inet ferry masquerade4"), "{r}");
        // The IPv4 backend cannot serve an IPv6 VIP in the kernel: two backends, each with
        // its chain and its set of recent clients expiring after the Service's timeout.
        let ident = "2001xdb8xx10_tcp_443";
        let fe1 = chain(&r, &format!("fe_{ident}"));
        // Set names follow the frontend and backend, not their places in the plan.
        let set_0 = format!("aff_{ident}_2001xdb8xx1_30443");
        let set_1 = format!("aff_{ident}_2001xdb8xx2_30443");
        assert!(
            fe1.contains(&format!("ip6 saddr @{set_0} goto be_{ident}_0")),
            "{r}"
        );
        assert!(
            fe1.contains(&format!("ip6 saddr @{set_1} goto be_{ident}_1")),
            "{r}"
        );
        assert!(!fe1.contains("10_0_0_3"), "{r}");
        assert!(
            fe1.contains(&format!(
                "numgen inc mod 2 vmap {{ 0 : goto be_{ident}_0, 1 : goto be_{ident}_1 }}"
            )),
            "{r}"
        );
        assert!(
            r.contains(&format!(
                "set {set_1} {{ type ipv6_addr; flags dynamic,timeout; timeout 60s; size 65536; }}"
            )),
            "{r}"
        );
        assert_eq!(
            chain(&r, &format!("be_{ident}_1")),
            format!(
                "chain be_{ident}_1 {{\n\t\tupdate @{set_1} {{ ip6 saddr }}\n\t\tip6 daddr set 2001:db8::2 tcp dport set 30443\n"
            )
        );
        assert!(
            r.contains("add element inet ferry masquerade6 { 2001:db8::10 . tcp . 30443 }"),
            "{r}"
        );
    }

    #[test]
    fn backends_on_differing_ports_get_a_chain_each() {
        let f = frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30081"],
        );
        let r = ruleset(&[f], &AffinityClients::new());
        assert!(
            chain(&r, "be_192_0_2_10_tcp_80_1")
                .contains("ip daddr set 10.0.0.2 tcp dport set 30081"),
            "{r}"
        );
        assert!(
            r.contains("add element inet ferry bound4 { 192.0.2.10 . tcp . 30080, 192.0.2.10 . tcp . 30081 }"),
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
            r.contains("add element inet ferry aff_192_0_2_10_tcp_80_10_0_0_1_30080 { 198.51.100.7 expires 20s }"),
            "{r}"
        );
        assert_eq!(r.matches("add element inet ferry aff_").count(), 1, "{r}");
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

    /// `n` frontends `192.0.2.<i>:80`, each with the same two backends.
    fn many(n: u8) -> Vec<Frontend> {
        (1..=n)
            .map(|i| {
                frontend(
                    &format!("192.0.2.{i}"),
                    80,
                    Protocol::Tcp,
                    &["10.0.0.1:30080", "10.0.0.2:30080"],
                )
            })
            .collect()
    }

    #[test]
    fn a_change_touches_only_the_frontend_that_changed() {
        let many = many(50);
        let mut changed = many.clone();
        changed[7].backends = vec!["10.0.0.1:30090".parse().unwrap()];
        let script = changes(&by_identity(&many), &by_identity(&changed)).unwrap();
        assert_eq!(
            script,
            "delete element inet ferry dispatch4 { 192.0.2.8 . tcp . 80 }\n\
             delete element inet ferry picks4 { 192.0.2.8 . tcp . 80 . 1 }\n\
             delete element inet ferry ports4 { 192.0.2.8 . tcp . 80 }\n\
             delete element inet ferry bound4 { 192.0.2.8 . tcp . 30080 }\n\
             delete element inet ferry masquerade4 { 192.0.2.8 . tcp . 30080 }\n\
             table inet ferry {\n\tchain pick4_tcp_1 {\n\t\tfib daddr type != local return\n\t\tip daddr . meta l4proto . th dport @seen4\n\t\tip daddr set ip daddr . meta l4proto . th dport . numgen inc mod 1 map @picks4 tcp dport set ct original ip daddr . meta l4proto . th dport map @ports4\n\t}\n}\n\
             add element inet ferry ports4 { 192.0.2.8 . tcp . 80 : 30090 }\n\
             add element inet ferry dispatch4 { 192.0.2.8 . tcp . 80 : goto pick4_tcp_1 }\n\
             add element inet ferry bound4 { 192.0.2.8 . tcp . 30090 }\n\
             add element inet ferry masquerade4 { 192.0.2.8 . tcp . 30090 }\n"
        );
        // The first frontend of its shape brought its chain; the last one takes it away,
        // while a chain others still use stays.
        let back = changes(&by_identity(&changed), &by_identity(&many)).unwrap();
        assert!(
            back.contains("delete chain inet ferry pick4_tcp_1\n"),
            "{back}"
        );
        assert!(!back.contains("pick4_tcp_2 {"), "{back}");
        let mut fewer = many.clone();
        fewer.remove(3);
        let gone = changes(&by_identity(&many), &by_identity(&fewer)).unwrap();
        assert!(!gone.contains("chain"), "{gone}");
        // A new affinity timeout cannot be set on a set in place: the table is replaced.
        let mut sticky = many.clone();
        sticky[0].affinity = Some(Duration::from_secs(10));
        let mut shorter = sticky.clone();
        shorter[0].affinity = Some(Duration::from_secs(5));
        assert_eq!(changes(&by_identity(&sticky), &by_identity(&shorter)), None);
    }

    #[test]
    fn other_nodes_on_the_same_port_change_only_the_round_robin_turns() {
        let web = frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30080"],
        );
        let mut moved = web.clone();
        moved.backends = vec![
            "10.0.0.1:30080".parse().unwrap(),
            "10.0.0.3:30080".parse().unwrap(),
        ];
        let script = changes(&by_identity(&[web]), &by_identity(&[moved])).unwrap();
        assert_eq!(
            script,
            "delete element inet ferry picks4 { 192.0.2.10 . tcp . 80 . 1 }\n\
             add element inet ferry picks4 { 192.0.2.10 . tcp . 80 . 1 : 10.0.0.3 }\n"
        );
    }

    #[test]
    fn fingerprints_find_the_frontends_a_comparison_finds() {
        let many = many(20);
        let mut other = many.clone();
        other.remove(0);
        other[4].backends.pop();
        other[9].local = true;
        other[12].service = "default/renamed".into();
        other.push(frontend(
            "192.0.2.99",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080"],
        ));
        let prints = |plan: &[Frontend]| -> Vec<(Identity, u64)> {
            by_identity(plan)
                .iter()
                .map(|(k, f)| (*k, fingerprint(f)))
                .collect()
        };
        for (a, b) in [(&many, &other), (&other, &many), (&many, &many)] {
            let mut compared = differing(&by_identity(a), &by_identity(b));
            compared.sort();
            assert_eq!(differing_fingerprints(&prints(a), &prints(b)), compared);
        }
        assert_eq!(
            differing_fingerprints(&prints(&many), &prints(&other)).len(),
            5
        );
    }

    #[test]
    fn a_binding_another_frontend_still_has_stays() {
        let a = frontend("192.0.2.10", 80, Protocol::Tcp, &["10.0.0.1:30080"]);
        let b = frontend("192.0.2.10", 81, Protocol::Tcp, &["10.0.0.1:30080"]);
        let script = changes(
            &by_identity(&[a.clone(), b.clone()]),
            &by_identity(std::slice::from_ref(&a)),
        )
        .unwrap();
        assert!(
            script.contains("delete element inet ferry dispatch4 { 192.0.2.10 . tcp . 81 }"),
            "{script}"
        );
        assert!(!script.contains("bound4"), "{script}");
        assert!(!script.contains("masquerade4"), "{script}");
        // Once no frontend has it, it goes.
        let script = changes(&by_identity(&[a]), &BTreeMap::new()).unwrap();
        assert!(
            script.contains("delete element inet ferry bound4 { 192.0.2.10 . tcp . 30080 }"),
            "{script}"
        );
    }

    #[test]
    fn source_ranges_drop_new_connections_from_everyone_else() {
        let mut f = frontend("192.0.2.10", 80, Protocol::Tcp, &["10.0.0.1:30080"]);
        f.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let mut other = frontend("192.0.2.11", 80, Protocol::Tcp, &["10.0.0.1:30081"]);
        other.source_ranges = vec!["2001:db8::/32".parse().unwrap()];
        let r = ruleset(&[f, other], &AffinityClients::new());
        assert!(
            chain(&r, "fe_192_0_2_10_tcp_80")
                .contains("fib daddr type != local return\n\t\tip saddr != { 198.51.100.0/24 } drop\n\t\tip daddr . meta l4proto . th dport @seen4\n"),
            "{r}"
        );
        // No range of the VIP's family admits no one.
        assert!(
            chain(&r, "fe_192_0_2_11_tcp_80").contains("return\n\t\tdrop\n\t\tip daddr . meta"),
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
        assert!(!r.contains("add element"));
    }
}
