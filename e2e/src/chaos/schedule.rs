//! A chaos schedule: the steps of one run, drawn from a seed by a small deterministic
//! generator (splitmix64), so a failing run replays from its seed. Pure: no I/O, no clock.
//! Which Service a step touches is an index taken modulo the Services alive when it runs.

use std::fmt;

/// splitmix64: tiny, fast and good enough to draw schedules from.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Whose a Service is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// The instance under test (two replicas, faults injected).
    Tested,
    /// A second, healthy ferry instance of another class.
    Neighbour,
    /// A class no ferry instance serves: ferry must never touch it.
    Unserved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFault {
    /// Every open connection of the replica is cut (watches drop).
    Reset,
    /// New connections refused, open ones cut.
    Outage,
    /// Latency on every chunk, below the election margin.
    Latency,
    /// Everything sent is lost and calls hang.
    Blackhole,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create {
        owner: Owner,
        ports: Vec<i32>,
        /// Ask for an address of the pool (by offset), which may be taken.
        requested: Option<u8>,
        /// Share an address with the previous Service of the same key (disjoint ports).
        shared: bool,
    },
    ChangePorts {
        pick: u64,
        ports: Vec<i32>,
    },
    Delete {
        pick: u64,
    },
    /// LoadBalancer → ClusterIP → LoadBalancer, to the other served class or back.
    MoveClass {
        pick: u64,
    },
    AddNode,
    RemoveNode {
        pick: u64,
    },
    /// SIGKILL a replica; it comes back after `restart_ms`.
    Kill {
        replica: usize,
        restart_ms: u64,
    },
    /// SIGTERM a replica (a rolling update); it comes back after `restart_ms`.
    Terminate {
        replica: usize,
        restart_ms: u64,
    },
    /// Hold back the cloud's answer to the next `action`, then SIGKILL whoever made it:
    /// the cloud acted, the operator never heard.
    KillMidCloudCall {
        action: &'static str,
        restart_ms: u64,
    },
    Api {
        replica: usize,
        fault: ApiFault,
        ms: u64,
    },
    CloudThrottle {
        every: u64,
        ms: u64,
    },
    CloudErrors {
        every: u64,
        ms: u64,
    },
    Pause {
        ms: u64,
    },
}

impl Step {
    /// The fault kind this step injects, for the run's tally (`None` for plain changes).
    pub fn fault_kind(&self) -> Option<&'static str> {
        Some(match self {
            Step::Kill { .. } => "sigkill",
            Step::Terminate { .. } => "sigterm",
            Step::KillMidCloudCall { .. } => "sigkill_mid_cloud_call",
            Step::Api { fault, .. } => match fault {
                ApiFault::Reset => "api_reset",
                ApiFault::Outage => "api_outage",
                ApiFault::Latency => "api_latency",
                ApiFault::Blackhole => "api_blackhole",
            },
            Step::CloudThrottle { .. } => "cloud_throttling",
            Step::CloudErrors { .. } => "cloud_5xx",
            Step::AddNode | Step::RemoveNode { .. } => "node_churn",
            _ => return None,
        })
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

const CLOUD_ACTIONS: [&str; 6] = [
    "CreateLoadBalancer",
    "CreateTargetGroup",
    "CreateListener",
    "RegisterTargets",
    "DeleteLoadBalancer",
    "DeleteTargetGroup",
];

fn ports(rng: &mut Rng) -> Vec<i32> {
    let first = 80 + i32::try_from(rng.below(4)).unwrap_or(0);
    if rng.chance(30) {
        vec![first, 8000 + i32::try_from(rng.below(4)).unwrap_or(0)]
    } else {
        vec![first]
    }
}

/// The steps of run `seed`; `cloud` adds the cloud faults.
pub fn generate(seed: u64, steps: usize, cloud: bool) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(steps);
    // Every run begins with a few Services, so faults have something to hit.
    for _ in 0..3 {
        out.push(Step::Create {
            owner: Owner::Tested,
            ports: ports(&mut rng),
            requested: None,
            shared: false,
        });
    }
    out.push(Step::Create {
        owner: Owner::Neighbour,
        ports: vec![80],
        requested: None,
        shared: false,
    });
    out.push(Step::Create {
        owner: Owner::Unserved,
        ports: vec![80],
        requested: None,
        shared: false,
    });
    while out.len() < steps {
        let roll = rng.below(100);
        let step = match roll {
            0..=21 => Step::Create {
                owner: match rng.below(10) {
                    0 => Owner::Neighbour,
                    1 => Owner::Unserved,
                    _ => Owner::Tested,
                },
                ports: ports(&mut rng),
                requested: rng
                    .chance(20)
                    .then(|| u8::try_from(rng.below(8)).unwrap_or(0)),
                shared: rng.chance(15),
            },
            22..=29 => Step::ChangePorts {
                pick: rng.next_u64(),
                ports: ports(&mut rng),
            },
            30..=39 => Step::Delete {
                pick: rng.next_u64(),
            },
            40..=44 => Step::MoveClass {
                pick: rng.next_u64(),
            },
            45..=48 => Step::AddNode,
            49..=51 => Step::RemoveNode {
                pick: rng.next_u64(),
            },
            52..=59 => Step::Kill {
                replica: usize::try_from(rng.below(2)).unwrap_or(0),
                restart_ms: rng.between(0, 3000),
            },
            60..=64 => Step::Terminate {
                replica: usize::try_from(rng.below(2)).unwrap_or(0),
                restart_ms: rng.between(0, 2000),
            },
            65..=69 if cloud => Step::KillMidCloudCall {
                action: CLOUD_ACTIONS[usize::try_from(rng.below(6)).unwrap_or(0) % 6],
                restart_ms: rng.between(0, 2000),
            },
            65..=84 => Step::Api {
                replica: usize::try_from(rng.below(2)).unwrap_or(0),
                fault: match rng.below(4) {
                    0 => ApiFault::Reset,
                    1 => ApiFault::Outage,
                    2 => ApiFault::Latency,
                    _ => ApiFault::Blackhole,
                },
                ms: rng.between(500, 6000),
            },
            85..=89 if cloud => Step::CloudThrottle {
                every: rng.between(2, 5),
                ms: rng.between(1000, 5000),
            },
            90..=92 if cloud => Step::CloudErrors {
                every: rng.between(3, 6),
                ms: rng.between(1000, 4000),
            },
            _ => Step::Pause {
                ms: rng.between(100, 1500),
            },
        };
        out.push(step);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_schedule() {
        assert_eq!(generate(42, 40, true), generate(42, 40, true));
        assert_ne!(generate(42, 40, true), generate(43, 40, true));
    }

    #[test]
    fn schedules_mix_changes_and_faults() {
        let steps: Vec<Step> = (0..50).flat_map(|s| generate(s, 30, true)).collect();
        let kinds: std::collections::BTreeSet<_> =
            steps.iter().filter_map(Step::fault_kind).collect();
        for kind in [
            "sigkill",
            "sigterm",
            "sigkill_mid_cloud_call",
            "api_reset",
            "api_outage",
            "api_latency",
            "api_blackhole",
            "cloud_throttling",
            "cloud_5xx",
            "node_churn",
        ] {
            assert!(kinds.contains(kind), "{kind} never drawn");
        }
        assert!(generate(7, 30, false).iter().all(|s| !matches!(
            s,
            Step::KillMidCloudCall { .. } | Step::CloudThrottle { .. }
        )));
    }
}
