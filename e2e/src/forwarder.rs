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
                        "--metrics-addr",
                        &format!("127.0.0.1:{METRICS_PORT}"),
                        "--health-addr",
                        &format!("127.0.0.1:{}", METRICS_PORT + 1),
                        "--health-check-interval",
                        "500ms",
                        "--health-check-timeout",
                        "400ms",
                    ])
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

/// `ferry-test-backend` in `ns` answering as `node`.
pub fn start_backend(
    dir: &Path,
    ns: &Netns,
    node: &str,
    tcp: &[u16],
    udp: &[u16],
    health: Option<u16>,
) -> anyhow::Result<ProcessUnderTest> {
    let program = binary("ferry-test-backend")?;
    let mut args = vec!["--name".to_string(), node.to_string()];
    for p in tcp {
        args.extend(["--tcp".into(), p.to_string()]);
    }
    for p in udp {
        args.extend(["--udp".into(), p.to_string()]);
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
