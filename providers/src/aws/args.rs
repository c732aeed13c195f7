//! The AWS provider's own flags, flattened into the operator's configuration by the provider
//! table (`registry`); each also read from its environment variable.

use clap::Args;

/// `--provider aws`: Network Load Balancers through ELBv2 and EC2.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "AWS provider (--provider aws)")]
pub struct AwsArgs {
    /// AWS region [default: the SDK's chain: AWS_REGION, the profile, instance metadata].
    #[arg(long = "aws-region", env = "FERRY_AWS_REGION")]
    pub region: Option<String>,

    /// AWS API calls per second across all Services (bursts of twice as many); throttled
    /// and failed calls are retried within this budget.
    #[arg(long = "aws-api-rate", env = "FERRY_AWS_API_RATE", default_value_t = 10.0, value_parser = crate::calls::positive_rate)]
    pub api_rate: f64,
}
