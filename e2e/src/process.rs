//! A ferry process under test (operator, forwarder, test backend): started from a command
//! that can be rebuilt for restarts, logging to a file, killed with SIGKILL as a crash would,
//! stopped with SIGTERM as Kubernetes would, and killed with the test process. When a test
//! panics, the last lines of the log are printed.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::control_plane::die_with_parent;

type MakeCommand = Box<dyn Fn() -> anyhow::Result<Command> + Send + Sync>;

pub struct ProcessUnderTest {
    what: String,
    child: Option<Child>,
    pub log: PathBuf,
    command: MakeCommand,
    /// Dropped with SIGTERM rather than SIGKILL.
    graceful: bool,
}

impl ProcessUnderTest {
    /// Starts `command()`, appending its output to `log`.
    pub fn start(
        what: &str,
        log: PathBuf,
        command: impl Fn() -> anyhow::Result<Command> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let mut me = Self {
            what: what.to_string(),
            child: None,
            log,
            command: Box::new(command),
            graceful: false,
        };
        me.spawn()?;
        Ok(me)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = (self.command)()?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.what))?,
        );
        Ok(())
    }

    /// Stopped with SIGTERM when dropped: for programs whose children outlive a SIGKILLed
    /// parent (nginx's workers).
    pub fn terminated_on_drop(mut self) -> Self {
        self.graceful = true;
        self
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
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Kills and starts again with the same command.
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

impl Drop for ProcessUnderTest {
    fn drop(&mut self) {
        if self.graceful {
            self.terminate();
        } else {
            self.kill();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of the {} log ({}) ---\n{}",
                self.what,
                self.log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}
