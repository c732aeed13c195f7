//! The randomized fault harness: one run drives the real control plane, the operator as two
//! replicas (each behind a fault proxy of its own), a second healthy ferry instance of
//! another class and, on cloud runs, the AWS provider on moto through the counting proxy,
//! through a schedule drawn from a seed (`schedule`): Service creations, changes, deletions
//! and class moves, node churn, SIGKILL and SIGTERM at random points (also between a cloud
//! call and its answer), API drops, outages, latency and black holes, cloud throttling and
//! 5xx. Then every fault is lifted, the system settles, and `invariants` checks what a user
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
}

impl Settings {
    /// The default mix: every third seed is a cloud run.
    pub fn for_seed(seed: u64, steps: usize) -> Self {
        Self {
            seed,
            steps,
            cloud: seed.is_multiple_of(3),
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub cloud: bool,
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

/// Runs one schedule against `cp` and reports what it found. An error is the harness
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
        steps: steps.len(),
        faults,
        violations,
        seconds: started.elapsed().as_secs_f64(),
        settle_seconds,
    })
}
