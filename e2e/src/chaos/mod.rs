//! The randomized fault harness: one run drives the real control plane, the operator as two
//! replicas (each behind a fault proxy of its own), a second healthy ferry instance of
//! another class and, on cloud runs, the AWS provider on moto through the counting proxy,
//! through a schedule drawn from a seed (`schedule`): Service creations, changes, deletions
//! and class moves, node churn, SIGKILL and SIGTERM at random points (also between a cloud
//! call and its answer), API drops, outages, latency and black holes, 429s from an API
//! server with a tiny max-inflight, cloud throttling and 5xx. Then every fault is lifted, the system settles, and `invariants` checks what a user
//! would notice. A failing run prints its seed; `ferry-chaos --first-seed N --runs 1`
//! replays it.

pub mod invariants;
pub mod schedule;
mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::control_plane::ControlPlane;
pub use world::World;

/// What one run is.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    pub steps: usize,
    /// The instance under test is the AWS provider on moto (else the local provider).
    pub cloud: bool,
    /// The run needs the throttling control plane (`throttling_options`), whose tiny
    /// max-inflight answers bursts with 429.
    pub throttled: bool,
}

impl Settings {
    /// The default mix: every third seed is a cloud run, every fifth (from 1) a throttled one.
    pub fn for_seed(seed: u64, steps: usize) -> Self {
        Self {
            seed,
            steps,
            cloud: seed.is_multiple_of(3),
            throttled: seed % 5 == 1,
        }
    }
}

/// The control plane of throttled runs: priority and fairness off, a few requests in
/// flight at most, so bursts of reconciles, renewals and the harness's own calls get 429s.
pub fn throttling_options() -> crate::control_plane::Options {
    crate::control_plane::Options {
        max_inflight: Some((3, 2)),
        ..crate::control_plane::Options::default()
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub cloud: bool,
    pub throttled: bool,
    pub steps: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u32>,
    /// Invariants that did not hold, each with what was seen.
    pub violations: Vec<String>,
    /// From the start of the schedule to the end of the settled checks.
    pub seconds: f64,
    /// How long the system took to settle once the faults were lifted.
    pub settle_seconds: f64,
}

/// How long a run may take to settle after its faults are lifted.
pub const SETTLE: Duration = Duration::from_secs(150);

/// Runs one schedule against `cp` (the throttling one when `settings.throttled`) and
/// reports what it found. An error is the harness
/// failing (could not start a process), not a violation.
pub async fn run(cp: &ControlPlane, settings: &Settings) -> anyhow::Result<Report> {
    let started = Instant::now();
    let steps = schedule::generate(settings.seed, settings.steps, settings.cloud);
    let mut world = World::start(cp, settings).await?;
    let result = async {
        for step in &steps {
            world.apply(step).await?;
            world.tick().await?;
        }
        world.lift_all().await?;
        let settle_start = Instant::now();
        let mut violations = world.settle(SETTLE).await;
        let settle_seconds = settle_start.elapsed().as_secs_f64();
        violations.extend(world.duplicates_seen());
        violations.extend(world.clean_up().await);
        anyhow::Ok((violations, settle_seconds))
    }
    .await;
    let faults = world.faults().clone();
    world.stop().await;
    let (violations, settle_seconds) = result?;
    Ok(Report {
        seed: settings.seed,
        cloud: settings.cloud,
        throttled: settings.throttled,
        steps: steps.len(),
        faults,
        violations,
        seconds: started.elapsed().as_secs_f64(),
        settle_seconds,
    })
}
