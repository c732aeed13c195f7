//! The allocator's table of scenarios and its properties.

use super::*;
use kube::core::Selector;
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A request builder: `svc("a").port(80)`.
#[derive(Clone)]
struct Req(AllocationRequest);

fn svc(uid: &str) -> Req {
    Req(AllocationRequest {
        id: LoadBalancerId {
            namespace: "default".into(),
            name: uid.into(),
            uid: uid.into(),
        },
        families: vec![IpFamily::V4],
        ports: vec![(Protocol::Tcp, 80)],
        ..AllocationRequest::default()
    })
}

impl Req {
    fn port(mut self, protocol: Protocol, port: u16) -> Self {
        self.0.ports = vec![(protocol, port)];
        self
    }
    fn ip(mut self, s: &str) -> Self {
        self.0.requested.push(ip(s));
        self
    }
    fn share(mut self, key: &str) -> Self {
        self.0.sharing_key = Some(key.into());
        self
    }
    fn pool(mut self, name: &str) -> Self {
        self.0.pool = Some(name.into());
        self
    }
    fn v6(mut self) -> Self {
        self.0.families = vec![IpFamily::V6];
        self
    }
    fn dual(mut self, policy: IpFamilyPolicy) -> Self {
        self.0.families = vec![IpFamily::V4, IpFamily::V6];
        self.0.policy = policy;
        self
    }
    fn label(mut self, k: &str, v: &str) -> Self {
        self.0.service_labels.insert(k.into(), v.into());
        self
    }
}

fn alloc(pools: Vec<Pool>) -> PoolAllocator {
    let mut a = PoolAllocator::new();
    a.set_pools(pools, Vec::new());
    a
}

fn pool(name: &str, ranges: &[&str]) -> Pool {
    Pool::new(name, ranges).unwrap()
}

fn ips(r: &[Assigned]) -> Vec<IpAddr> {
    r.iter().map(|a| a.ip).collect()
}

#[test]
fn hands_out_the_lowest_free_address_and_keeps_it() {
    let mut a = alloc(vec![pool("p", &["192.0.2.10-192.0.2.12"])]);
    assert_eq!(ips(&a.allocate(&svc("a").0).unwrap()), [ip("192.0.2.10")]);
    assert_eq!(ips(&a.allocate(&svc("b").0).unwrap()), [ip("192.0.2.11")]);
    // Asking again changes nothing.
    assert_eq!(ips(&a.allocate(&svc("a").0).unwrap()), [ip("192.0.2.10")]);
    a.release("a");
    assert_eq!(ips(&a.allocate(&svc("c").0).unwrap()), [ip("192.0.2.10")]);
}

#[test]
fn exhaustion_is_an_error_and_allocates_nothing() {
    let mut a = alloc(vec![pool("p", &["192.0.2.1/32"])]);
    a.allocate(&svc("a").0).unwrap();
    let err = a.allocate(&svc("b").0).unwrap_err();
    assert_eq!(err.reason(), "PoolExhausted");
    assert!(a.assigned("b").is_none());
}

#[test]
fn requested_addresses_are_honoured_or_refused() {
    let mut a = alloc(vec![pool("p", &["192.0.2.0/24"])]);
    assert_eq!(
        ips(&a.allocate(&svc("a").ip("192.0.2.77").0).unwrap()),
        [ip("192.0.2.77")]
    );
    let taken = a.allocate(&svc("b").ip("192.0.2.77").0).unwrap_err();
    assert_eq!(taken.reason(), "IPInUse");
    assert!(taken.to_string().contains("default/a"), "{taken}");
    let outside = a.allocate(&svc("c").ip("10.9.9.9").0).unwrap_err();
    assert_eq!(outside.reason(), "IPNotInAnyPool");
    let family = a.allocate(&svc("d").ip("2001:db8::1").0).unwrap_err();
    assert_eq!(family.reason(), "IPFamilyMismatch");
    assert!(a.assigned("b").is_none() && a.assigned("c").is_none() && a.assigned("d").is_none());
}

#[test]
fn a_failed_change_keeps_the_old_address() {
    let mut a = alloc(vec![pool("p", &["192.0.2.0/24"])]);
    a.allocate(&svc("a").0).unwrap();
    a.allocate(&svc("b").ip("192.0.2.50").0).unwrap();
    // a now asks for b's address: refused, and a keeps what it had.
    assert!(a.allocate(&svc("a").ip("192.0.2.50").0).is_err());
    assert_eq!(ips(a.assigned("a").unwrap()), [ip("192.0.2.0")]);
    // a moves to a free address it asks for.
    assert_eq!(
        ips(&a.allocate(&svc("a").ip("192.0.2.60").0).unwrap()),
        [ip("192.0.2.60")]
    );
    assert!(a.holders_of(&ip("192.0.2.0")).is_empty());
}

#[test]
fn sharing_needs_the_same_key_and_disjoint_ports() {
    let mut a = alloc(vec![pool("p", &["192.0.2.0/30"])]);
    let first = a
        .allocate(&svc("dns-tcp").port(Protocol::Tcp, 53).share("dns").0)
        .unwrap();
    // Same key, other protocol on the same port number: shares.
    let second = a
        .allocate(&svc("dns-udp").port(Protocol::Udp, 53).share("dns").0)
        .unwrap();
    assert_eq!(ips(&first), ips(&second));
    // Same key, overlapping port: gets its own address.
    let third = a
        .allocate(&svc("dns-tcp-2").port(Protocol::Tcp, 53).share("dns").0)
        .unwrap();
    assert_ne!(ips(&first), ips(&third));
    // Other key, asking for the shared address: refused.
    let err = a
        .allocate(
            &svc("web")
                .port(Protocol::Tcp, 80)
                .share("web")
                .ip("192.0.2.0")
                .0,
        )
        .unwrap_err();
    assert_eq!(err.reason(), "IPInUse");
    // Releasing one sharer keeps the address with the other.
    a.release("dns-tcp");
    assert_eq!(a.holders_of(&first[0].ip).len(), 1);
}

#[test]
fn a_port_change_that_breaks_sharing_moves_the_service() {
    let mut a = alloc(vec![pool("p", &["192.0.2.0/30"])]);
    let x = a
        .allocate(&svc("x").port(Protocol::Tcp, 80).share("k").0)
        .unwrap();
    a.allocate(&svc("y").port(Protocol::Tcp, 443).share("k").0)
        .unwrap();
    let y2 = a
        .allocate(&svc("y").port(Protocol::Tcp, 80).share("k").0)
        .unwrap();
    assert_ne!(ips(&x), ips(&y2));
}

#[test]
fn selectors_auto_assign_and_named_pools() {
    let mut special = pool("special", &["198.51.100.0/30"]);
    special.service_selector = Some(
        Selector::try_from(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("tier".to_string(), "edge".to_string())].into()),
                match_expressions: None,
            },
        )
        .unwrap(),
    );
    let mut manual = pool("manual", &["203.0.113.0/30"]);
    manual.auto_assign = false;
    let mut a = alloc(vec![pool("general", &["192.0.2.0/30"]), special, manual]);
    // Selector pools are preferred for the Services they select.
    let edge = a.allocate(&svc("edge").label("tier", "edge").0).unwrap();
    assert_eq!(edge[0].pool.as_deref(), Some("special"));
    let plain = a.allocate(&svc("plain").0).unwrap();
    assert_eq!(plain[0].pool.as_deref(), Some("general"));
    // Not selected: refused even when asked for by address.
    let err = a.allocate(&svc("x").ip("198.51.100.2").0).unwrap_err();
    assert_eq!(err.reason(), "PoolDoesNotSelectService");
    // autoAssign: false serves only explicit requests.
    let m = a.allocate(&svc("m").pool("manual").0).unwrap();
    assert_eq!(m[0].pool.as_deref(), Some("manual"));
    assert_eq!(
        ips(&a.allocate(&svc("n").ip("203.0.113.3").0).unwrap()),
        [ip("203.0.113.3")]
    );
    assert_eq!(
        a.allocate(&svc("u").pool("nope").0).unwrap_err().reason(),
        "UnknownPool"
    );
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut p = pool("p", &["192.0.2.255-192.0.3.1"]);
    p.avoid_buggy_ips = true;
    assert_eq!(p.total(), 1);
    let mut a = alloc(vec![p]);
    assert_eq!(ips(&a.allocate(&svc("a").0).unwrap()), [ip("192.0.3.1")]);
    assert_eq!(
        a.allocate(&svc("b").0).unwrap_err().reason(),
        "PoolExhausted"
    );
}

#[test]
fn ipv6_and_dual_stack() {
    let mut a = alloc(vec![
        pool("v4", &["192.0.2.0/30"]),
        pool("v6", &["2001:db8::/64"]),
    ]);
    assert_eq!(
        ips(&a.allocate(&svc("six").v6().0).unwrap()),
        [ip("2001:db8::1")],
        "the subnet-router anycast address is not handed out"
    );
    let both = a
        .allocate(&svc("both").dual(IpFamilyPolicy::RequireDualStack).0)
        .unwrap();
    assert_eq!(ips(&both), [ip("192.0.2.0"), ip("2001:db8::2")]);
    // No IPv6 pool: PreferDualStack settles for IPv4, RequireDualStack fails.
    let mut b = alloc(vec![pool("v4", &["192.0.2.0/30"])]);
    assert_eq!(
        ips(&b
            .allocate(&svc("p").dual(IpFamilyPolicy::PreferDualStack).0)
            .unwrap()),
        [ip("192.0.2.0")]
    );
    let err = b
        .allocate(&svc("r").dual(IpFamilyPolicy::RequireDualStack).0)
        .unwrap_err();
    assert_eq!(err.reason(), "NoPoolForFamily");
    assert!(b.assigned("r").is_none());
    // An IPv6 pool appears: the PreferDualStack Service gains its second address.
    b.set_pools(
        vec![
            pool("v4", &["192.0.2.0/30"]),
            pool("v6", &["2001:db8::/120"]),
        ],
        Vec::new(),
    );
    assert_eq!(
        ips(&b
            .allocate(&svc("p").dual(IpFamilyPolicy::PreferDualStack).0)
            .unwrap()),
        [ip("192.0.2.0"), ip("2001:db8::1")]
    );
}

#[test]
fn restore_keeps_the_first_holder_and_refuses_duplicates() {
    let mut a = alloc(vec![pool("p", &["192.0.2.0/24"])]);
    a.restore(&svc("old").0, &[ip("192.0.2.9")]).unwrap();
    let err = a.restore(&svc("young").0, &[ip("192.0.2.9")]).unwrap_err();
    assert_eq!(err.reason(), "IPInUse");
    // The restored address is never handed out again.
    for n in 0..20 {
        let got = a.allocate(&svc(&format!("s{n}")).0).unwrap();
        assert_ne!(got[0].ip, ip("192.0.2.9"));
    }
}

#[test]
fn an_address_whose_pool_is_gone_is_replaced_but_an_unready_pool_keeps_it() {
    let mut a = alloc(vec![
        pool("old", &["192.0.2.0/30"]),
        pool("new", &["198.51.100.0/30"]),
    ]);
    a.allocate(&svc("a").pool("old").0).unwrap();
    // The pool becomes unready (say, an edit made it overlap): the address stays.
    a.set_pools(
        vec![pool("new", &["198.51.100.0/30"])],
        vec![("old".into(), vec!["192.0.2.0/30".parse().unwrap()])],
    );
    assert_eq!(ips(&a.allocate(&svc("a").0).unwrap()), [ip("192.0.2.0")]);
    // The pool is deleted: the Service moves to a pool that exists.
    a.set_pools(vec![pool("new", &["198.51.100.0/30"])], Vec::new());
    assert_eq!(ips(&a.allocate(&svc("a").0).unwrap()), [ip("198.51.100.0")]);
}

#[test]
fn usage_counts_shared_addresses_once() {
    let p = pool("p", &["192.0.2.0/29"]);
    let mut a = alloc(vec![p.clone()]);
    a.allocate(&svc("a").port(Protocol::Tcp, 1).share("k").0)
        .unwrap();
    a.allocate(&svc("b").port(Protocol::Tcp, 2).share("k").0)
        .unwrap();
    a.allocate(&svc("c").0).unwrap();
    assert_eq!(p.total(), 8);
    assert_eq!(a.allocated_in(&p), 2);
}

// Properties: across any sequence of allocate/release/restart, no address is held by two
// Services that cannot share, and requested addresses are honoured or refused, never replaced.

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        svc: u8,
        port: u16,
        key: Option<u8>,
        requested: Option<u8>,
    },
    Release(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12, 1u16..4, proptest::option::of(0u8..2), proptest::option::of(0u8..10))
            .prop_map(|(svc, port, key, requested)| Op::Allocate { svc, port, key, requested }),
        2 => (0u8..12).prop_map(Op::Release),
        1 => Just(Op::Restart),
    ]
}

fn request(svc: u8, port: u16, key: Option<u8>, requested: Option<u8>) -> AllocationRequest {
    let mut r = svc_req(svc);
    r.ports = vec![(Protocol::Tcp, port)];
    r.sharing_key = key.map(|k| format!("key{k}"));
    r.requested = requested
        .map(|o| vec![IpAddr::from([192, 0, 2, o])])
        .unwrap_or_default();
    r
}

fn svc_req(n: u8) -> AllocationRequest {
    svc(&format!("s{n}")).0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn no_address_is_ever_held_by_two_services_that_cannot_share(ops in proptest::collection::vec(op(), 1..60)) {
        let pools = || vec![pool("p", &["192.0.2.0-192.0.2.7"])];
        let mut a = alloc(pools());
        // What each Service last asked for, to restore after a "restart".
        let mut asked: BTreeMap<u8, AllocationRequest> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Allocate { svc, port, key, requested } => {
                    let req = request(svc, port, key, requested);
                    let before = a.assigned(&req.id.uid).map(<[_]>::to_vec);
                    match a.allocate(&req) {
                        Ok(got) => {
                            if let Some(r) = requested {
                                // Honoured exactly.
                                prop_assert_eq!(ips(&got), vec![IpAddr::from([192, 0, 2, r])]);
                            }
                            asked.insert(svc, req);
                        }
                        Err(_) => {
                            // Refused: nothing changed for this Service.
                            prop_assert_eq!(a.assigned(&req.id.uid).map(<[_]>::to_vec), before);
                        }
                    }
                }
                Op::Release(svc) => {
                    a.release(&format!("s{svc}"));
                    asked.remove(&svc);
                }
                Op::Restart => {
                    // Rebuild from "status": what each Service holds, oldest (lowest) first.
                    let held: Vec<(u8, Vec<IpAddr>)> = asked
                        .keys()
                        .filter_map(|s| a.assigned(&format!("s{s}")).map(|x| (*s, ips(x))))
                        .collect();
                    a = alloc(pools());
                    for (s, addrs) in held {
                        prop_assert!(a.restore(&asked[&s], &addrs).is_ok());
                    }
                }
            }
            // Invariant over the whole state.
            for (ip, holders) in &a.by_ip {
                let hs: Vec<_> = holders.values().collect();
                for i in 0..hs.len() {
                    for j in (i + 1)..hs.len() {
                        prop_assert!(hs[i].can_share_with(hs[j]), "{} held by {} and {}", ip, hs[i].id, hs[j].id);
                    }
                }
                prop_assert!(ip.is_ipv4());
            }
            for (uid, assigned) in &a.by_service {
                for x in assigned {
                    prop_assert!(a.by_ip.get(&x.ip).is_some_and(|h| h.contains_key(uid)));
                }
            }
        }
    }
}
