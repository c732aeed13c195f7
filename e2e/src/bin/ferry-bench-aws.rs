//! `ferry-bench-aws`: AWS API calls per node change. 50 Services (two ports each, so 100
//! target groups) on 20 nodes, then 5 nodes join and the same 5 leave. ferry's operator (a
//! real process, `--provider aws`, against moto through a counting proxy) is measured, and
//! in the same run the naive pattern: `ensure` of every balancer on every node change, with
//! the same provider code. Run through `e2e/bench/aws.sh`, which writes `docs/results.md`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use ferry_e2e::aws::{AwsWorld, Seed};
use ferry_e2e::bench::{remove_nodes, two_port_service, wait_all_ready};
use ferry_e2e::control_plane::{ControlPlane, Options};
use ferry_e2e::nodes::{SimulatedNode, register, simulated_node};
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::namespace;
use ferry_providers::LoadBalancerProvider;
use ferry_providers::aws::{AwsConfig, AwsProvider};
use ferry_providers::eligibility::eligible_targets;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

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
    /// AWS calls per second for both ferry and the naive pattern (--aws-api-rate).
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
    fn of(&self, action: &str) -> usize {
        self.calls.get(action).copied().unwrap_or(0)
    }
    fn describes(&self) -> usize {
        self.calls
            .iter()
            .filter(|(k, _)| k.starts_with("Describe"))
            .map(|(_, v)| v)
            .sum()
    }
}

/// Registers Ready nodes with the providerIDs of `world`'s instances, all at once.
async fn add_nodes(
    client: &Client,
    world: &AwsWorld,
    which: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let nodes: Vec<SimulatedNode> = which
        .clone()
        .map(|i| simulated_node("bench-aws", i))
        .collect();
    let api: Api<Node> = Api::all(client.clone());
    // providerID first (not yet Ready, so not a target), then all turn Ready together.
    for (node, i) in nodes.iter().zip(which) {
        let obj = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name},
            "spec": {"providerID": world.instances[i].provider_id()},
        });
        api.patch(
            &node.name,
            &PatchParams::apply("ferry-bench").force(),
            &Patch::Apply(&obj),
        )
        .await?;
    }
    register(client, &nodes).await
}

/// The calls of one node change, once the cloud is quiet again.
async fn settle(
    world: &AwsWorld,
    mark: usize,
    start: Instant,
    expect: usize,
) -> anyhow::Result<Change> {
    let (calls, took) = ferry_e2e::bench::settle(
        mark,
        start,
        expect,
        || world.proxy.mark(),
        |m| world.proxy.calls_since(m),
    )
    .await?;
    Ok(Change { calls, took })
}

/// The naive pattern: ensure every balancer with the current targets.
async fn naive(
    provider: &Arc<AwsProvider>,
    client: &Client,
    svcs: &Api<Service>,
    world: &AwsWorld,
) -> anyhow::Result<Change> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let targets = eligible_targets(nodes.items.iter(), |t| provider.can_target(t));
    let services = svcs.list(&ListParams::default()).await?;
    let mark = world.proxy.mark();
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
        calls: world.proxy.calls_since(mark),
        took: start.elapsed(),
    })
}

fn row(label: &str, c: &Change, groups: usize) -> String {
    format!(
        "| {label} | {} | {} | {} | {} | {:.2} | {:.1} s |",
        c.total(),
        c.of("RegisterTargets"),
        c.of("DeregisterTargets"),
        c.describes(),
        c.total() as f64 / groups as f64,
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
    let world = AwsWorld::start(
        &cp.dir,
        Seed {
            instances: args.nodes + args.change,
            eips: 0,
            internal_subnets: false,
        },
    )
    .await?;
    add_nodes(&admin, &world, 0..args.nodes).await?;
    let mut flags = world.operator_args();
    flags.extend(["--aws-api-rate".into(), args.rate.to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut operator = OperatorProcess::start_with_env(
        &cp.operator_kubeconfig,
        &cp.dir,
        &flags,
        &world.operator_env(),
    )?;
    let ns = namespace(&admin, "bench-aws").await?;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    for i in 0..args.services {
        svcs.create(
            &PostParams::default(),
            &two_port_service(i, "ferry.dev/aws"),
        )
        .await?;
    }
    let took = wait_all_ready(&svcs, args.services, || operator.log_text()).await?;
    eprintln!(
        "{} balancers ready in {:.1} s",
        args.services,
        took.as_secs_f64()
    );
    let groups = args.services * 2;

    let provider = Arc::new(AwsProvider::with_clients(
        AwsConfig {
            calls_per_second: args.rate,
            ..AwsConfig::new(
                ferry_e2e::scenario::cluster_identity(&admin, &world.cluster_id).await?,
            )
        },
        aws_sdk_elasticloadbalancingv2::Client::new(&world.sdk_via_proxy().await),
        aws_sdk_ec2::Client::new(&world.sdk_via_proxy().await),
    ));
    let all = args.nodes..args.nodes + args.change;
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        // ferry: the operator reacts to the change by itself.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mark = world.proxy.mark();
        let start = Instant::now();
        add_nodes(&admin, &world, all.clone()).await?;
        let ferry_add = settle(&world, mark, start, groups).await?;
        // The naive pattern acts alone: the operator is stopped (SIGTERM releases its lease).
        operator.terminate();
        remove_nodes(&admin, "bench-aws", all.clone()).await?;
        let naive_remove = naive(&provider, &admin, &svcs, &world).await?;
        add_nodes(&admin, &world, all.clone()).await?;
        let naive_add = naive(&provider, &admin, &svcs, &world).await?;
        // The operator comes back and re-ensures everything once (not counted).
        let mark = world.proxy.mark();
        operator.restart()?;
        settle(&world, mark, Instant::now(), args.services).await?;
        let mark = world.proxy.mark();
        let start = Instant::now();
        remove_nodes(&admin, "bench-aws", all.clone()).await?;
        let ferry_remove = settle(&world, mark, start, groups).await?;
        eprintln!(
            "round {round}: ferry add {:?} remove {:?}",
            ferry_add.calls, ferry_remove.calls
        );
        rows.push(row(
            &format!("{round}: +{} nodes, ferry", args.change),
            &ferry_add,
            groups,
        ));
        rows.push(row(
            &format!("{round}: +{} nodes, naive", args.change),
            &naive_add,
            groups,
        ));
        rows.push(row(
            &format!("{round}: −{} nodes, ferry", args.change),
            &ferry_remove,
            groups,
        ));
        rows.push(row(
            &format!("{round}: −{} nodes, naive", args.change),
            &naive_remove,
            groups,
        ));
    }
    let passes = operator.log_text().matches("node pass").count();
    println!(
        "{} Services × 2 ports = {groups} target groups, {} nodes ± {}; AWS calls limited to {}/s for both.\n",
        args.services, args.nodes, args.change, args.rate
    );
    println!(
        "| node change | AWS calls | RegisterTargets | DeregisterTargets | Describe* | calls per target group | converged in |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    println!("\nThe operator logged {passes} node passes (batches) over the run.");
    Ok(())
}
