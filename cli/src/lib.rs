//! The `ferry` command line (also installed as `kubectl-ferry`): flags and dispatch only.
//! `explain` says, from API state alone, why a LoadBalancer Service does or does not work;
//! `migrate` turns MetalLB configuration into `LoadBalancerPool`s.

pub mod explain;
pub mod migrate;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// ferry's command line: look at a Service as ferry sees it, or migrate from MetalLB.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Why a LoadBalancer Service does or does not work: owner, address, nodes, conditions.
    Explain(ExplainArgs),
    /// MetalLB IPAddressPools and L2Advertisements as ferry LoadBalancerPools (YAML on
    /// stdout, what could not be carried over on stderr).
    Migrate(MigrateArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    Text,
    /// The explanation as JSON (a stable structure, see README "ferry explain").
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The Service: `svc/NAME`, `service/NAME` or `NAME`.
    pub service: String,

    /// The Service's namespace.
    #[arg(short, long, env = "FERRY_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Where the forwarders' heartbeat Leases live.
    #[arg(
        long,
        env = "FERRY_FORWARDER_NAMESPACE",
        default_value = "ferry-system"
    )]
    pub forwarder_namespace: String,

    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// A file of MetalLB resources (multi-document YAML, or a List); `-` reads stdin.
    /// Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        required_unless_present = "from_cluster"
    )]
    pub files: Vec<PathBuf>,

    /// Read MetalLB's resources (and Services' annotations) from the cluster instead.
    #[arg(long, conflicts_with = "files")]
    pub from_cluster: bool,

    /// MetalLB's namespace, with `--from-cluster`.
    #[arg(long, env = "METALLB_NAMESPACE", default_value = "metallb-system")]
    pub metallb_namespace: String,
}

/// How long a command waits for the API server before it gives up with one line.
const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `read`, a conversation with the API server, bounded by `API_TIMEOUT`.
pub(crate) async fn from_api<T>(
    read: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(API_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("the API server did not answer within {API_TIMEOUT:?}"))?
}

/// The service name of `svc/NAME`, `service/NAME`, `services/NAME` or `NAME`.
pub fn service_name(arg: &str) -> Result<&str, String> {
    let name = match arg.split_once('/') {
        None => arg,
        Some(("svc" | "service" | "services", name)) => name,
        Some((kind, _)) => {
            return Err(format!(
                "{arg:?}: only Services can be explained (svc/NAME), not {kind:?}"
            ));
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!("{arg:?} is not a Service name (svc/NAME or NAME)"));
    }
    Ok(name)
}

/// The `ferry` and `kubectl-ferry` binaries: parse flags (a bad flag is one line, exit 2),
/// run, exit 1 with one line on failure.
pub fn main() {
    let cli: Cli = ferry_runtime::or_exit(ferry_runtime::parse_args(std::env::args_os()));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => ferry_runtime::exit_with(&anyhow::Error::new(err)),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Explain(args) => explain::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
        }
    });
    if let Err(err) = result {
        ferry_runtime::exit_with(&err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_arguments_in_kubectl_shapes() {
        assert_eq!(service_name("svc/web"), Ok("web"));
        assert_eq!(service_name("service/web"), Ok("web"));
        assert_eq!(service_name("web"), Ok("web"));
        assert!(service_name("pod/web").is_err());
        assert!(service_name("svc/").is_err());
    }

    #[test]
    fn bad_flags_are_one_line() {
        let err =
            ferry_runtime::parse_args::<Cli, _, _>(["ferry", "explain", "web", "-o", "xml"]).err();
        match err {
            Some(ferry_runtime::ParseOutcome::Error(line)) => {
                assert!(line.contains("xml"), "{line}");
                assert!(!line.contains('\n'));
            }
            other => panic!("{other:?}"),
        }
    }
}
