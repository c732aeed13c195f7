//! The local provider's own flags, flattened into the operator's configuration by the
//! provider table (`registry`); each also read from its environment variable.

use std::time::Duration;

use clap::Args;

/// `--provider local`: addresses from LoadBalancerPools, served by ferry's forwarder.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Local provider (--provider local)")]
pub struct LocalArgs {
    /// How often allocations are compared with Services' status, and addresses no Service
    /// shows any more are given back.
    #[arg(long = "local-repair-interval", env = "FERRY_LOCAL_REPAIR_INTERVAL", default_value = "3m", value_name = "DURATION", value_parser = repair_interval)]
    pub repair_interval: Duration,
}

fn repair_interval(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(d),
        Ok(_) => Err("must be at least 1s".into()),
        Err(e) => Err(format!("{e} (e.g. 3m, 90s)")),
    }
}
