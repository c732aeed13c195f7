//! `ferry-bench-liveness`: how the data plane fares when things go wrong, on the namespace
//! cluster (three node namespaces, the real control plane, one forwarder per node): requests
//! that fail while the API server is stopped for a minute, how long a lost node's VIP takes
//! to answer again with the API up and with it down, and how long a SIGKILLed forwarder's
//! VIP stays on its node. Run through `e2e/bench/liveness.sh` (root), which writes the results
//! into `docs/results.md`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use ferry_e2e::cluster::{Cluster, SteadyClient, WAIT, answered};
use ferry_e2e::forwarder::NodePorts;
use ferry_e2e::scenario::eventually;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Failovers measured per kind.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Length of the API outage, in seconds.
    #[arg(long, default_value_t = 60)]
    outage: u64,
    /// Data-plane mode of the forwarders.
    #[arg(long, default_value = "kernel")]
    mode: String,
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: &Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    let median = samples.get(samples.len() / 2).map(ms).unwrap_or_default();
    format!(
        "{median} ms | {} – {} ms | {}",
        samples.first().map(ms).unwrap_or_default(),
        samples.last().map(ms).unwrap_or_default(),
        samples.iter().map(ms).collect::<Vec<_>>().join(", ")
    )
}

/// Until the client gets an answer through `target` again; how long that took.
async fn until_answered(c: &Cluster, target: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if c.topo.client.ns().enter(move || Ok(answered(target)))? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("no answer through {target} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails the VIP's owner node (optionally with the API stopped) and times the way back.
async fn failover(c: &mut Cluster, vip: &str, api_down: bool) -> anyhow::Result<Duration> {
    let target: SocketAddr = format!("{vip}:80").parse()?;
    let owner = c.wait_for_single_owner(vip).await;
    c.wait_for_traffic(vip, 80).await;
    let i = c.node_index(&owner);
    let took = {
        let _paused = api_down.then(|| c.cp.pause());
        c.fail_node(i);
        until_answered(c, target).await?
    };
    c.restore_node(i);
    c.wait_for_live_forwarders(3).await;
    c.wait_for_single_owner(vip).await;
    Ok(took)
}

async fn run(args: Args) -> anyhow::Result<String> {
    let mut c = Cluster::start(
        "bench-liveness",
        NodePorts::Listening,
        &["--mode", &args.mode],
    )
    .await;
    let a = c.http_service("a", 30080, json!({})).await;
    let b = c.http_service("b", 30081, json!({})).await;
    c.wait_for_single_owner(&a).await;
    c.wait_for_single_owner(&b).await;
    c.wait_for_traffic(&a, 80).await;
    c.wait_for_traffic(&b, 80).await;

    // A steady client through an API outage.
    let owners = (c.holders(&a), c.holders(&b));
    let client = SteadyClient::start(
        &c,
        vec![format!("{a}:80").parse()?, format!("{b}:80").parse()?],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let _paused = c.cp.pause();
        tokio::time::sleep(Duration::from_secs(args.outage)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (sent, failed) = client.stop();
    let moved = (c.holders(&a), c.holders(&b)) != owners;
    eprintln!("outage: {sent} requests, {failed} failed, VIPs moved: {moved}");

    let mut up = Vec::new();
    let mut down = Vec::new();
    for round in 0..args.failovers {
        up.push(failover(&mut c, &a, false).await?);
        down.push(failover(&mut c, &a, true).await?);
        eprintln!(
            "round {round}: API up {:?}, API down {:?}",
            up[round], down[round]
        );
    }

    // SIGKILL: how long the VIP stays on the killed forwarder's node.
    let mut lingering = Vec::new();
    for _ in 0..args.failovers {
        let owner = c.wait_for_single_owner(&a).await;
        let i = c.node_index(&owner);
        if let Some(f) = c.forwarders[i].as_mut() {
            f.kill();
        }
        let killed = Instant::now();
        eventually(
            WAIT,
            "the VIP gone from the killed forwarder's node",
            || async { (!c.holders(&a).contains(&owner)).then_some(()) },
        )
        .await;
        lingering.push(killed.elapsed());
        if let Some(f) = c.forwarders[i].as_mut() {
            f.restart()?;
        }
        c.wait_for_live_forwarders(3).await;
        c.wait_for_single_owner(&a).await;
    }

    Ok(format!(
        "| measure | median | range | runs |\n| --- | --- | --- | --- |\n\
         | requests failed during a {}-s API outage (2 VIPs, every 100 ms each) | {failed} of {sent} | VIPs moved: {} | 1 |\n\
         | failover, owner node lost, API up | {} |\n\
         | failover, owner node lost, API stopped | {} |\n\
         | SIGKILLed forwarder: VIP gone from its node after | {} |\n",
        args.outage,
        if moved { "yes" } else { "no" },
        summary(&mut up),
        summary(&mut down),
        summary(&mut lingering),
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let table = rt.block_on(run(args))?;
    println!("{table}");
    Ok(())
}
