//! `ferry-chaos`: runs many chaos schedules (`ferry_e2e::chaos`) on one real control plane
//! and prints, per run, a JSON line with its seed, faults by kind and violations, then a
//! summary. A violation's seed replays with `--first-seed <seed> --runs 1`. Run through
//! `e2e/bench/chaos.sh`, which writes the summary into `docs/results.md`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Instant;

use clap::Parser;
use ferry_e2e::chaos::{self, Settings};
use ferry_e2e::control_plane::{Options, start_in_keeper_thread};

#[derive(Debug, Parser)]
struct Args {
    /// How many runs.
    #[arg(long, default_value_t = 20)]
    runs: u64,
    /// The seed of the first run; run i uses first-seed + i.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Steps per schedule.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Append each run's JSON line to this file too.
    #[arg(long)]
    jsonl: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "warn,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cp = start_in_keeper_thread(Options::default());
    let mut throttling = None;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut jsonl = match &args.jsonl {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => None,
    };
    let started = Instant::now();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = Vec::new();
    let mut cloud_runs = 0;
    let mut throttled_runs = 0;
    let mut settle = Vec::new();
    for seed in args.first_seed..args.first_seed + args.runs {
        let settings = Settings::for_seed(seed, args.steps);
        let plane = if settings.throttled {
            &*throttling.get_or_insert_with(|| start_in_keeper_thread(chaos::throttling_options()))
        } else {
            &cp
        };
        let report = rt.block_on(chaos::run(plane, &settings))?;
        let line = serde_json::to_string(&report)?;
        println!("{line}");
        if let Some(f) = jsonl.as_mut() {
            writeln!(f, "{line}")?;
        }
        for (kind, n) in &report.faults {
            *faults.entry(kind.clone()).or_default() += u64::from(*n);
        }
        cloud_runs += u64::from(report.cloud);
        throttled_runs += u64::from(report.throttled);
        settle.push(report.settle_seconds);
        if !report.violations.is_empty() {
            eprintln!(
                "seed {seed}: {} violation(s); replay with `ferry-chaos --first-seed {seed} --runs 1 --steps {}`:\n  {}",
                report.violations.len(),
                args.steps,
                report.violations.join("\n  ")
            );
            failed.push(seed);
        }
    }
    settle.sort_by(f64::total_cmp);
    let median = settle.get(settle.len() / 2).copied().unwrap_or(0.0);
    let max = settle.last().copied().unwrap_or(0.0);
    let total: u64 = faults.values().sum();
    println!(
        "# {} runs ({} on AWS/moto, {} on a throttling API server), {} steps each, {total} faults injected, {} with violations {:?}, settle median {median:.1} s (max {max:.1} s), {:.0} min",
        args.runs,
        cloud_runs,
        throttled_runs,
        args.steps,
        failed.len(),
        failed,
        started.elapsed().as_secs_f64() / 60.0
    );
    for (kind, n) in &faults {
        println!("# {kind}: {n}");
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
