//! The kernel data plane: one nftables table, `inet ferry`, replaced atomically (a single
//! `nft -f` transaction) whenever the frontends change. Traffic to a VIP port is DNATed to a
//! backend NodePort, spread by `numgen` (round robin). ClientIP affinity keeps a set of recent
//! clients per backend whose elements expire after the Service's timeout (refreshed by each new
//! connection), so a returning client goes back to its backend and a client quiet for longer is
//! spread anew; the sets start empty whenever this node's table is replaced. Connections sent
//! to another node are masqueraded so replies come back through this one; with
//! `externalTrafficPolicy: Local` the backend is this node and the client's address is kept.
//! Source ranges are enforced by a filter chain ahead of NAT.
//!
//! The ruleset is text for the `nft` tool, the interface kube-proxy's nftables mode uses too;
//! `ruleset` is pure and carries the tests.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Stdio;

use ferry_providers::Protocol;
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

/// The whole `inet ferry` table for `frontends`, as one transaction that replaces the old
/// table (creating it first, so deleting never fails).
pub fn ruleset(frontends: &[Frontend]) -> String {
    let frontends = servable(frontends);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    let mut dispatch = String::new();
    let mut filter = String::new();
    let mut chains = String::new();
    let mut backend_chains = String::new();
    let mut sets = String::new();
    for (i, f) in frontends.iter().enumerate() {
        let (fam, _) = family_words(&f.vip);
        let p = proto(f.protocol);
        let _ = writeln!(
            dispatch,
            "\t\t{fam} daddr {} {p} dport {} goto fe_{i}",
            f.vip, f.port
        );
        if !f.source_ranges.is_empty() {
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
            let _ = writeln!(
                filter,
                "\t\t{fam} daddr {} {p} dport {}{allowed} drop",
                f.vip, f.port
            );
        }
        let _ = writeln!(chains, "\tchain fe_{i} {{");
        let _ = writeln!(
            chains,
            "\t\tcomment \"{} {}/{}\"",
            f.service,
            f.port,
            p.to_uppercase()
        );
        if !f.local {
            let _ = writeln!(chains, "\t\tmeta mark set {MASQUERADE_MARK}");
        }
        let target = |b: &std::net::SocketAddr| format!("{} . {}", b.ip(), b.port());
        let single = |b: &std::net::SocketAddr| match b {
            std::net::SocketAddr::V4(b) => format!("{b}"),
            std::net::SocketAddr::V6(b) => format!("[{}]:{}", b.ip(), b.port()),
        };
        match (f.backends.as_slice(), f.affinity) {
            ([only], _) => {
                let _ = writeln!(
                    chains,
                    "\t\tmeta l4proto {p} dnat {fam} to {}",
                    single(only)
                );
            }
            (backends, Some(timeout)) => {
                // As kube-proxy's nftables mode: a set of recent clients per backend, each
                // element living `timeout` past the client's last new connection. A known
                // client goes back to its backend; a new one is spread and remembered.
                let secs = timeout.as_secs().max(1);
                let addr_type = if f.vip.is_ipv6() {
                    "ipv6_addr"
                } else {
                    "ipv4_addr"
                };
                let mut vmap = Vec::new();
                for (j, b) in backends.iter().enumerate() {
                    let _ = writeln!(
                        sets,
                        "\tset aff_{i}_{j} {{\n\t\ttype {addr_type}\n\t\tflags dynamic,timeout\n\t\ttimeout {secs}s\n\t\tsize {AFFINITY_CLIENTS}\n\t}}"
                    );
                    let _ = writeln!(chains, "\t\t{fam} saddr @aff_{i}_{j} goto be_{i}_{j}");
                    let _ = writeln!(
                        backend_chains,
                        "\tchain be_{i}_{j} {{\n\t\tupdate @aff_{i}_{j} {{ {fam} saddr }}\n\t\tmeta l4proto {p} dnat {fam} to {}\n\t}}",
                        single(b)
                    );
                    vmap.push(format!("{j} : goto be_{i}_{j}"));
                }
                let _ = writeln!(
                    chains,
                    "\t\tnumgen inc mod {} vmap {{ {} }}",
                    backends.len(),
                    vmap.join(", ")
                );
            }
            (backends, None) => {
                let map: Vec<String> = backends
                    .iter()
                    .enumerate()
                    .map(|(j, b)| format!("{j} : {}", target(b)))
                    .collect();
                let _ = writeln!(
                    chains,
                    "\t\tmeta l4proto {p} dnat {fam} to numgen inc mod {} map {{ {} }}",
                    backends.len(),
                    map.join(", ")
                );
            }
        }
        let _ = writeln!(chains, "\t}}");
    }
    let _ = writeln!(
        s,
        "\tchain filter {{\n\t\ttype filter hook prerouting priority -110; policy accept;\n{filter}\t}}"
    );
    for hook in ["prerouting", "output"] {
        let _ = writeln!(
            s,
            "\tchain {hook} {{\n\t\ttype nat hook {hook} priority -105; policy accept;\n{dispatch}\t}}"
        );
    }
    let _ = writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority 105; policy accept;\n\t\tmeta mark {MASQUERADE_MARK} masquerade\n\t}}"
    );
    s.push_str(&sets);
    s.push_str(&chains);
    s.push_str(&backend_chains);
    s.push_str("}\n");
    s
}

async fn nft(script: &str) -> Result<(), KernelError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(KernelError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Programs the node's nftables.
#[derive(Debug, Default)]
pub struct Kernel {
    applied: Option<String>,
}

impl Kernel {
    /// Whether this node lets us program nftables: `nft` runs and accepts our table.
    pub async fn probe() -> Result<(), KernelError> {
        nft(&ruleset(&[])).await?;
        nft(&format!("delete table inet {TABLE}\n")).await
    }

    /// Replaces the table with one for `frontends` (nothing to do when unchanged).
    pub async fn apply(&mut self, frontends: &[Frontend]) -> Result<(), KernelError> {
        let script = ruleset(frontends);
        if self.applied.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        nft(&script).await?;
        self.applied = Some(script);
        Ok(())
    }

    /// Removes the table.
    pub async fn clear(&mut self) -> Result<(), KernelError> {
        self.applied = None;
        nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::HealthCheck;
    use std::time::Duration;

    fn frontend(vip: &str, port: u16, protocol: Protocol, backends: &[&str]) -> Frontend {
        Frontend {
            service: "default/web".into(),
            vip: vip.parse().unwrap(),
            port,
            protocol,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            health: HealthCheck::Connect,
            affinity: None,
            proxy_protocol: false,
            source_ranges: vec![],
            local: false,
        }
    }

    #[test]
    fn round_robin_dnat_with_masquerade() {
        let r = ruleset(&[frontend(
            "192.0.2.10",
            80,
            Protocol::Tcp,
            &["10.0.0.1:30080", "10.0.0.2:30080"],
        )]);
        assert!(
            r.contains("ip daddr 192.0.2.10 tcp dport 80 goto fe_0"),
            "{r}"
        );
        assert!(r.contains("meta mark set 0x66657279"));
        assert!(r.contains(
            "meta l4proto tcp dnat ip to numgen inc mod 2 map { 0 : 10.0.0.1 . 30080, 1 : 10.0.0.2 . 30080 }"
        ));
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
        let r = ruleset(&[local, sticky]);
        let fe0 = &r[r.find("chain fe_0").unwrap()..r.find("chain fe_1").unwrap()];
        assert!(!fe0.contains("meta mark set"), "{fe0}");
        assert!(fe0.contains("meta l4proto udp dnat ip to 10.0.0.2:30053"));
        // The IPv4 backend cannot serve an IPv6 VIP in the kernel: two backends, each with
        // its set of recent clients expiring after the Service's timeout.
        let fe1 = &r[r.find("chain fe_1").unwrap()..];
        assert!(fe1.contains("ip6 saddr @aff_1_0 goto be_1_0"), "{r}");
        assert!(fe1.contains("ip6 saddr @aff_1_1 goto be_1_1"), "{r}");
        assert!(!fe1.contains("aff_1_2"), "{r}");
        assert!(
            fe1.contains("numgen inc mod 2 vmap { 0 : goto be_1_0, 1 : goto be_1_1 }"),
            "{r}"
        );
        assert!(
            r.contains(
                "set aff_1_1 {\n\t\ttype ipv6_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 60s\n"
            ),
            "{r}"
        );
        assert!(r.contains(
            "chain be_1_1 {\n\t\tupdate @aff_1_1 { ip6 saddr }\n\t\tmeta l4proto tcp dnat ip6 to [2001:db8::2]:30443\n"
        ), "{r}");
    }

    #[test]
    fn source_ranges_drop_everyone_else() {
        let mut f = frontend("192.0.2.10", 80, Protocol::Tcp, &["10.0.0.1:30080"]);
        f.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let r = ruleset(&[f]);
        assert!(
            r.contains("ip daddr 192.0.2.10 tcp dport 80 ip saddr != { 198.51.100.0/24 } drop"),
            "{r}"
        );
    }

    #[test]
    fn an_empty_plan_leaves_an_empty_table() {
        let r = ruleset(&[]);
        assert!(r.starts_with("table inet ferry\ndelete table inet ferry\n"));
        assert!(!r.contains("goto"));
    }
}
