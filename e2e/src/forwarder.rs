//! Forwarders and NodePort backends inside node namespaces. A forwarder runs as
//! `ip netns exec <node> ferry-forwarder`, under the forwarders' identity (exactly ferry's
//! RBAC), reaching the control plane through an `ApiRelay` in its namespace.

use std::ops::{Deref, DerefMut};
use std::path::Path;

use crate::control_plane::ControlPlane;
use crate::netns::{ApiRelay, Netns};
use crate::operator::{binary, next_log_number};
use crate::process::ProcessUnderTest;

/// Port of the forwarder's metrics and health endpoints inside its namespace.
pub const METRICS_PORT: u16 = 9470;

pub struct ForwarderProcess {
    process: ProcessUnderTest,
    pub node: String,
    ns: String,
    _relay: ApiRelay,
}

impl Deref for ForwarderProcess {
    type Target = ProcessUnderTest;
    fn deref(&self) -> &ProcessUnderTest {
        &self.process
    }
}

impl DerefMut for ForwarderProcess {
    fn deref_mut(&mut self) -> &mut ProcessUnderTest {
        &mut self.process
    }
}

impl ForwarderProcess {
    /// Starts the forwarder of `node` inside `ns`; `args` are extra flags.
    pub fn start(cp: &ControlPlane, ns: &Netns, node: &str, args: &[&str]) -> anyhow::Result<Self> {
        let relay = ApiRelay::start(ns, ([127, 0, 0, 1], cp.port).into())?;
        let kubeconfig = cp.dir.join(format!("forwarder-{}.kubeconfig", ns.name));
        std::fs::write(
            &kubeconfig,
            cp.kubeconfig_via(
                &format!("https://127.0.0.1:{}", relay.port),
                &cp.forwarder_token,
            ),
        )?;
        let program = binary("ferry-forwarder")?;
        let (ns_name, node_name) = (ns.name.clone(), node.to_string());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // The endpoints on the namespace's loopback, unless the test binds them elsewhere.
        let metrics_addr = if args.iter().any(|a| a == "--metrics-addr") {
            Vec::new()
        } else {
            vec![
                "--metrics-addr".to_string(),
                format!("127.0.0.1:{METRICS_PORT}"),
            ]
        };
        let process = ProcessUnderTest::start(
            &format!("forwarder ({node})"),
            cp.dir
                .join(format!("forwarder-{node}-{}.log", next_log_number())),
            move || {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", &ns_name])
                    .arg(&program)
                    .env("KUBECONFIG", &kubeconfig)
                    .env("FERRY_LOG", "info,ferry_forwarder=debug")
                    .args([
                        "--node-name",
                        &node_name,
                        "--lease-namespace",
                        "ferry-system",
                        "--health-addr",
                        &format!("127.0.0.1:{}", METRICS_PORT + 1),
                        "--health-check-interval",
                        "500ms",
                        "--health-check-timeout",
                        "400ms",
                    ])
                    .args(&metrics_addr)
                    .args(&args);
                Ok(cmd)
            },
        )?;
        Ok(Self {
            process,
            node: node.to_string(),
            ns: ns.name.clone(),
            _relay: relay,
        })
    }

    /// The forwarder's `/metrics` text (fetched from inside its namespace).
    pub fn metrics(&self) -> anyhow::Result<String> {
        crate::netns::ip(&[
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sf",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{METRICS_PORT}/metrics"),
        ])
    }

    /// The values of every metric line starting with `series` (empty when none can be read).
    pub fn metric_values(&self, series: &str) -> Vec<f64> {
        self.metrics()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    }

    /// The value of the first metric line starting with `series`, if any.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metric_values(series).first().copied()
    }

    /// How many other forwarders this one counts in `state` (`heard`, `silent`, `unheard`),
    /// from `ferry_forwarder_peers`.
    pub fn peers(&self, state: &str) -> Option<f64> {
        self.metric(&format!("ferry_forwarder_peers{{state=\"{state}\"}}"))
    }

    /// Resident memory of the forwarder process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// How a node serves its NodePorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePorts {
    /// The backend listens on the NodePorts itself, on every address of the node.
    Listening,
    /// As kube-proxy does it: nothing listens on a NodePort; NAT rules (kube-proxy's
    /// nftables mode, at its priority) send the NodePort's traffic, arriving or sent from the
    /// node itself, to a pod address on the node, where the backend listens on the NodePort
    /// plus `POD_PORT_OFFSET`.
    KubeProxy,
}

/// The pod's port for a NodePort, under `NodePorts::KubeProxy`.
pub const POD_PORT_OFFSET: u16 = 10_000;

/// The pod address of node `ns` under `NodePorts::KubeProxy`: `10.244.<its eth0 address's
/// last octet>.10`, on its loopback.
fn pod_address(ns: &Netns) -> anyhow::Result<String> {
    let addrs = ns.addresses("eth0")?;
    let last = addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.rsplit('.').next())
        .ok_or_else(|| anyhow::anyhow!("no IPv4 address on eth0 of {}", ns.name))?;
    Ok(format!("10.244.{last}.10"))
}

/// Installs the kube-proxy stand-in of `NodePorts::KubeProxy` in `ns` (replacing an
/// earlier one); returns the pod address.
fn nat_nodeports(ns: &Netns, tcp: &[u16], udp: &[u16]) -> anyhow::Result<String> {
    let pod = pod_address(ns)?;
    ns.ip(&["addr", "replace", &format!("{pod}/32"), "dev", "lo"])?;
    let mut rules = String::new();
    for (proto, ports) in [("tcp", tcp), ("udp", udp)] {
        for port in ports {
            rules.push_str(&format!(
                "\t\t{proto} dport {port} dnat to {pod}:{}\n",
                port + POD_PORT_OFFSET
            ));
        }
    }
    let script = format!(
        "table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {{\n\
         \tchain nodeports {{\n{rules}\t}}\n\
         \tchain nat-prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tfib daddr type local jump nodeports\n\t}}\n\
         \tchain nat-output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tfib daddr type local jump nodeports\n\t}}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("{}-kube-proxy.nft", ns.name));
    std::fs::write(&file, script)?;
    let applied = ns.exec("nft", &["-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    applied?;
    Ok(pod)
}

/// `ferry-test-backend` in `ns` answering as `node`, on the NodePorts `tcp` and `udp` served
/// as `nodeports` says, and a health-check port (a listener, as kube-proxy's is).
pub fn start_backend(
    dir: &Path,
    ns: &Netns,
    node: &str,
    tcp: &[u16],
    udp: &[u16],
    health: Option<u16>,
    nodeports: NodePorts,
) -> anyhow::Result<ProcessUnderTest> {
    let program = binary("ferry-test-backend")?;
    let mut args = vec!["--name".to_string(), node.to_string()];
    let offset = match nodeports {
        NodePorts::Listening => 0,
        NodePorts::KubeProxy => {
            args.extend(["--address".into(), nat_nodeports(ns, tcp, udp)?]);
            POD_PORT_OFFSET
        }
    };
    for p in tcp {
        args.extend(["--tcp".into(), (p + offset).to_string()]);
    }
    for p in udp {
        args.extend(["--udp".into(), (p + offset).to_string()]);
    }
    if let Some(p) = health {
        args.extend(["--health".into(), p.to_string()]);
    }
    let ns_name = ns.name.clone();
    ProcessUnderTest::start(
        &format!("backend ({node})"),
        dir.join(format!("backend-{node}-{}.log", next_log_number())),
        move || {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &ns_name])
                .arg(&program)
                .args(&args);
            Ok(cmd)
        },
    )
}
