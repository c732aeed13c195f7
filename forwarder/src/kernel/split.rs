//! Which of a plan's frontends nftables serves on a kernel-mode node, and in what form: NAT
//! does not cross families and needs forwarding to reach another node, and the kernel cannot
//! write a PROXY protocol header, so those frontends go to the node's userspace side.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use ferry_model::Protocol;

use crate::plan::Frontend;

/// `f` as the kernel can serve it: backends of the VIP's family only (NAT does not cross
/// families), and at least one of them; `None` when it cannot. Borrowed when it can serve
/// `f` as it is (so a plan of thousands of frontends is not copied for every change).
pub(super) fn servable_one(f: &Frontend) -> Option<Cow<'_, Frontend>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend::for_test(vip, port, protocol, backends)
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
}
