//! `ferry-bench-liveness`: how the data plane fares when things go wrong, on the namespace
//! cluster (three node namespaces, the real control plane, one forwarder per node): requests
//! that fail while the API server is stopped for a minute, how long a lost node's VIP takes
//! to answer again with the API up and with it down, how long a SIGKILLed forwarder's VIP
//! stays on its node, and a soak: full request load through a VIP while Services are created
//! and deleted without pause, counting VIP moves (there must be none) and the direct heartbeat
//! traffic each node sends and receives. Run through `e2e/bench/liveness.sh` (root), which
//! writes the results into `docs/results.md`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use ferry_e2e::cluster::{Cluster, SteadyClient, WAIT, answered_within};
use ferry_e2e::forwarder::NodePorts;
use ferry_e2e::scenario::eventually;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Failovers measured per kind.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Length of the API outage, in seconds.
    #[arg(long, default_value_t = 60)]
    outage: u64,
    /// Length of the soak at full load with Service churn, in seconds (0: none).
    #[arg(long, default_value_t = 600)]
    soak: u64,
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

/// Until the client gets an answer through `target` again; how long that took. Each try
/// gives up after 100 ms, so the figure is not rounded up to TCP's one-second SYN
/// retransmission (a real client's first retry).
async fn until_answered(c: &Cluster, target: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let probe = move || Ok(answered_within(target, Duration::from_millis(100)));
    loop {
        if c.topo.client.ns().enter(probe)? {
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

/// What a soak saw.
struct Soak {
    requests: u64,
    errors: u64,
    moves: u32,
    churned: u32,
    /// Per node: heartbeat datagrams sent and received per second.
    datagrams: Vec<(String, f64, f64)>,
}

/// UDP datagrams sent and received in a namespace so far (`/proc/net/snmp`).
fn udp_counters(c: &Cluster, i: usize) -> anyhow::Result<(u64, u64)> {
    let snmp = c
        .topo
        .nodes
        .get(i)
        .context("no such node")?
        .ns()
        .exec("cat", &["/proc/net/snmp"])?;
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = rows.next().zip(rows.next()).context("no Udp rows")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let at = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("no {name}"))?;
        Ok(values
            .split_whitespace()
            .nth(at)
            .with_context(|| format!("no value for {name}"))?
            .parse()?)
    };
    Ok((field("OutDatagrams")?, field("InDatagrams")?))
}

/// Full load (wrk, 2 threads, 32 keep-alive connections) through `vips[0]` for `seconds`
/// while a churn creates a Service every 250 ms and deletes the one made 4 before it (each a
/// new VIP for every forwarder to plan); every VIP in `vips` is watched for a move.
async fn soak(c: &Cluster, vips: &[String], seconds: u64) -> anyhow::Result<Soak> {
    let owners: Vec<Vec<String>> = vips.iter().map(|v| c.holders(v)).collect();
    let first = vips.first().context("no VIP")?;
    let before: Vec<(u64, u64)> = (0..c.topo.nodes.len())
        .map(|i| udp_counters(c, i))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let wrk = c
        .topo
        .client
        .ns()
        .command(std::path::Path::new("wrk"))
        .args([
            "-t2",
            "-c32",
            &format!("-d{seconds}s"),
            &format!("http://{first}:80/"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running wrk")?;
    let deadline = started + Duration::from_secs(seconds);
    let mut moves = 0u32;
    let mut churned = 0u32;
    let mut made: std::collections::VecDeque<String> = Default::default();
    let mut next_churn = Instant::now();
    let mut last: Vec<Vec<String>> = owners.clone();
    while Instant::now() < deadline {
        if Instant::now() >= next_churn {
            next_churn += Duration::from_millis(250);
            let name = format!("churn-{churned}");
            let svc: Service = serde_json::from_value(json!({
                "metadata": { "name": name },
                "spec": { "type": "LoadBalancer", "ports": [ { "port": 80, "protocol": "TCP" } ] }
            }))?;
            if c.svcs.create(&PostParams::default(), &svc).await.is_ok() {
                made.push_back(name);
                churned += 1;
            }
            if made.len() > 4
                && let Some(old) = made.pop_front()
            {
                let _ = c.svcs.delete(&old, &DeleteParams::default()).await;
            }
        }
        for (i, v) in vips.iter().enumerate() {
            let now = c.holders(v);
            if let Some(was) = last.get_mut(i)
                && *was != now
            {
                moves += 1;
                eprintln!(
                    "soak: {v} moved from {was:?} to {now:?} at {:?}",
                    started.elapsed()
                );
                *was = now;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in made {
        let _ = c.svcs.delete(&name, &DeleteParams::default()).await;
    }
    let out = wrk.wait_with_output().context("waiting for wrk")?;
    let elapsed = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| {
            format!(
                "no request count in wrk's output:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N".
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors:") || l.contains("Non-2xx"))
        .flat_map(|l| {
            l.split([',', ':'])
                .filter_map(|w| w.split_whitespace().last()?.parse::<u64>().ok())
        })
        .sum();
    let mut datagrams = Vec::new();
    for (i, (out0, in0)) in before.into_iter().enumerate() {
        let (out1, in1) = udp_counters(c, i)?;
        let name = c
            .topo
            .nodes
            .get(i)
            .map(|h| h.name.clone())
            .unwrap_or_default();
        datagrams.push((
            name,
            out1.saturating_sub(out0) as f64 / elapsed,
            in1.saturating_sub(in0) as f64 / elapsed,
        ));
    }
    Ok(Soak {
        requests,
        errors,
        moves,
        churned,
        datagrams,
    })
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

    let soaked = if args.soak > 0 {
        let s = soak(&c, &[a.clone(), b.clone()], args.soak).await?;
        eprintln!(
            "soak: {} requests, {} errors, {} VIP moves, {} Services churned",
            s.requests, s.errors, s.moves, s.churned
        );
        let per_node: Vec<String> = s
            .datagrams
            .iter()
            .map(|(n, o, i)| format!("{n}: {o:.1} out, {i:.1} in"))
            .collect();
        format!(
            "\n| soak | VIP moves | requests (errors) | direct heartbeats per node, datagrams/s (out, in) |\n| --- | --- | --- | --- |\n\
             | {} s of wrk (2 threads, 32 connections) through one VIP; a Service created and one deleted every 250 ms ({} in all) | {} | {} ({}) | {} |\n",
            args.soak,
            s.churned,
            s.moves,
            s.requests,
            s.errors,
            per_node.join("; ")
        )
    } else {
        String::new()
    };

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
         | SIGKILLed forwarder: VIP gone from its node after | {} |\n{soaked}",
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
