//! One transaction from the table in place to the table of a new plan, touching only the
//! frontends that differ (found by fingerprint, `differing_fingerprints`): their elements,
//! chains and sets, nothing of the others; shared pick chains come with their first frontend
//! and go with their last.

use std::borrow::{Borrow, Cow};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash as _, Hasher as _};

use super::TABLE;
use super::ruleset::{
    Binding, Identity, Objects, Shape, add_elements, binding_element, binding_entry, bindings,
    declare, delete_elements, element, indent, objects, proto, shape, shape_chain, shape_rules,
};
use crate::plan::Frontend;

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
pub(super) fn fingerprint(f: &Frontend) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    f.hash(&mut hasher);
    hasher.finish()
}

/// The keys where two sorted `(key, fingerprint)` sequences differ, in one pass.
pub(super) fn differing_fingerprints(
    old: &[(Identity, u64)],
    new: &[(Identity, u64)],
) -> Vec<Identity> {
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
pub(super) fn transaction<A: Borrow<Frontend>, B: Borrow<Frontend>>(
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
            ("one", |o: &Objects| &o.one[..]),
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
    let bound_before = bindings(differ.iter().filter_map(old_of));
    let bound_after = bindings(differ.iter().filter_map(new_of));
    // What the frontends that stay as they are make of a binding (two frontends share one
    // only where a Service maps two of its ports to one NodePort, which Kubernetes refuses,
    // but the table must not depend on that): whether they hold it, and masquerade it.
    let unchanged = || {
        new.iter()
            .filter(|(k, _)| !differ.contains(k))
            .map(|(_, f)| f.borrow())
    };
    let kept = |b: &Binding| -> Option<bool> {
        unchanged()
            .filter(|f| {
                f.vip == b.0
                    && proto(f.protocol) == b.1
                    && f.backends.iter().any(|be| be.port() == b.2)
            })
            .map(|f| !f.local)
            .reduce(|a, m| a || m)
    };
    // A binding held from two sides is masqueraded if either side asks for it.
    let joined = |a: Option<bool>, b: Option<bool>| match (a, b) {
        (Some(x), Some(y)) => Some(x || y),
        (x, None) | (None, x) => x,
    };
    let touched: BTreeSet<&Binding> = bound_before.keys().chain(bound_after.keys()).collect();
    for b in touched {
        let others = kept(b);
        let was = joined(bound_before.get(b).copied(), others);
        let will = joined(bound_after.get(b).copied(), others);
        if was == will {
            continue;
        }
        let family = usize::from(b.0.is_ipv6());
        if was.is_some() {
            drop.entry("bind").or_default()[family].push(binding_element(b));
        }
        if let Some(masquerade) = will {
            add.entry("bind").or_default()[family].push(binding_entry(b, masquerade));
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
        &["dispatch", "picks", "one", "ports", "bind"],
        delete_elements,
    ));
    s.push_str(&drop_chains);
    s.push_str(&drop_sets);
    if !declared.is_empty() {
        let _ = write!(s, "table inet {TABLE} {{\n{declared}}}\n");
    }
    s.push_str(&elements(
        &add,
        &["seen", "picks", "one", "ports", "dispatch", "bind"],
        add_elements,
    ));
    Some(s)
}

/// Deletes the `seen` elements of `frontends`: those of removed frontends, once read for the
/// last time.
pub(super) fn delete_seen<'a>(frontends: impl IntoIterator<Item = &'a Identity>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ruleset::by_identity;
    use ferry_model::Protocol;
    use std::time::Duration;

    fn frontend(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend::for_test(vip, port, protocol, backends)
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
             delete element inet ferry picks4 { 192.0.2.8 . tcp . 80 . 0, 192.0.2.8 . tcp . 80 . 1 }\n\
             delete element inet ferry ports4 { 192.0.2.8 . tcp . 80 }\n\
             delete element inet ferry bind4 { 192.0.2.8 . tcp . 30080 }\n\
             table inet ferry {\n\tchain pick4_tcp_1 {\n\t\tfib daddr type != local return\n\t\tip daddr . meta l4proto . th dport @seen4\n\t\tip daddr set ip daddr . meta l4proto . th dport map @one4 tcp dport set ct original ip daddr . meta l4proto . th dport map @ports4\n\t}\n}\n\
             add element inet ferry one4 { 192.0.2.8 . tcp . 80 : 10.0.0.1 }\n\
             add element inet ferry ports4 { 192.0.2.8 . tcp . 80 : 30090 }\n\
             add element inet ferry dispatch4 { 192.0.2.8 . tcp . 80 : goto pick4_tcp_1 }\n\
             add element inet ferry bind4 { 192.0.2.8 . tcp . 30090 : goto masq4_tcp }\n"
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
        assert!(!script.contains("bind4"), "{script}");
        // Once no frontend has it, it goes.
        let script = changes(&by_identity(&[a]), &BTreeMap::new()).unwrap();
        assert!(
            script.contains("delete element inet ferry bind4 { 192.0.2.10 . tcp . 30080 }"),
            "{script}"
        );
    }

    #[test]
    fn a_shared_binding_masquerades_while_one_of_its_frontends_asks_for_it() {
        let kept = Frontend {
            local: true,
            ..frontend("192.0.2.10", 80, Protocol::Tcp, &["10.0.0.1:30080"])
        };
        let spread = frontend("192.0.2.10", 81, Protocol::Tcp, &["10.0.0.1:30080"]);
        let pair = [kept.clone(), spread];
        let both = by_identity(&pair);
        let alone = by_identity(std::slice::from_ref(&kept));
        // The frontend that masqueraded goes: the binding stays, without masquerade.
        let script = changes(&both, &alone).unwrap();
        assert!(
            script.contains("delete element inet ferry bind4 { 192.0.2.10 . tcp . 30080 }\n")
                && script.contains(
                    "add element inet ferry bind4 { 192.0.2.10 . tcp . 30080 : goto bind4_tcp }\n"
                ),
            "{script}"
        );
        // And back.
        let script = changes(&alone, &both).unwrap();
        assert!(
            script.contains(
                "add element inet ferry bind4 { 192.0.2.10 . tcp . 30080 : goto masq4_tcp }\n"
            ),
            "{script}"
        );
    }
}
