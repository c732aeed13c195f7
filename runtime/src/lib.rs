//! What every ferry process does the same way: a bad flag is one line and exit code 2
//! (`parse_args`), logs go through `tracing` (text for people, JSON for pipelines), the
//! Kubernetes client (`kube_client`), the HTTP endpoints in `server`, and SIGTERM or Ctrl-C
//! ends it (`shutdown_signal`). The operator and
//! the forwarder each keep their own metrics; this crate serves their encoded text and adds
//! the one series both carry, `ferry_build_info` (`build_info`).

pub mod build_info;
pub mod server;

use std::time::Duration;

use anyhow::Context as _;
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sets up logging with `filter` (tracing's EnvFilter syntax) in `format`.
pub fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// A Kubernetes client from the ambient configuration (KUBECONFIG, ~/.kube/config or
/// in-cluster) that does not retry throttled requests by itself. kube's default retry layer
/// retries 429, 503 and 504 up to 15 times with a backoff that doubles past the server's
/// Retry-After, holding the caller for minutes under sustained throttling (one reconcile, one
/// heartbeat renewal); ferry's callers retry on their own schedule instead: the operator per
/// Service after the server's Retry-After, the forwarder at its next renewal.
pub async fn kube_client() -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no usable Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    config.default_retry = false;
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// A clap value parser for durations such as `500ms`, `15s`, `10m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 15s, 10m)"))
}

/// What to do instead of running.
#[derive(Debug)]
pub enum ParseOutcome {
    /// `--help` or `--version`: print this and exit 0.
    Print(String),
    /// A bad flag: print this single line and exit 2.
    Error(String),
}

/// Parses `args` into `P`; on a bad or missing flag returns the message as one line.
pub fn parse_args<P, I, T>(args: I) -> Result<P, ParseOutcome>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    P::try_parse_from(args).map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp
        | clap::error::ErrorKind::DisplayVersion
        | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            ParseOutcome::Print(e.to_string())
        }
        _ => ParseOutcome::Error(one_line(&e.to_string())),
    })
}

/// clap's message up to its usage block, on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.trim_start().starts_with("Usage:") && !l.starts_with("For more"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The parsed flags, or the process's exit: help and version print and exit 0, a bad flag
/// is one line on stderr and exit code 2.
pub fn or_exit<C>(parsed: Result<C, ParseOutcome>) -> C {
    match parsed {
        Ok(c) => c,
        Err(ParseOutcome::Print(text)) => {
            print!("{text}");
            std::process::exit(0);
        }
        Err(ParseOutcome::Error(line)) => {
            eprintln!("{line}");
            std::process::exit(2);
        }
    }
}

/// Prints a fatal error as one line (the outermost context says what failed, the root cause
/// why; kube's own messages already repeat their sources, so the full chain would be a wall
/// of text) and exits 1.
pub fn exit_with(err: &anyhow::Error) -> ! {
    let root = err.root_cause().to_string();
    if root == err.to_string() {
        eprintln!("error: {err}");
    } else {
        eprintln!("error: {err}: {root}");
    }
    std::process::exit(1);
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
