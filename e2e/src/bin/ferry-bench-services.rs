//! `ferry-bench-services`: how fast the operator turns many new LoadBalancer Services into
//! published addresses on a real kube-apiserver, against the floor of the same apiserver
//! doing nothing but status patches, and how soon a new Service is served after a restart
//! with all of them present. Run through `e2e/bench/services.sh`, which writes the results
//! into `docs/results.md`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, Options};
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::{ingress_ip, lb_service, namespace, pool};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Services per run.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Requests in flight from the benchmark's own client (and the operator's --concurrency).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Independent runs, each on a fresh control plane; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Debug, Clone)]
struct Run {
    /// The benchmark's own N creates (the floor for the live phase).
    creates: Duration,
    /// N bare status patches (the floor for the backlog phase).
    bare: Duration,
    /// N finalizer patches (the other write the Kubernetes contract requires per Service).
    finalizers: Duration,
    /// Operator started with N Services waiting: start → all have ingress.
    backlog: Duration,
    /// Of that, start → first ingress (process start, leader election, cache sync, rebuild).
    startup: Duration,
    /// Operator running while N are created: first create → all have ingress.
    live: Duration,
    p50: Duration,
    p99: Duration,
    peak_rss_kib: u64,
    after_restart: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Records the first moment each Service in `ns` shows an ingress address.
fn watch_ingress(client: Client, ns: &str) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let api: Api<Service> = Api::namespaced(client, ns);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        while let Ok(Some(svc)) = stream.try_next().await {
            if ingress_ip(&svc).is_some() {
                let now = Instant::now();
                if let Ok(mut m) = out.lock() {
                    m.entry(svc.name_any()).or_insert(now);
                }
            }
        }
    });
    seen
}

async fn create_all(
    api: &Api<Service>,
    names: &[String],
    class: Option<&str>,
    concurrency: usize,
) -> anyhow::Result<HashMap<String, Instant>> {
    let started = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            let class = class.map(str::to_string);
            async move {
                let mut svc = lb_service(&name, &[80]);
                if let Some(spec) = svc.spec.as_mut() {
                    spec.load_balancer_class = class;
                }
                let at = Instant::now();
                api.create(&PostParams::default(), &svc).await?;
                Ok::<_, kube::Error>((name, at))
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<HashMap<_, _>>()
        .await?;
    Ok(started)
}

async fn wait_all(
    seen: &Mutex<HashMap<String, Instant>>,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let have = seen.lock().map(|m| m.len()).unwrap_or(0);
        if have >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {have} of {n} Services got an address within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn one_run(cp: &ControlPlane, args: &Args) -> anyhow::Result<Run> {
    let admin = cp.admin_client().await?;
    let n = args.services;
    let names: Vec<String> = (0..n).map(|i| format!("svc-{i}")).collect();

    // The floors: the same apiserver doing only the benchmark's own creates, then only the
    // status patches a load-balancer implementation must write, at the same concurrency.
    let bare_ns = namespace(&admin, "bare").await?;
    let bare_api: Api<Service> = Api::namespaced(admin.clone(), &bare_ns);
    let t0 = Instant::now();
    create_all(
        &bare_api,
        &names,
        Some("bench.example/none"),
        args.concurrency,
    )
    .await?;
    let creates = t0.elapsed();
    let t0 = Instant::now();
    futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let bare_api = bare_api.clone();
            async move {
                let ip = format!("127.243.{}.{}", i / 250, i % 250 + 1);
                let patch = json!({ "status": { "loadBalancer": { "ingress": [ { "ip": ip, "ipMode": "Proxy" } ] } } });
                bare_api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let bare = t0.elapsed();
    let t0 = Instant::now();
    futures::stream::iter(names.iter())
        .map(|name| {
            let bare_api = bare_api.clone();
            async move {
                let patch = json!({ "metadata": { "finalizers": ["ferry.dev/load-balancer"] } });
                bare_api
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let finalizers = t0.elapsed();

    Api::<LoadBalancerPool>::all(admin.clone())
        .create(&PostParams::default(), &pool("bench", &["127.242.0.0/20"]))
        .await?;
    let concurrency = args.concurrency.to_string();

    // Backlog: N Services wait for an operator that is not running yet.
    let backlog_ns = namespace(&admin, "backlog").await?;
    let backlog_api: Api<Service> = Api::namespaced(admin.clone(), &backlog_ns);
    let backlog_seen = watch_ingress(admin.clone(), &backlog_ns);
    create_all(&backlog_api, &names, None, args.concurrency).await?;
    let t0 = Instant::now();
    let mut operator = OperatorProcess::start(
        &cp.operator_kubeconfig,
        &cp.dir,
        &["--concurrency", &concurrency, "--log-filter", "info"],
    )?;
    wait_all(&backlog_seen, n, Duration::from_secs(600)).await?;
    let (first, last) = backlog_seen
        .lock()
        .ok()
        .and_then(|m| Some((*m.values().min()?, *m.values().max()?)))
        .unwrap_or((t0, t0));
    let backlog = last - t0;
    let startup = first - t0;

    // Live: N more are created while the operator runs.
    let ns = namespace(&admin, "live").await?;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let seen = watch_ingress(admin.clone(), &ns);
    let t0 = Instant::now();
    let created = create_all(&svcs, &names, None, args.concurrency).await?;
    wait_all(&seen, n, Duration::from_secs(600)).await?;
    let ingress = seen.lock().map(|m| m.clone()).unwrap_or_default();
    let live = ingress.values().max().copied().unwrap_or(t0) - t0;
    let mut latencies: Vec<Duration> = names
        .iter()
        .filter_map(|name| Some(*ingress.get(name)? - *created.get(name)?))
        .collect();
    latencies.sort();
    let peak_rss = operator.pid().map(peak_rss_kib).unwrap_or(0);

    // Restart with all 2N present (SIGTERM, as a rolling update), then one more Service.
    operator.terminate();
    operator.restart()?;
    let t1 = Instant::now();
    create_all(&svcs, &["after-restart".to_string()], None, 1).await?;
    let deadline = t1 + Duration::from_secs(120);
    let after_restart = loop {
        if let Some(at) = seen
            .lock()
            .ok()
            .and_then(|m| m.get("after-restart").copied())
        {
            break at - t1;
        }
        if Instant::now() > deadline {
            bail!("the Service created after the restart got no address");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    operator.terminate();
    Ok(Run {
        creates,
        bare,
        finalizers,
        backlog,
        startup,
        live,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        peak_rss_kib: peak_rss,
        after_restart,
    })
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let cp = ControlPlane::start(&Options {
            // Three namespaces of N Services each, one NodePort apiece.
            node_port_range: Some((20000, 45000)),
            ..Options::default()
        })
        .context("starting the control plane")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let run = rt.block_on(one_run(&cp, &args))?;
        drop(rt);
        drop(cp);
        eprintln!("run {}: {run:?}", i + 1);
        runs.push(run);
    }
    let ratio = |r: &Run, a: fn(&Run) -> Duration, b: fn(&Run) -> Duration| {
        (a(r).as_secs_f64() / b(r).as_secs_f64() * 1000.0) as u64
    };
    let n = args.services;
    println!("| figure | median of {} runs | all runs |", runs.len());
    println!("| --- | --- | --- |");
    let row = |name: String, f: fn(&Run) -> Duration| {
        let all: Vec<Duration> = runs.iter().map(f).collect();
        println!(
            "| {name} | {} | {} |",
            ms(median(all.clone())),
            all.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
        );
    };
    let ratio_row = |name: String, a: fn(&Run) -> Duration, b: fn(&Run) -> Duration| {
        let all: Vec<u64> = runs.iter().map(|r| ratio(r, a, b)).collect();
        println!(
            "| {name} | {:.2} | {} |",
            median(all.clone()) as f64 / 1000.0,
            all.iter()
                .map(|r| format!("{:.2}", *r as f64 / 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    row(format!("floor: {n} bare status patches"), |r| r.bare);
    row(format!("floor: {n} finalizer patches"), |r| r.finalizers);
    row(
        format!("backlog: operator started with {n} Services waiting → all have ingress"),
        |r| r.backlog,
    );
    row(
        "backlog: of which operator start → first ingress".into(),
        |r| r.startup,
    );
    ratio_row(
        "ratio backlog / bare status patches (target ≤ 2)".into(),
        |r| r.backlog,
        |r| r.bare,
    );
    ratio_row(
        "ratio backlog / (finalizer + status patches)".into(),
        |r| r.backlog,
        |r| r.bare + r.finalizers,
    );
    row(format!("floor: the benchmark's own {n} creates"), |r| {
        r.creates
    });
    row(
        format!(
            "live: {n} Services created with the operator running, first create → all have ingress"
        ),
        |r| r.live,
    );
    ratio_row("ratio live / creates".into(), |r| r.live, |r| r.creates);
    row("live: creation → ingress, p50".into(), |r| r.p50);
    row("live: creation → ingress, p99".into(), |r| r.p99);
    let rss: Vec<u64> = runs.iter().map(|r| r.peak_rss_kib).collect();
    println!(
        "| operator peak RSS with {} Services | {:.1} MiB | {} |",
        2 * n,
        median(rss.clone()) as f64 / 1024.0,
        rss.iter()
            .map(|k| format!("{:.1} MiB", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    row(
        format!(
            "restart with {} present, then one new Service → ingress (target < 1 s)",
            2 * n
        ),
        |r| r.after_restart,
    );
    Ok(())
}
