//! Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does:
//! acquire when the Lease is free or expired, renew every retry period, give up when renewal
//! has failed for the renew deadline, and release on shutdown so a successor starts at once.
//! Optimistic concurrency (the Lease's resourceVersion) settles races between candidates.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
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

/// Pure: what to do given the Lease as read at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: jiff::Timestamp) -> Decision {
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
    let duration = spec.lease_duration_seconds.unwrap_or(0).max(0);
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    let expired = match renewed {
        None => true,
        Some(at) => at + jiff::SignedDuration::from_secs(i64::from(duration)) < now,
    };
    if expired {
        Decision::Acquire
    } else {
        Decision::Wait { holder }
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// One attempt: true when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let current = self.api.get_opt(&self.config.lease_name).await?;
        let decision = decide(current.as_ref(), &self.config.identity, now);
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let result = match decision {
            Decision::Wait { .. } => return Ok(false),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.lease_name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.config.identity.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            Decision::Acquire | Decision::Renew => {
                // `current` is Some for these decisions.
                let Some(mut lease) = current else {
                    return Ok(false);
                };
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.holder_identity = Some(self.config.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(MicroTime(now));
                // resourceVersion is kept: a concurrent writer makes this fail with 409.
                self.api
                    .replace(&self.config.lease_name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate is the leader.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(identity = %self.config.identity, lease = %self.config.lease_name, "became leader");
                    return;
                }
                Ok(false) => {
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

    /// Renews until renewal has failed for the renew deadline; returns when leadership is lost.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("another candidate holds the lease");
                    return;
                }
                Err(err) => warn!(error = %err, "renewing the leader lease failed"),
            }
            if last_renewal.elapsed() > self.config.renew_deadline {
                warn!("could not renew the leader lease within the renew deadline");
                return;
            }
        }
    }

    /// Gives the Lease up so a successor need not wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.lease_name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the leader lease"),
            Err(err) => warn!(error = %err, "could not release the leader lease"),
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

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", now()), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 5, 15)), "a", now()),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 5, 15)), "a", now()),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 16, 15)), "a", now()),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&lease(None, 1, 15)), "a", now()),
            Decision::Acquire
        );
    }
}
