//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does:
//! acquire when the Lease is free or expired, renew every retry period, give up when renewal
//! has failed for the renew deadline, and release on shutdown so a successor starts at once.
//! Optimistic concurrency (the Lease's resourceVersion) settles races between candidates.
//!
//! The guarantees, and what each rests on:
//! - **Expiry is judged by the observer's own monotonic clock.** A candidate notes when *it*
//!   saw the Lease's record change and takes over only once the record has stayed the same
//!   for the Lease's duration; the holder's `renewTime` (another machine's wall clock) is
//!   never compared with this one's. A holder whose clock is hours off keeps its Lease for
//!   as long as it renews.
//! - **A leader stops before anyone else can start.** Every Lease call is bounded by
//!   `call_timeout` (less than the renew deadline), and `hold` returns once no renewal has
//!   succeeded for the renew deadline, counted from when the last successful attempt
//!   *began* — earlier than any observer can have seen it. Observers wait the (longer) lease
//!   duration, so a leader that cannot renew stops at least `lease_duration − renew_deadline`
//!   before a standby may take over; writes of the old leader delayed in the network by
//!   less than that margin land before the new leader acts.
//! - The Lease carries the class of the instance holding it, so a second ferry instance
//!   configured with the same Lease name says so instead of silently never leading.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Annotation on the leader Lease: the `loadBalancerClass` of the instance holding it.
pub const LEASE_CLASS_ANNOTATION: &str = "ferry.dev/load-balancer-class";

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    /// The class this instance serves, recorded on the Lease.
    pub class: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// The bound on one Lease call (a read or a write): half the renew deadline, so that a
    /// hung call leaves time for another attempt before the deadline.
    pub fn call_timeout(&self) -> Duration {
        (self.renew_deadline / 2).max(Duration::from_millis(100))
    }
}

/// Why election timings cannot work; checked before anything starts.
pub fn validate_timing(
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
) -> Result<(), String> {
    if renew_deadline >= lease_duration {
        return Err(format!(
            "the leader-election renew deadline ({}) must be shorter than the lease duration ({}), or a leader could still act after its Lease expired",
            humantime::format_duration(renew_deadline),
            humantime::format_duration(lease_duration)
        ));
    }
    if retry_period >= renew_deadline {
        return Err(format!(
            "the leader-election retry period ({}) must be shorter than the renew deadline ({})",
            humantime::format_duration(retry_period),
            humantime::format_duration(renew_deadline)
        ));
    }
    Ok(())
}

/// What a candidate should do with the Lease it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Create the Lease, nobody has it.
    Create,
    /// Take it over (free or expired): a new term.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a fresh claim.
    Wait { holder: String },
}

/// Pure: what to do given the Lease as read, and how long this candidate has seen its
/// record unchanged (on its own monotonic clock).
pub fn decide(lease: Option<&Lease>, identity: &str, unchanged_for: Duration) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    if unchanged_for > duration {
        Decision::Acquire
    } else {
        Decision::Wait { holder }
    }
}

/// The Lease's record as last seen, and when this process saw it change.
struct Observed {
    record: Option<String>,
    since: Instant,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Mutex<Option<Observed>>,
    warned_class: Mutex<bool>,
}

/// What identifies one version of the record: any write changes the resourceVersion.
fn record_of(lease: Option<&Lease>) -> Option<String> {
    lease.map(|l| l.resource_version().unwrap_or_default())
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
            warned_class: Mutex::new(false),
        }
    }

    /// How long the record has been unchanged, as this process saw it; a first sighting
    /// counts from now, so a candidate never takes over a Lease it has not watched for a
    /// whole duration.
    fn observe(&self, lease: Option<&Lease>) -> Duration {
        let record = record_of(lease);
        let now = Instant::now();
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match observed.as_ref() {
            Some(o) if o.record == record => now.saturating_duration_since(o.since),
            _ => {
                *observed = Some(Observed { record, since: now });
                Duration::ZERO
            }
        }
    }

    fn warn_if_other_class(&self, lease: &Lease) {
        let Some(class) = lease.annotations().get(LEASE_CLASS_ANNOTATION) else {
            return;
        };
        if *class == self.config.class {
            return;
        }
        let mut warned = self.warned_class.lock().unwrap_or_else(|e| e.into_inner());
        if !*warned {
            *warned = true;
            error!(lease = %self.config.lease_name, holder_class = %class, class = %self.config.class,
                "the leader Lease is held by a ferry instance of another class; give each instance its own --leader-elect-lease-name");
        }
    }

    /// One attempt, every call bounded by `call_timeout`: `Some(started)` when we hold the
    /// Lease afterwards, with the instant the attempt began (the conservative renewal time).
    pub async fn try_acquire_or_renew(&self) -> Result<Option<Instant>, kube::Error> {
        let started = Instant::now();
        let bound = self.config.call_timeout();
        let timed_out = || kube::Error::Service("the Lease call timed out".into());
        let current = tokio::time::timeout(bound, self.api.get_opt(&self.config.lease_name))
            .await
            .map_err(|_| timed_out())??;
        let unchanged_for = self.observe(current.as_ref());
        let decision = decide(current.as_ref(), &self.config.identity, unchanged_for);
        let duration =
            i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let now = MicroTime(jiff::Timestamp::now());
        let write = match decision {
            Decision::Wait { .. } => {
                if let Some(lease) = &current {
                    self.warn_if_other_class(lease);
                }
                return Ok(None);
            }
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.lease_name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        annotations: Some(
                            [(
                                LEASE_CLASS_ANNOTATION.to_string(),
                                self.config.class.clone(),
                            )]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                tokio::time::timeout(bound, self.api.create(&PostParams::default(), &lease)).await
            }
            Decision::Acquire | Decision::Renew => {
                // `current` is Some for these decisions.
                let Some(mut lease) = current else {
                    return Ok(None);
                };
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(now);
                lease.annotations_mut().insert(
                    LEASE_CLASS_ANNOTATION.to_string(),
                    self.config.class.clone(),
                );
                // resourceVersion is kept: a concurrent writer makes this fail with 409.
                tokio::time::timeout(
                    bound,
                    self.api
                        .replace(&self.config.lease_name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        match write.map_err(|_| timed_out())? {
            Ok(written) => {
                // Our own write is a change too: a successor counts from it.
                self.observe(Some(&written));
                Ok(Some(started))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate is the leader; returns when its term began (see `hold`).
    pub async fn acquire(&self) -> Instant {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Some(at)) => {
                    info!(identity = %self.config.identity, lease = %self.config.lease_name, "became leader");
                    return at;
                }
                Ok(None) => {
                    if !announced {
                        info!(lease = %self.config.lease_name, "waiting for leadership");
                        announced = true;
                    }
                }
                Err(err) => warn!(error = %err, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews every retry period; returns when leadership is lost: another candidate holds
    /// the Lease, or no renewal has succeeded for the renew deadline since the last good
    /// one began (`renewed`, from `acquire` at first). The deadline is a timer of its own,
    /// so a renewal that hangs cannot keep this process leading.
    pub async fn hold(&self, renewed: Instant) {
        let mut renewed = renewed;
        loop {
            let deadline = renewed + self.config.renew_deadline;
            let attempt = async {
                tokio::time::sleep(self.config.retry_period).await;
                self.try_acquire_or_renew().await
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(deadline = ?self.config.renew_deadline, "could not renew the leader lease within the renew deadline; stepping down");
                    return;
                }
                result = attempt => match result {
                    Ok(Some(at)) => renewed = at,
                    Ok(None) => {
                        warn!("another candidate holds the lease");
                        return;
                    }
                    Err(err) => warn!(error = %err, "renewing the leader lease failed"),
                },
            }
        }
    }

    /// Gives the Lease up so a successor need not wait for it to expire.
    pub async fn release(&self) {
        let bound = self.config.call_timeout();
        let Ok(Ok(Some(mut lease))) =
            tokio::time::timeout(bound, self.api.get_opt(&self.config.lease_name)).await
        else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match tokio::time::timeout(
            bound,
            self.api
                .replace(&lease.name_any(), &PostParams::default(), &lease),
        )
        .await
        {
            Ok(Ok(_)) => info!("released the leader lease"),
            Ok(Err(err)) => warn!(error = %err, "could not release the leader lease"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    now - jiff::SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let secs = Duration::from_secs;
        assert_eq!(decide(None, "a", secs(0)), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 5, 15)), "a", secs(0)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 5, 15)), "a", secs(5)),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 5, 15)), "a", secs(16)),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&lease(None, 1, 15)), "a", secs(0)),
            Decision::Acquire
        );
    }

    #[test]
    fn the_holders_clock_is_never_compared_with_ours() {
        // Renewed "an hour ago" by a holder whose clock is behind: as long as the record
        // keeps changing, it is not expired.
        let skewed = lease(Some("b"), 3600, 15);
        assert_eq!(
            decide(Some(&skewed), "a", Duration::from_secs(1)),
            Decision::Wait { holder: "b".into() }
        );
        // And a holder whose clock is ahead does not keep a dead Lease alive.
        let ahead = lease(Some("b"), -3600, 15);
        assert_eq!(
            decide(Some(&ahead), "a", Duration::from_secs(16)),
            Decision::Acquire
        );
    }

    #[test]
    fn timings_that_allow_two_leaders_are_refused() {
        let secs = Duration::from_secs;
        assert!(validate_timing(secs(15), secs(10), secs(2)).is_ok());
        let e = validate_timing(secs(10), secs(10), secs(2)).unwrap_err();
        assert!(
            e.contains("renew deadline") && e.contains("lease duration"),
            "{e}"
        );
        assert!(validate_timing(secs(15), secs(2), secs(2)).is_err());
    }
}
