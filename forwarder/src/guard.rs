//! What a VIP exposes: only its Services. A VIP on the node's interface is a local address,
//! so without this every port a host process binds on 0.0.0.0 (sshd, the kubelet's 10250,
//! ferry's own metrics) would answer on it from wherever the VIP is reachable. One nftables
//! table, `inet ferry_guard`, in both data-plane modes, drops TCP, UDP and SCTP to a held VIP
//! on any (protocol, port) no Service of that VIP serves, and enforces
//! `loadBalancerSourceRanges` for the ports relayed in userspace (kernel mode drops those
//! before it steers). It filters at input, after NAT (traffic kernel mode steered to a
//! NodePort no longer has the VIP as its destination), and only new connections: replies to
//! connections the node opened itself pass. ICMP stays, for ping and path MTU.
//!
//! Where nftables cannot be programmed, nothing guards the VIPs; the forwarder says so once.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ferry_model::Protocol;

use crate::kernel::{self, KernelError, proto};
use crate::plan::Frontend;

pub const TABLE: &str = "ferry_guard";

/// The guard table for the VIPs `held`, exposing `exposed`; `relayed` are the frontends the
/// userspace side serves (their source ranges are enforced here).
pub fn ruleset(
    held: &BTreeSet<IpAddr>,
    exposed: &BTreeSet<(IpAddr, Protocol, u16)>,
    relayed: &[Frontend],
) -> String {
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    let mut rules = String::new();
    for (v6, fam, addr, concat) in [
        (
            false,
            "ip",
            "ipv4_addr",
            "ipv4_addr . inet_proto . inet_service",
        ),
        (
            true,
            "ip6",
            "ipv6_addr",
            "ipv6_addr . inet_proto . inet_service",
        ),
    ] {
        let vips: Vec<String> = held
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if vips.is_empty() {
            continue;
        }
        let n = if v6 { 6 } else { 4 };
        let _ = writeln!(
            s,
            "\tset vips{n} {{\n\t\ttype {addr}\n\t\telements = {{ {} }}\n\t}}",
            vips.join(", ")
        );
        let open: Vec<String> = exposed
            .iter()
            .filter(|(ip, _, _)| ip.is_ipv6() == v6 && held.contains(ip))
            .map(|(ip, p, port)| format!("{ip} . {} . {port}", proto(*p)))
            .collect();
        let _ = write!(s, "\tset exposed{n} {{\n\t\ttype {concat}\n");
        if !open.is_empty() {
            let _ = writeln!(s, "\t\telements = {{ {} }}", open.join(", "));
        }
        s.push_str("\t}\n");
        let _ = writeln!(
            rules,
            "\t\tmeta l4proto {{ tcp, udp, sctp }} {fam} daddr @vips{n} {fam} daddr . meta l4proto . th dport != @exposed{n} drop"
        );
    }
    for f in relayed.iter().filter(|f| held.contains(&f.vip)) {
        if let Some(rule) = kernel::source_range_rule(f) {
            let _ = writeln!(rules, "\t\t{rule}");
        }
    }
    // Replies to connections this node opened are not new traffic to the VIP, whatever
    // source address the kernel picked for them (IPv6 prefers a /128 VIP over the node's
    // /64 address for its neighbours on the link).
    let _ = writeln!(
        s,
        "\tchain input {{\n\t\ttype filter hook input priority -5; policy accept;\n\t\tct state established,related accept\n{rules}\t}}"
    );
    s.push_str("}\n");
    s
}

/// Keeps the guard table current.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    applied: Option<String>,
}

impl Guard {
    /// Whether nftables can hold the guard here.
    pub async fn probe() -> Result<(), KernelError> {
        crate::nft::run(&ruleset(&BTreeSet::new(), &BTreeSet::new(), &[])).await?;
        crate::nft::run(&format!("delete table inet {TABLE}\n")).await
    }

    /// Replaces the table (nothing to do when unchanged).
    pub async fn apply(
        &mut self,
        held: &BTreeSet<IpAddr>,
        exposed: &BTreeSet<(IpAddr, Protocol, u16)>,
        relayed: &[Frontend],
    ) -> Result<(), KernelError> {
        let script = ruleset(held, exposed, relayed);
        if self.applied.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        crate::nft::run(&script).await?;
        self.applied = Some(script);
        Ok(())
    }

    /// Removes the table.
    pub async fn clear(&mut self) -> Result<(), KernelError> {
        self.applied = None;
        crate::nft::run(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::process::Command;

    fn held(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn only_the_services_ports_are_open_on_a_held_vip() {
        let exposed = [
            ("192.0.2.10".parse().unwrap(), Protocol::Tcp, 80),
            ("192.0.2.10".parse().unwrap(), Protocol::Udp, 53),
            // Not held here: not this node's business.
            ("192.0.2.99".parse().unwrap(), Protocol::Tcp, 80),
        ]
        .into();
        let r = ruleset(&held(&["192.0.2.10"]), &exposed, &[]);
        assert!(r.contains("elements = { 192.0.2.10 }"), "{r}");
        assert!(
            r.contains("elements = { 192.0.2.10 . tcp . 80, 192.0.2.10 . udp . 53 }"),
            "{r}"
        );
        assert!(!r.contains("192.0.2.99"), "{r}");
        assert!(
            r.contains("ip daddr . meta l4proto . th dport != @exposed4 drop"),
            "{r}"
        );
        assert!(!r.contains("vips6"), "no IPv6 VIP, no IPv6 rule: {r}");
    }

    /// The guard with every kind of rule, committed by the kernel in a network namespace
    /// of its own.
    #[tokio::test]
    async fn the_kernel_accepts_the_guard() {
        let exposed = [
            ("192.0.2.10".parse().unwrap(), Protocol::Tcp, 80),
            ("2001:db8::10".parse().unwrap(), Protocol::Udp, 53),
        ]
        .into();
        let mut relayed = Frontend::for_test("192.0.2.10", 80, Protocol::Tcp, &[]);
        relayed.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let script = ruleset(
            &held(&["192.0.2.10", "2001:db8::10", "192.0.2.11"]),
            &exposed,
            &[relayed],
        );
        let Ok(mut child) = Command::new("unshare")
            .args(["--net", "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipped: no unshare");
            return;
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await.unwrap();
        }
        let out = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.starts_with("unshare:") {
            eprintln!("skipped: {stderr}");
            return;
        }
        assert!(out.status.success(), "{stderr}\n{script}");
    }
}
