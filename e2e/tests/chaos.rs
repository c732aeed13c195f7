//! The randomized fault harness on a short, fixed set of seeds (one of them an AWS run on
//! moto, one on a throttling API server), so CI replays the same schedules every time. `e2e/bench/chaos.sh --runs N` runs
//! many more; `FERRY_CHAOS_SEEDS=7,8` picks others here.

use ferry_e2e::chaos::{self, Settings};
use ferry_e2e::control_plane::shared;
use ferry_e2e::scenario::serial;

const STEPS: usize = 24;

fn seeds() -> Vec<u64> {
    std::env::var("FERRY_CHAOS_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seeds_keep_every_invariant() {
    let _serial = serial().await;
    let cp = shared();
    let mut failures = Vec::new();
    for seed in seeds() {
        let report = chaos::run(cp, &Settings::for_seed(seed, STEPS))
            .await
            .unwrap();
        eprintln!("{}", serde_json::to_string(&report).unwrap());
        if !report.violations.is_empty() {
            failures.push(format!(
                "seed {seed} (replay: FERRY_CHAOS_SEEDS={seed} cargo test -p ferry-e2e --test chaos):\n  {}",
                report.violations.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
