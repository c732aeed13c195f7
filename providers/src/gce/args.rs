//! The GCE provider's own flags, flattened into the operator's configuration by the provider
//! table (`registry`); each also read from its environment variable.

use std::time::Duration;

use clap::Args;

/// `--provider gce`: network load balancers on target pools, through the Compute Engine API.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "GCE provider (--provider gce)")]
pub struct GceArgs {
    /// The project the balancers are made in (the cluster's).
    #[arg(
        long = "gce-project",
        id = "gce_project",
        env = "FERRY_GCE_PROJECT",
        value_name = "PROJECT"
    )]
    pub project: Option<String>,

    /// The region the balancers are made in (the nodes' region).
    #[arg(
        long = "gce-region",
        id = "gce_region",
        env = "FERRY_GCE_REGION",
        value_name = "REGION"
    )]
    pub region: Option<String>,

    /// The VPC network the nodes are on, which the firewall rules apply to.
    #[arg(
        long = "gce-network",
        id = "gce_network",
        env = "FERRY_GCE_NETWORK",
        default_value = "default",
        value_name = "NETWORK"
    )]
    pub network: String,

    /// Network tags that name the nodes for firewall rules, comma-separated
    /// [default: read from each node's instance: the longest tag its name starts with, else
    /// its first tag].
    #[arg(
        long = "gce-node-tags",
        id = "gce_node_tags",
        env = "FERRY_GCE_NODE_TAGS",
        value_delimiter = ',',
        value_name = "TAGS"
    )]
    pub node_tags: Vec<String>,

    /// Compute Engine API calls per second across all Services (bursts of twice as many);
    /// throttled and failed calls are retried within this budget.
    #[arg(long = "gce-api-rate",
        id = "gce_api_rate", value_name = "RATE", env = "FERRY_GCE_API_RATE", default_value_t = 10.0, value_parser = crate::calls::positive_rate)]
    pub api_rate: f64,

    /// How long one reconcile waits for a Compute Engine Operation before it reports the
    /// Service as provisioning and looks again later.
    #[arg(long = "gce-operation-wait",
        id = "gce_operation_wait", env = "FERRY_GCE_OPERATION_WAIT", default_value = "20s", value_name = "DURATION", value_parser = operation_wait)]
    pub operation_wait: Duration,

    /// The Compute Engine API root, for a test double [default: https://compute.googleapis.com].
    #[arg(
        long = "gce-endpoint",
        id = "gce_endpoint",
        env = "FERRY_GCE_ENDPOINT",
        value_name = "URL"
    )]
    pub endpoint: Option<String>,

    /// Send no credentials (for a test double at --gce-endpoint); otherwise Application
    /// Default Credentials: Workload Identity or the metadata server on GCE, or the key file
    /// GOOGLE_APPLICATION_CREDENTIALS names.
    #[arg(
        long = "gce-anonymous",
        id = "gce_anonymous",
        env = "FERRY_GCE_ANONYMOUS",
        requires = "gce_endpoint"
    )]
    pub anonymous: bool,
}

fn operation_wait(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d <= Duration::from_secs(120) => Ok(d),
        Ok(_) => Err("at most 2m: a longer wait holds a reconcile slot".into()),
        Err(e) => Err(format!("{e} (e.g. 20s)")),
    }
}
