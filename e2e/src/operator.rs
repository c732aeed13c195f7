//! The operator under test as a real process: started with the operator's kubeconfig (so it
//! has exactly ferry's RBAC), killed with SIGKILL mid-work, stopped with SIGTERM, restarted.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use crate::control_plane::free_port;
use crate::process::ProcessUnderTest;

pub struct OperatorProcess {
    process: ProcessUnderTest,
    pub metrics_addr: SocketAddr,
}

impl Deref for OperatorProcess {
    type Target = ProcessUnderTest;
    fn deref(&self) -> &ProcessUnderTest {
        &self.process
    }
}

impl DerefMut for OperatorProcess {
    fn deref_mut(&mut self) -> &mut ProcessUnderTest {
        &mut self.process
    }
}

/// A binary of this workspace from the same cargo target folder as the running executable.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}; build it first (`cargo build --workspace --bins`)",
        exe.display()
    )
}

/// A distinct number for every log file this test binary writes.
pub fn next_log_number() -> u32 {
    static LOGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

/// A distinct leader-election identity for every process started by this test binary.
fn next_identity() -> String {
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    format!("operator-{}-{n}", std::process::id())
}

/// Flags every test operator gets unless the test names them itself: a Lease of its own
/// (so a test never waits for the Lease a killed operator of an earlier test left), and
/// short election timings (a restarted process waits a whole lease duration for the Lease
/// a SIGKILLed one held, as client-go's election does).
fn test_defaults(args: &[String]) -> Vec<String> {
    static LEASES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let given = |flag: &str| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let mut out = Vec::new();
    if !given("--leader-elect-lease-name") {
        let n = LEASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        out.extend([
            "--leader-elect-lease-name".to_string(),
            format!("ferry-operator-{}-{n}", std::process::id()),
        ]);
    }
    for (flag, value) in [
        ("--leader-elect-lease-duration", "4s"),
        ("--leader-elect-renew-deadline", "3s"),
        ("--leader-elect-retry-period", "500ms"),
    ] {
        if !given(flag) {
            out.extend([flag.to_string(), value.to_string()]);
        }
    }
    out
}

/// The chart's leader-election timings (15 s Lease, 10 s renew deadline, 2 s retry), for
/// tests whose faults must be measured against a real deployment's deadlines rather than
/// the tests' short defaults.
pub const CHART_ELECTION_TIMINGS: [&str; 6] = [
    "--leader-elect-lease-duration",
    "15s",
    "--leader-elect-renew-deadline",
    "10s",
    "--leader-elect-retry-period",
    "2s",
];

impl OperatorProcess {
    /// Starts the operator; `args` are extra flags.
    pub fn start(kubeconfig: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(kubeconfig, dir, args, &[])
    }

    /// Starts the operator with extra flags and environment variables.
    pub fn start_with_env(
        kubeconfig: &Path,
        dir: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let env = env.to_vec();
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let program = binary("ferry-operator")?;
        let kubeconfig = kubeconfig.to_path_buf();
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend(test_defaults(&args));
        let process = ProcessUnderTest::start(
            "operator's",
            dir.join(format!("operator-{}.log", next_log_number())),
            move || {
                let mut cmd = Command::new(&program);
                cmd.env("KUBECONFIG", &kubeconfig)
                    .env(
                        "FERRY_LOG",
                        "info,ferry_operator=debug,ferry_providers=debug",
                    )
                    .env("FERRY_LEADER_ELECT_IDENTITY", next_identity())
                    .args([
                        "--metrics-addr",
                        &metrics_addr.to_string(),
                        "--health-addr",
                        &format!("127.0.0.1:{}", free_port()?),
                        "--leader-elect-namespace",
                        "ferry-system",
                        "--node-debounce",
                        "200ms",
                    ])
                    .args(&args)
                    .envs(env.iter().map(|(k, v)| (k, v)));
                Ok(cmd)
            },
        )?;
        Ok(Self {
            process,
            metrics_addr,
        })
    }
}
