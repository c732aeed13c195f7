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
    operator_total: Duration,
    p50: Duration,
    p99: Duration,
    bare_total: Duration,
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

    // The floor: the same apiserver doing only the status patches, same concurrency.
    let bare_ns = namespace(&admin, "bare").await?;
    let bare: Api<Service> = Api::namespaced(admin.clone(), &bare_ns);
    create_all(&bare, &names, Some("bench.example/none"), args.concurrency).await?;
    let t0 = Instant::now();
    futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let bare = bare.clone();
            async move {
                let ip = format!("127.243.{}.{}", i / 250, i % 250 + 1);
                let patch = json!({ "status": { "loadBalancer": { "ingress": [ { "ip": ip, "ipMode": "Proxy" } ] } } });
                bare.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let bare_total = t0.elapsed();

    // The operator.
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(&PostParams::default(), &pool("bench", &["127.242.0.0/20"]))
        .await?;
    let concurrency = args.concurrency.to_string();
    let mut operator = OperatorProcess::start(
        &cp.operator_kubeconfig,
        &cp.dir,
        &["--concurrency", &concurrency],
    )?;
    let ns = namespace(&admin, "bench").await?;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    // Let the operator start and lead, so its start-up is not counted.
    let warm = "warm-up".to_string();
    let seen = watch_ingress(admin.clone(), &ns);
    create_all(&svcs, std::slice::from_ref(&warm), None, 1).await?;
    wait_all(&seen, 1, Duration::from_secs(60)).await?;
    seen.lock().map(|mut m| m.clear()).ok();

    let t0 = Instant::now();
    let created = create_all(&svcs, &names, None, args.concurrency).await?;
    wait_all(&seen, n, Duration::from_secs(600)).await?;
    let ingress = seen.lock().map(|m| m.clone()).unwrap_or_default();
    let last = ingress.values().max().copied().unwrap_or(t0);
    let operator_total = last - t0;
    let mut latencies: Vec<Duration> = names
        .iter()
        .filter_map(|name| Some(*ingress.get(name)? - *created.get(name)?))
        .collect();
    latencies.sort();
    let peak_rss = operator.pid().map(peak_rss_kib).unwrap_or(0);

    // Restart with everything present (SIGTERM, as a rolling update), then one more Service.
    operator.terminate();
    seen.lock().map(|mut m| m.clear()).ok();
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
        operator_total,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        bare_total,
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
        let cp = ControlPlane::start(&Options::default()).context("starting the control plane")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let run = rt.block_on(one_run(&cp, &args))?;
        drop(rt);
        drop(cp);
        eprintln!(
            "run {}: operator {} (p50 {}, p99 {}), bare patches {}, ratio {:.2}, peak RSS {} KiB, after restart {}",
            i + 1,
            ms(run.operator_total),
            ms(run.p50),
            ms(run.p99),
            ms(run.bare_total),
            run.operator_total.as_secs_f64() / run.bare_total.as_secs_f64(),
            run.peak_rss_kib,
            ms(run.after_restart)
        );
        runs.push(run);
    }
    let ratios: Vec<u64> = runs
        .iter()
        .map(|r| (r.operator_total.as_secs_f64() / r.bare_total.as_secs_f64() * 1000.0) as u64)
        .collect();
    println!("| figure | median of {} runs | runs |", runs.len());
    println!("| --- | --- | --- |");
    let row = |name: &str, f: &dyn Fn(&Run) -> Duration| {
        let all: Vec<Duration> = runs.iter().map(f).collect();
        println!(
            "| {name} | {} | {} |",
            ms(median(all.clone())),
            all.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
        );
    };
    row(
        &format!(
            "{} Services: first create → all have ingress",
            args.services
        ),
        &|r| r.operator_total,
    );
    row("creation → ingress, p50", &|r| r.p50);
    row("creation → ingress, p99", &|r| r.p99);
    row(
        &format!("{} bare status patches (the floor)", args.services),
        &|r| r.bare_total,
    );
    println!(
        "| ratio operator / bare (target ≤ 2) | {:.2} | {} |",
        median(ratios.clone()) as f64 / 1000.0,
        ratios
            .iter()
            .map(|r| format!("{:.2}", *r as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rss: Vec<u64> = runs.iter().map(|r| r.peak_rss_kib).collect();
    println!(
        "| operator peak RSS | {:.1} MiB | {} |",
        median(rss.clone()) as f64 / 1024.0,
        rss.iter()
            .map(|k| format!("{:.1} MiB", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    row(
        &format!(
            "restart with {} present, then one new Service → ingress (target < 1 s)",
            args.services
        ),
        &|r| r.after_restart,
    );
    Ok(())
}
