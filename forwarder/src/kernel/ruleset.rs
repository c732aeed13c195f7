//! The table as text for `nft -f`: its fixed part (`skeleton`), what each frontend adds to it
//! (`objects`: its element in the dispatch map and a shared pick chain's maps, or chains and
//! affinity sets of its own), and the whole table for a plan (`ruleset`). Pure: the tests
//! read the text, and those in `kernel` have the kernel commit it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_model::Protocol;

use super::TABLE;
use super::split::servable_one;
use crate::plan::Frontend;

/// Clients remembered per backend for ClientIP affinity; past this, new clients are spread
/// without being remembered until old ones expire.
const AFFINITY_CLIENTS: usize = 65_536;
/// Marks connections to masquerade ("ferry" in ASCII).
const MASQUERADE_MARK: &str = "0x66657279";

fn family_words(ip: &IpAddr) -> (&'static str, bool) {
    match ip {
        IpAddr::V4(_) => ("ip", false),
        IpAddr::V6(_) => ("ip6", true),
    }
}

/// A protocol as nftables spells it.
pub(crate) fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
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
pub(super) fn affinity_set(f: &Frontend, backend: &SocketAddr) -> String {
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
pub(super) struct Objects {
    pub(super) ident: String,
    pub(super) v6: bool,
    /// `daddr . l4proto . dport` of the VIP port, the key in the `dispatch`, `ports` and
    /// `seen` maps and sets.
    pub(super) dispatch: String,
    /// The verdict of its `dispatch` element.
    pub(super) target: String,
    /// The shared chain that steers it, for a frontend without chains of its own.
    pub(super) shape: Option<Shape>,
    /// `(name, rules)`, one rule a line.
    pub(super) chains: Vec<(String, String)>,
    /// `(name, declaration)`.
    pub(super) sets: Vec<(String, String)>,
    /// `(key, backend address)` in the `picks` map: the backend of each round-robin turn.
    pub(super) picks: Vec<(String, String)>,
    /// `(key, backend address)` in the `one` map, for a frontend with one backend steered by
    /// a shared chain: no turns to take.
    pub(super) one: Vec<(String, String)>,
    /// `(key, NodePort)` in the `ports` map, for a frontend steered by a shared chain.
    pub(super) ports: Vec<(String, String)>,
}

/// A shared pick chain: family (IPv6 or not), protocol and number of backends. Every
/// frontend whose backends share one port, without affinity or source ranges (the usual
/// Service), is steered by the chain of its shape, its backends and port coming from the
/// `picks` and `ports` maps: a change to it is a change of elements, and the table holds a
/// handful of chains however many frontends there are.
pub(super) type Shape = (bool, &'static str, usize);

pub(super) fn shape_chain((v6, p, n): &Shape) -> String {
    format!("pick{}_{p}_{n}", if *v6 { 6 } else { 4 })
}

/// The rules of the shared chain for `shape`.
pub(super) fn shape_rules(shape: &Shape) -> String {
    let (v6, p, n) = *shape;
    let (fam, n4) = if v6 { ("ip6", 6) } else { ("ip", 4) };
    // One backend takes no turns: `numgen inc` is one counter every CPU writes for every
    // new connection of every frontend behind the chain.
    let pick = match n {
        1 => format!("{fam} daddr . meta l4proto . th dport map @one{n4}"),
        _ => format!("{fam} daddr . meta l4proto . th dport . numgen inc mod {n} map @picks{n4}"),
    };
    // The destination first, picked by the original port; then the port, looked up by the
    // original VIP (conntrack's original tuple, as the address has changed by then).
    format!(
        "fib daddr type != local return\n\
         {fam} daddr . meta l4proto . th dport @seen{n4}\n\
         {fam} daddr set {pick} \
         {p} dport set ct original {fam} daddr . meta l4proto . th dport map @ports{n4}\n"
    )
}

/// The key of a connection's NAT binding: its original VIP, protocol and the port steering
/// sent it to (what the NAT chains can match; `ct original proto-dst` cannot be part of a
/// concatenation in nft 1.0).
pub(super) type Binding = (IpAddr, &'static str, u16);

/// The frontend `(vip, protocol, port)` as an element of the table's maps and sets.
pub(super) fn element((vip, protocol, port): &Identity) -> String {
    format!("{vip} . {} . {port}", proto(*protocol))
}

pub(super) fn objects(f: &Frontend) -> Objects {
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
        // One backend takes no turns (`shape_rules`): its address is keyed by the VIP port.
        let (picks, one) = match f.backends.as_slice() {
            [b] => (Vec::new(), vec![(dispatch.clone(), b.ip().to_string())]),
            all => (
                all.iter()
                    .enumerate()
                    .map(|(j, b)| (format!("{dispatch} . {j}"), b.ip().to_string()))
                    .collect(),
                Vec::new(),
            ),
        };
        return Objects {
            ident,
            v6,
            target: format!("goto {}", shape_chain(&shape)),
            shape: Some(shape),
            chains: Vec::new(),
            sets: Vec::new(),
            picks,
            one,
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
        one: Vec::new(),
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
/// backend ports, and whether to masquerade it (all but `externalTrafficPolicy: Local`; a
/// binding two frontends share is masqueraded if either asks for it).
pub(super) fn bindings<'a>(
    frontends: impl IntoIterator<Item = &'a Frontend>,
) -> BTreeMap<Binding, bool> {
    let mut out = BTreeMap::new();
    for f in frontends {
        for b in &f.backends {
            let masquerade = out
                .entry((f.vip, proto(f.protocol), b.port()))
                .or_insert(false);
            *masquerade |= !f.local;
        }
    }
    out
}

pub(super) fn binding_element((vip, p, port): &Binding) -> String {
    format!("{vip} . {p} . {port}")
}

/// A binding's element in the `bind` map: its key and the chain that binds it.
pub(super) fn binding_entry(b: &Binding, masquerade: bool) -> String {
    let (vip, p, _) = b;
    format!(
        "{} : goto {}",
        binding_element(b),
        binding_chain(vip.is_ipv6(), p, masquerade)
    )
}

/// The chain that binds a connection of family `v6` and protocol `p` to where it was
/// steered, marking it to masquerade or not.
fn binding_chain(v6: bool, p: &str, masquerade: bool) -> String {
    let kind = if masquerade { "masq" } else { "bind" };
    format!("{kind}{}_{p}", if v6 { 6 } else { 4 })
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
            "\tmap one{n} {{\n\t\ttype {addr} . inet_proto . inet_service : {addr}\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tmap ports{n} {{\n\t\ttype {addr} . inet_proto . inet_service : inet_service\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tmap bind{n} {{\n\t\ttype {addr} . inet_proto . inet_service : verdict\n\t}}"
        );
        // Each frontend's new connections, counted by its element: elements are not read
        // before a change, as named counters are (nft lists every object first).
        let _ = writeln!(
            s,
            "\tset seen{n} {{\n\t\ttype {addr} . inet_proto . inet_service\n\t\tcounter\n\t}}"
        );
    }
    // Steering rewrites only a connection's first packet (later ones follow the conntrack
    // entry's NAT), before kube-proxy's DNAT (-100), so the NodePort it aims at is seen by
    // whatever implements NodePorts here. It is a NAT chain that binds nothing: the kernel
    // runs NAT chains, in order of priority, only until a connection has its binding, so a
    // connection's later packets never enter it (a filter chain ran for every packet). A
    // locally sent packet is rerouted when its connection's binding changes its destination,
    // which the binding below (or kube-proxy's) always does. One lookup per family finds
    // the frontend's chain.
    let dispatch = "\t\tct state != new accept\n\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n\t\tip6 daddr . meta l4proto . th dport vmap @dispatch6\n";
    for hook in ["prerouting", "output"] {
        let _ = writeln!(
            s,
            "\tchain {hook} {{\n\t\ttype nat hook {hook} priority -150; policy accept;\n{dispatch}\t}}"
        );
    }
    // After kube-proxy's DNAT (-100): only one NAT binding per connection and hook, so a
    // connection kube-proxy took to a pod never reaches these. The others are bound to
    // where steering sent them (the packet's destination now): one lookup per family, in
    // the map `bind` of `original VIP . l4proto . backend port`, goes to the chain that
    // binds the connection, marking it to masquerade or not.
    let mut complete = String::new();
    for (n, fam) in [(4, "ip"), (6, "ip6")] {
        let _ = writeln!(
            complete,
            "\t\tct original {fam} daddr . meta l4proto . th dport vmap @bind{n}"
        );
    }
    for hook in ["prerouting", "output"] {
        let _ = writeln!(
            s,
            "\tchain nat_{hook} {{\n\t\ttype nat hook {hook} priority -95; policy accept;\n{complete}\t}}"
        );
    }
    for (v6, fam) in [(false, "ip"), (true, "ip6")] {
        for p in ["tcp", "udp"] {
            for masquerade in [false, true] {
                let mark = if masquerade {
                    format!(" meta mark set {MASQUERADE_MARK}")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "\tchain {} {{\n\t\tmeta l4proto {p}{mark} dnat {fam} to {fam} daddr : {p} dport\n\t}}",
                    binding_chain(v6, p, masquerade)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority 105; policy accept;\n\t\tmeta mark {MASQUERADE_MARK} masquerade\n\t}}"
    );
    s
}

pub(super) fn indent(rules: &str) -> String {
    rules.lines().map(|l| format!("\t\t{l}\n")).collect()
}

/// Declarations of sets and of chains with their rules, inside a table block.
pub(super) fn declare(sets: &[&(String, String)], chains: &[&(String, String)]) -> String {
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
    let mut one: [Vec<String>; 2] = [Vec::new(), Vec::new()];
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
        one[family].extend(o.one.iter().map(|(k, v)| format!("{k} : {v}")));
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
    let bound = bindings(frontends.values().map(|f| &**f));
    let mut s =
        format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{body}}}\n");
    for (map, of) in [
        ("seen", &seen),
        ("ports", &ports),
        ("picks", &picks),
        ("one", &one),
        ("dispatch", &dispatch),
    ] {
        for (n, items) in [4, 6].iter().zip(of) {
            s.push_str(&add_elements(&format!("{map}{n}"), items));
        }
    }
    for v6 in [false, true] {
        let items: Vec<String> = bound
            .iter()
            .filter(|((ip, _, _), _)| ip.is_ipv6() == v6)
            .map(|(b, masquerade)| binding_entry(b, *masquerade))
            .collect();
        s.push_str(&add_elements(
            &format!("bind{}", if v6 { 6 } else { 4 }),
            &items,
        ));
    }
    s.push_str(&tail);
    s
}

pub(super) fn add_elements(set: &str, items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    format!(
        "add element inet {TABLE} {set} {{ {} }}\n",
        items.join(", ")
    )
}

pub(super) fn delete_elements(set: &str, items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    format!(
        "delete element inet {TABLE} {set} {{ {} }}\n",
        items.join(", ")
    )
}

/// The shared chain that steers `f`, when its backends share one port and it has neither
/// affinity nor source ranges; `None` when it needs chains of its own.
pub(super) fn shape(f: &Frontend) -> Option<Shape> {
    let port = f.backends.first()?.port();
    let affinity = f.affinity.is_some() && f.backends.len() > 1;
    let shared = f.backends.iter().all(|b| b.port() == port);
    (shared && !affinity && f.source_ranges.is_empty())
        .then(|| (f.vip.is_ipv6(), proto(f.protocol), f.backends.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Steering: a NAT chain before kube-proxy's, so first packets only, one map lookup.
        for hook in ["prerouting", "output"] {
            assert!(
                r.contains(&format!("chain {hook} {{\n\t\ttype nat hook {hook} priority -150; policy accept;\n\t\tct state != new accept\n\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n")),
                "{r}"
            );
        }
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
                r.contains(&format!("chain nat_{hook} {{\n\t\ttype nat hook {hook} priority -95; policy accept;\n\t\tct original ip daddr . meta l4proto . th dport vmap @bind4\n\t\tct original ip6 daddr . meta l4proto . th dport vmap @bind6\n\t}}")),
                "{r}"
            );
        }
        assert!(
            r.contains(
                "add element inet ferry bind4 { 192.0.2.10 . tcp . 30080 : goto masq4_tcp }"
            ),
            "{r}"
        );
        assert_eq!(
            chain(&r, "masq4_tcp"),
            "chain masq4_tcp {\n\t\tmeta l4proto tcp meta mark set 0x66657279 dnat ip to ip daddr : tcp dport\n"
        );
        assert_eq!(
            chain(&r, "bind6_udp"),
            "chain bind6_udp {\n\t\tmeta l4proto udp dnat ip6 to ip6 daddr : udp dport\n"
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
        assert!(
            r.contains(
                "add element inet ferry dispatch4 { 192.0.2.10 . udp . 53 : goto pick4_udp_1 }"
            ),
            "{r}"
        );
        assert!(
            chain(&r, "pick4_udp_1").contains(
                "ip daddr set ip daddr . meta l4proto . th dport map @one4 udp dport set"
            ),
            "{r}"
        );
        assert!(
            r.contains("add element inet ferry one4 { 192.0.2.10 . udp . 53 : 10.0.0.2 }"),
            "{r}"
        );
        assert!(
            r.contains(
                "add element inet ferry bind4 { 192.0.2.10 . udp . 30053 : goto bind4_udp }"
            ),
            "{r}"
        );
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
            r.contains(
                "add element inet ferry bind6 { 2001:db8::10 . tcp . 30443 : goto masq6_tcp }"
            ),
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
            r.contains("add element inet ferry bind4 { 192.0.2.10 . tcp . 30080 : goto masq4_tcp, 192.0.2.10 . tcp . 30081 : goto masq4_tcp }"),
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
    fn an_empty_plan_leaves_an_empty_table() {
        let r = ruleset(&[], &AffinityClients::new());
        assert!(r.starts_with("table inet ferry\ndelete table inet ferry\n"));
        assert!(!r.contains("goto"));
        assert!(!r.contains("add element"));
    }
}
