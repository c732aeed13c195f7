//! `ferry-bench-gce`: Compute Engine API calls per node change. 50 Services on 20 nodes, then
//! 5 nodes join and the same 5 leave. ferry's operator (a real process, `--provider gce`,
//! through google-cloud-compute-v1 against the Compute Engine fake, which counts every
//! request) is measured, and in the same run the naive pattern: `ensure` of every balancer
//! on every node change, with the same provider code. Every write's Operation is DONE at its
//! first poll, as a quick GCE write is, so each write costs its poll too. Run through
//! `e2e/bench/gce.sh`, which writes `docs/results.md`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use ferry_e2e::bench::{remove_nodes, two_port_service, wait_all_ready};
use ferry_e2e::control_plane::{ControlPlane, Options};
use ferry_e2e::gce::GceFake;
use ferry_e2e::nodes::{SimulatedNode, register, simulated_node};
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::namespace;
use ferry_providers::LoadBalancerProvider;
use ferry_providers::eligibility::eligible_targets;
use ferry_providers::gce::{GceArgs, GceProvider};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const PROJECT: &str = "bench";
const REGION: &str = "us-central1";
const ZONE: &str = "us-central1-a";
const CLASS: &str = "ferry.dev/gce";
const CLUSTER_ID: &str = "bench-gce";

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 50)]
    services: usize,
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Nodes added, then removed, per round.
    #[arg(long, default_value_t = 5)]
    change: usize,
    /// Add/remove rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Compute Engine calls per second for both ferry and the naive pattern (--gce-api-rate).
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
}

/// Calls of one node change.
#[derive(Debug, Default, Clone)]
struct Change {
    calls: BTreeMap<String, usize>,
    took: Duration,
}

impl Change {
    fn total(&self) -> usize {
        self.calls.values().sum()
    }
    fn of(&self, call: &str) -> usize {
        self.calls.get(call).copied().unwrap_or(0)
    }
    fn reads(&self) -> usize {
        self.calls
            .iter()
            .filter(|(k, _)| k.ends_with(".get") && !k.contains("Operations."))
            .map(|(_, v)| v)
            .sum()
    }
    fn polls(&self) -> usize {
        self.calls
            .iter()
            .filter(|(k, _)| k.contains("Operations."))
            .map(|(_, v)| v)
            .sum()
    }
}

fn node(i: usize) -> SimulatedNode {
    simulated_node("bench-gce", i)
}

/// Registers Ready nodes whose providerIDs name the fake's instances, all at once.
async fn add_nodes(
    client: &Client,
    fake: &GceFake,
    which: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let nodes: Vec<SimulatedNode> = which.map(node).collect();
    let api: Api<Node> = Api::all(client.clone());
    // providerID first (not yet Ready, so not a target), then all turn Ready together.
    for n in &nodes {
        fake.with(|c| c.add_instance(ZONE, &n.name));
        let obj = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name},
            "spec": {"providerID": format!("gce://{PROJECT}/{ZONE}/{}", n.name)},
        });
        api.patch(
            &n.name,
            &PatchParams::apply("ferry-bench").force(),
            &Patch::Apply(&obj),
        )
        .await?;
    }
    register(client, &nodes).await
}

/// The calls of one node change, once the cloud is quiet again.
async fn settle(
    fake: &GceFake,
    mark: usize,
    start: Instant,
    expect: usize,
) -> anyhow::Result<Change> {
    let (calls, took) =
        ferry_e2e::bench::settle(mark, start, expect, || fake.mark(), |m| fake.calls_since(m))
            .await?;
    Ok(Change { calls, took })
}

/// The naive pattern: ensure every balancer with the current targets.
async fn naive(
    provider: &Arc<GceProvider>,
    client: &Client,
    svcs: &Api<Service>,
    fake: &GceFake,
) -> anyhow::Result<Change> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let targets = eligible_targets(nodes.items.iter(), |t| provider.can_target(t));
    let services = svcs.list(&ListParams::default()).await?;
    let mark = fake.mark();
    let start = Instant::now();
    let ensures = services.items.iter().map(|svc| {
        let provider = provider.clone();
        let targets = targets.clone();
        async move {
            let desired = ferry_providers::desired::desired(svc, &targets)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            provider.ensure(&desired).await.map_err(anyhow::Error::from)
        }
    });
    for r in futures::future::join_all(ensures).await {
        r?;
    }
    Ok(Change {
        calls: fake.calls_since(mark),
        took: start.elapsed(),
    })
}

fn row(label: &str, c: &Change, pools: usize) -> String {
    format!(
        "| {label} | {} | {} | {} | {} | {} | {:.2} | {:.1} s |",
        c.total(),
        c.of("targetPools.addInstance"),
        c.of("targetPools.removeInstance"),
        c.reads(),
        c.polls(),
        c.total() as f64 / pools as f64,
        c.took.as_secs_f64()
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cp = ControlPlane::start(&Options::default()).context("starting the control plane")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, cp))
}

async fn run(args: Args, cp: ControlPlane) -> anyhow::Result<()> {
    let admin = cp.admin_client().await?;
    let fake = GceFake::start(PROJECT).await?;
    fake.slow_operations(1);
    add_nodes(&admin, &fake, 0..args.nodes).await?;
    let rate = args.rate.to_string();
    let flags = [
        "--provider",
        "gce",
        "--cluster-id",
        CLUSTER_ID,
        "--load-balancer-class",
        CLASS,
        "--gce-project",
        PROJECT,
        "--gce-region",
        REGION,
        "--gce-endpoint",
        &fake.url,
        "--gce-anonymous",
        "--gce-node-tags",
        "bench-node",
        "--gce-api-rate",
        &rate,
    ];
    let mut operator =
        OperatorProcess::start_with_env(&cp.operator_kubeconfig, &cp.dir, &flags, &[])?;
    let ns = namespace(&admin, "bench-gce").await?;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    for i in 0..args.services {
        svcs.create(&PostParams::default(), &two_port_service(i, CLASS))
            .await?;
    }
    let took = wait_all_ready(&svcs, args.services, || operator.log_text()).await?;
    eprintln!(
        "{} balancers ready in {:.1} s",
        args.services,
        took.as_secs_f64()
    );
    let pools = args.services;

    let provider = Arc::new(
        GceProvider::from_args(
            &GceArgs {
                project: Some(PROJECT.into()),
                region: Some(REGION.into()),
                network: "default".into(),
                node_tags: vec!["bench-node".into()],
                api_rate: args.rate,
                operation_wait: Duration::from_secs(20),
                endpoint: Some(fake.url.clone()),
                anonymous: true,
            },
            ferry_e2e::scenario::cluster_identity(&admin, CLUSTER_ID).await?,
        )
        .await?,
    );
    let all = args.nodes..args.nodes + args.change;
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        // ferry: the operator reacts to the change by itself.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mark = fake.mark();
        let start = Instant::now();
        add_nodes(&admin, &fake, all.clone()).await?;
        let ferry_add = settle(&fake, mark, start, pools).await?;
        // The naive pattern acts alone: the operator is stopped (SIGTERM releases its lease).
        operator.terminate();
        remove_nodes(&admin, "bench-gce", all.clone()).await?;
        let naive_remove = naive(&provider, &admin, &svcs, &fake).await?;
        add_nodes(&admin, &fake, all.clone()).await?;
        let naive_add = naive(&provider, &admin, &svcs, &fake).await?;
        // The operator comes back and re-ensures everything once (not counted).
        let mark = fake.mark();
        operator.restart()?;
        settle(&fake, mark, Instant::now(), args.services).await?;
        let mark = fake.mark();
        let start = Instant::now();
        remove_nodes(&admin, "bench-gce", all.clone()).await?;
        let ferry_remove = settle(&fake, mark, start, pools).await?;
        eprintln!(
            "round {round}: ferry add {:?} remove {:?}",
            ferry_add.calls, ferry_remove.calls
        );
        for (label, change) in [
            (
                format!("{round}: +{} nodes, ferry", args.change),
                &ferry_add,
            ),
            (
                format!("{round}: +{} nodes, naive", args.change),
                &naive_add,
            ),
            (
                format!("{round}: −{} nodes, ferry", args.change),
                &ferry_remove,
            ),
            (
                format!("{round}: −{} nodes, naive", args.change),
                &naive_remove,
            ),
        ] {
            rows.push(row(&label, change, pools));
        }
    }
    let passes = operator.log_text().matches("node pass").count();
    println!(
        "{} Services = {pools} target pools, {} nodes ± {}; Compute Engine calls limited to {}/s for both.\n",
        args.services, args.nodes, args.change, args.rate
    );
    println!(
        "| node change | compute calls | addInstance | removeInstance | resource reads | Operation polls | calls per pool | converged in |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    println!("\nThe operator logged {passes} node passes (batches) over the run.");
    Ok(())
}
