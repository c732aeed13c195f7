//! The operator under test as a real process: started with the operator's kubeconfig (so it
//! has exactly ferry's RBAC), killed with SIGKILL mid-work, stopped with SIGTERM, restarted.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

use crate::control_plane::{die_with_parent, free_port};

pub struct OperatorProcess {
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics_addr: SocketAddr,
    kubeconfig: PathBuf,
    args: Vec<String>,
}

/// `ferry-operator` from the same cargo target folder as the running executable.
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

fn next_log_number() -> u32 {
    static LOGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

/// A distinct leader-election identity for every process started by this test binary.
fn next_identity() -> String {
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    format!("operator-{}-{n}", std::process::id())
}

impl OperatorProcess {
    /// Starts the operator; `args` are extra flags.
    pub fn start(kubeconfig: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut me = Self {
            child: None,
            log: dir.join(format!("operator-{}.log", next_log_number())),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            kubeconfig: kubeconfig.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        me.spawn()?;
        Ok(me)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(binary("ferry-operator")?);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env(
                "FERRY_LOG",
                "info,ferry_operator=debug,ferry_providers=debug",
            )
            .env("FERRY_LEADER_ELECT_IDENTITY", next_identity())
            .args([
                "--metrics-addr",
                &self.metrics_addr.to_string(),
                "--health-addr",
                &format!("127.0.0.1:{}", free_port()?),
                "--leader-elect-namespace",
                "ferry-system",
                "--node-debounce",
                "200ms",
            ])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().context("starting ferry-operator")?);
        Ok(())
    }

    /// SIGKILL: no chance to clean up, as a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as a rolling update does; waits up to 15 s for the exit, then SIGKILLs.
    /// Returns the exit status of a clean exit, `None` if it had to be killed.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of the operator's log ({}) ---\n{}",
                self.log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}
