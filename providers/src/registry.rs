//! The one table that names ferry's providers. Each provider brings its own flags (an `Args`
//! struct flattened here, so the operator's configuration holds none of them) and one
//! constructor; the operator only calls `build`. A new cloud is a module, a variant and a
//! line in each of the two matches below.

use std::sync::Arc;

use clap::{Args, ValueEnum};

use crate::class::ClassFilter;
use crate::{ClusterIdentity, LoadBalancerProvider, ProviderError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// Addresses from LoadBalancerPools, served by ferry's forwarder (kind, bare metal).
    Local,
    /// AWS Network Load Balancers.
    Aws,
    /// Google Compute Engine network load balancers.
    Gce,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Aws => "aws",
            Self::Gce => "gce",
        }
    }

    /// Whether the provider creates resources in a cloud account, which ferry names and tags
    /// with the cluster id (so one is required).
    pub fn in_a_cloud(self) -> bool {
        !matches!(self, Self::Local)
    }
}

/// Which provider, and every built-in provider's own flags.
#[derive(Clone, Debug, Args)]
pub struct ProviderArgs {
    /// Where balancers are provisioned.
    #[arg(
        long = "provider",
        id = "provider",
        value_name = "PROVIDER",
        env = "FERRY_PROVIDER",
        value_enum,
        default_value = "local"
    )]
    pub kind: ProviderKind,

    #[command(flatten)]
    pub local: crate::local::LocalArgs,

    #[cfg(feature = "aws")]
    #[command(flatten)]
    pub aws: crate::aws::AwsArgs,

    #[cfg(feature = "gce")]
    #[command(flatten)]
    pub gce: crate::gce::GceArgs,
}

/// What every provider is built with, whichever it is.
#[derive(Clone)]
pub struct ProviderContext {
    pub client: kube::Client,
    /// The class this instance serves.
    pub class: ClassFilter,
    /// This cluster's two marks on what a cloud provider creates.
    pub cluster: ClusterIdentity,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "provider {0:?} is not built into this binary; rebuild with its cargo feature ({0}) or use --provider local"
    )]
    NotBuilt(&'static str),
    #[error("provider {provider}: {source}")]
    Provider {
        provider: &'static str,
        source: ProviderError,
    },
}

/// The provider `args` name, built from its own flags.
pub async fn build(
    args: &ProviderArgs,
    ctx: ProviderContext,
) -> Result<Arc<dyn LoadBalancerProvider>, BuildError> {
    let provider = args.kind.as_str();
    let failed = |source| BuildError::Provider { provider, source };
    match args.kind {
        ProviderKind::Local => Ok(Arc::new(crate::local::LocalProvider::from_args(
            &args.local,
            ctx,
        ))),
        #[cfg(feature = "aws")]
        ProviderKind::Aws => {
            let config = crate::aws::AwsConfig::from_args(&args.aws, ctx.cluster);
            Ok(Arc::new(
                crate::aws::AwsProvider::from_env(config)
                    .await
                    .map_err(failed)?,
            ))
        }
        #[cfg(feature = "gce")]
        ProviderKind::Gce => Ok(Arc::new(
            crate::gce::GceProvider::from_args(&args.gce, ctx.cluster)
                .await
                .map_err(failed)?,
        )),
        #[allow(unreachable_patterns)]
        other => {
            let _ = failed;
            Err(BuildError::NotBuilt(other.as_str()))
        }
    }
}
