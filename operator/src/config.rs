//! The operator's configuration: one struct, parsed by clap, every flag also read from an
//! environment variable. Nothing deeper in the code reads the environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

pub use ferry_providers::registry::{ProviderArgs, ProviderKind};

pub use ferry_runtime::LogFormat;

pub use ferry_runtime::ParseOutcome;
use ferry_runtime::duration;

/// ferry: `type: LoadBalancer` Services on AWS, GCE and clusters without a cloud.
#[derive(Clone, Debug, Parser)]
#[command(name = "ferry-operator", version, about, long_about = None)]
pub struct Config {
    /// The provider, and each built-in provider's own flags (under their own headings).
    #[command(flatten)]
    pub provider: ProviderArgs,

    /// The `spec.loadBalancerClass` this operator serves [default: ferry.dev/<provider>].
    #[arg(long, env = "FERRY_LOAD_BALANCER_CLASS")]
    pub load_balancer_class: Option<String>,

    /// Also serve LoadBalancer Services that name no class (ferry is the cluster's default
    /// implementation).
    #[arg(long, env = "FERRY_DEFAULT_CLASS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub default_class: bool,

    /// Identifies this cluster in everything ferry creates in a cloud, so that orphan
    /// collection never touches another cluster's balancers. Required by the cloud providers.
    #[arg(long, env = "FERRY_CLUSTER_ID", value_parser = cluster_id)]
    pub cluster_id: Option<String>,

    /// Elect a leader on a coordination.k8s.io Lease; only the leader reconciles.
    #[arg(long, env = "FERRY_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "FERRY_LEADER_ELECT_LEASE_NAME",
        default_value = "ferry-operator"
    )]
    pub leader_elect_lease_name: String,

    /// Namespace of the leader-election Lease [default: the pod's namespace, else ferry-system].
    #[arg(long, env = "FERRY_LEADER_ELECT_NAMESPACE")]
    pub leader_elect_namespace: Option<String>,

    /// How long a leader's claim lasts without renewal.
    #[arg(long, env = "FERRY_LEADER_ELECT_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub leader_elect_lease_duration: Duration,

    /// How long the leader keeps trying to renew before it gives up leadership.
    #[arg(long, env = "FERRY_LEADER_ELECT_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    pub leader_elect_renew_deadline: Duration,

    /// How often candidates try to acquire and the leader renews.
    #[arg(long, env = "FERRY_LEADER_ELECT_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    pub leader_elect_retry_period: Duration,

    /// Identity in the Lease [default: the pod name (POD_NAME), else the host name].
    #[arg(long, env = "FERRY_LEADER_ELECT_IDENTITY")]
    pub leader_elect_identity: Option<String>,

    /// Address of the Prometheus metrics endpoint (`/metrics`).
    #[arg(long, env = "FERRY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Address of the health endpoints (`/healthz`, `/readyz`).
    #[arg(long, env = "FERRY_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,

    /// Services reconciled at the same time.
    #[arg(long, env = "FERRY_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Node changes within this window are applied to balancers in one pass.
    #[arg(long, env = "FERRY_NODE_DEBOUNCE", default_value = "1s", value_parser = duration)]
    pub node_debounce: Duration,

    /// How often every balancer is re-ensured even if nothing changed.
    #[arg(long, env = "FERRY_RESYNC_PERIOD", default_value = "10m", value_parser = duration)]
    pub resync_period: Duration,

    /// How often balancers whose Service is gone are looked for and deleted.
    #[arg(long, env = "FERRY_ORPHAN_INTERVAL", default_value = "10m", value_parser = duration)]
    pub orphan_interval: Duration,

    /// Log format.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    pub log_filter: String,
}

fn cluster_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err("must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'".into())
    }
}

impl Config {
    /// The class this operator serves.
    pub fn class(&self) -> String {
        self.load_balancer_class
            .clone()
            .unwrap_or_else(|| format!("ferry.dev/{}", self.provider.kind.as_str()))
    }

    /// The cluster id, `ferry` for the local provider when none is given.
    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .clone()
            .unwrap_or_else(|| "ferry".to_string())
    }

    /// Parses `args`; on a bad or missing flag, or flags that cannot work together, returns
    /// the message as one line.
    pub fn parse_args<I, T>(args: I) -> Result<Config, ParseOutcome>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config: Config = ferry_runtime::parse_args(args)?;
        let kind = config.provider.kind;
        if kind.in_a_cloud() && config.cluster_id.is_none() {
            return Err(ParseOutcome::Error(format!(
                "error: --provider {} needs --cluster-id (FERRY_CLUSTER_ID): it names and tags everything ferry creates in the cloud",
                kind.as_str()
            )));
        }
        if config.leader_elect {
            crate::leader::validate_timing(
                config.leader_elect_lease_duration,
                config.leader_elect_renew_deadline,
                config.leader_elect_retry_period,
            )
            .map_err(|e| ParseOutcome::Error(format!("error: {e}")))?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ParseOutcome> {
        Config::parse_args(std::iter::once("ferry-operator").chain(args.iter().copied()))
    }

    fn error(args: &[&str]) -> String {
        match parse(args) {
            Err(ParseOutcome::Error(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_serve_the_local_class_and_unclassed_services() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.provider.kind, ProviderKind::Local);
        assert_eq!(c.class(), "ferry.dev/local");
        assert!(c.default_class);
        assert!(c.leader_elect);
        assert_eq!(c.node_debounce, Duration::from_secs(1));
    }

    #[test]
    fn bad_flags_are_one_line_errors() {
        let e = error(&["--provider", "azure"]);
        assert!(!e.contains('\n'));
        assert!(e.contains("azure") && e.contains("local"), "{e}");
        let e = error(&["--node-debounce", "soon"]);
        assert!(!e.contains('\n') && e.contains("--node-debounce"), "{e}");
        let e = error(&["--aws-api-rate", "0"]);
        assert!(e.contains("--aws-api-rate"), "{e}");
        let e = error(&["--concurrency", "0"]);
        assert!(e.contains("--concurrency"), "{e}");
        let e = error(&["--default-class", "maybe"]);
        assert!(e.contains("--default-class"), "{e}");
        let e = error(&["--leader-elect-renew-deadline", "20s"]);
        assert!(!e.contains('\n') && e.contains("renew deadline"), "{e}");
    }

    #[test]
    fn cloud_providers_need_a_cluster_id() {
        let e = error(&["--provider", "aws"]);
        assert!(e.contains("--cluster-id"), "{e}");
        let e = error(&["--provider", "gce", "--cluster-id", "Prod_1"]);
        assert!(e.contains("lowercase"), "{e}");
        let c = parse(&["--provider", "aws", "--cluster-id", "prod-1"]).unwrap();
        assert_eq!(c.class(), "ferry.dev/aws");
    }

    #[test]
    fn help_lists_every_flag() {
        let Err(ParseOutcome::Print(help)) = parse(&["--help"]) else {
            panic!("--help prints")
        };
        for flag in [
            "--provider",
            "--load-balancer-class",
            "--default-class",
            "--cluster-id",
            "--leader-elect",
            "--leader-elect-lease-name",
            "--leader-elect-namespace",
            "--leader-elect-lease-duration",
            "--leader-elect-renew-deadline",
            "--leader-elect-retry-period",
            "--metrics-addr",
            "--health-addr",
            "--concurrency",
            "--node-debounce",
            "--log-format",
            "--local-repair-interval",
            "--aws-region",
            "--aws-api-rate",
        ] {
            assert!(help.contains(flag), "--help lacks {flag}");
        }
        assert!(help.contains("FERRY_NODE_DEBOUNCE"), "env vars are shown");
    }
}
