//! The sandbox's clouds: for `ferry-sandbox --provider aws` moto's server (seeded with a VPC,
//! subnets and one instance per node), for `--provider gce` the Compute Engine fake (one
//! instance per node), each with the nodes' `spec.providerID` pointing at their instance and
//! the operator flags and environment that reach it. Nothing leaves the machine.

use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::aws::{AwsWorld, Seed};
use crate::gce::GceFake;
use crate::nodes::SimulatedNode;

pub const GCE_PROJECT: &str = "sandbox";
pub const GCE_REGION: &str = "us-central1";
const GCE_ZONE: &str = "us-central1-a";
const GCE_TAG: &str = "ferry-sandbox";
const CLUSTER_ID: &str = "sandbox";

/// A cloud the sandbox's operator provisions in.
pub enum Cloud {
    Aws(Box<AwsWorld>),
    Gce(GceFake),
}

impl Cloud {
    /// Starts the cloud `provider` names (`aws` or `gce`) with an instance per node, and
    /// points the nodes at them.
    pub async fn start(
        provider: &str,
        dir: &Path,
        client: &Client,
        nodes: &[SimulatedNode],
    ) -> anyhow::Result<Cloud> {
        let (cloud, ids): (Cloud, Vec<String>) = match provider {
            "aws" => {
                let world = AwsWorld::start(
                    dir,
                    Seed {
                        instances: nodes.len(),
                        eips: 2,
                        internal_subnets: true,
                    },
                )
                .await
                .context("starting moto (pip install 'moto[server]==5.2.5' if it is missing)")?;
                let ids = world.instances.iter().map(|i| i.provider_id()).collect();
                (Cloud::Aws(Box::new(world)), ids)
            }
            "gce" => {
                let fake = GceFake::start(GCE_PROJECT).await?;
                let ids = nodes
                    .iter()
                    .map(|n| {
                        fake.with(|c| c.add_tagged_instance(GCE_ZONE, &n.name, &[GCE_TAG]));
                        format!("gce://{GCE_PROJECT}/{GCE_ZONE}/{}", n.name)
                    })
                    .collect();
                (Cloud::Gce(fake), ids)
            }
            other => anyhow::bail!("no sandbox cloud for provider {other:?}"),
        };
        let api: Api<Node> = Api::all(client.clone());
        for (node, id) in nodes.iter().zip(ids) {
            api.patch(
                &node.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"providerID": id}})),
            )
            .await
            .with_context(|| format!("pointing node {} at its instance", node.name))?;
        }
        Ok(cloud)
    }

    /// The operator's flags for this cloud.
    pub fn operator_args(&self) -> Vec<String> {
        match self {
            Cloud::Aws(world) => world.operator_args(),
            Cloud::Gce(fake) => [
                "--provider",
                "gce",
                "--cluster-id",
                CLUSTER_ID,
                "--gce-project",
                GCE_PROJECT,
                "--gce-region",
                GCE_REGION,
                "--gce-endpoint",
                &fake.url,
                "--gce-anonymous",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    /// The operator's environment for this cloud (the AWS SDK reads its endpoint and
    /// credentials from there).
    pub fn operator_env(&self) -> Vec<(String, String)> {
        match self {
            Cloud::Aws(world) => world
                .operator_env()
                .into_iter()
                .filter(|(k, _)| k != "FERRY_LOG")
                .collect(),
            Cloud::Gce(_) => Vec::new(),
        }
    }

    /// How to look at what ferry made, one line each.
    pub fn inspect(&self) -> Vec<String> {
        match self {
            Cloud::Aws(world) => vec![
                format!(
                    "  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing aws --endpoint-url {} --region {} elbv2 describe-load-balancers",
                    world.proxy.url, world.region
                ),
                format!(
                    "  curl -s {}/moto-api/data.json   # everything moto holds",
                    world.proxy.url
                ),
            ],
            Cloud::Gce(fake) => ["forwardingRules", "targetPools", "addresses"]
                .iter()
                .map(|c| {
                    format!(
                        "  curl -s {}/compute/v1/projects/{GCE_PROJECT}/regions/{GCE_REGION}/{c}",
                        fake.url
                    )
                })
                .chain(["firewalls", "httpHealthChecks"].iter().map(|c| {
                    format!(
                        "  curl -s {}/compute/v1/projects/{GCE_PROJECT}/global/{c}",
                        fake.url
                    )
                }))
                .collect(),
        }
    }
}
