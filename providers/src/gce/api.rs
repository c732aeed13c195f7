//! The Compute Engine clients ferry uses, built once, and what every write shares: where
//! resources live (`Location`, URLs), and settling an Operation. A write returns an
//! Operation; `settle` polls it (quickly at first) for at most `--gce-operation-wait`, and
//! an Operation still RUNNING then is remembered for its Service and reported as
//! `InProgress`, so a slow GCE shows the Service as provisioning instead of holding a
//! reconcile slot. The next `ensure` or `delete` of that Service first asks after the
//! Operations it remembers. After a restart nothing is remembered: a create whose name GCE
//! still reserves answers 409 while the resource is not there yet, which converge also reads
//! as in progress (`creating`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use google_cloud_compute_v1::client;
use google_cloud_compute_v1::model::Operation;
use google_cloud_compute_v1::model::operation::Status as OpStatus;
use tokio::time::Instant;

use super::calls::{Calls, operation_failed};
use super::spec::Location;
use crate::ProviderError;
use crate::calls::RetryPolicy;

/// The public API root; resources' selfLinks name `www.googleapis.com`.
pub const DEFAULT_ENDPOINT: &str = "https://compute.googleapis.com";
/// How soon a Service whose Operation is still running is looked at again.
pub const RECHECK: Duration = Duration::from_secs(5);

/// Where an Operation lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Region,
    Global,
}

/// An Operation ferry started and has not seen finish.
#[derive(Clone, Debug)]
pub struct Pending {
    pub scope: Scope,
    pub name: String,
    /// `forwardingRules.insert ferry-…-tcp`, for the condition.
    pub what: String,
}

pub struct Clients {
    pub addresses: client::Addresses,
    pub rules: client::ForwardingRules,
    pub pools: client::TargetPools,
    pub health_checks: client::HttpHealthChecks,
    pub firewalls: client::Firewalls,
    pub instances: client::Instances,
    pub region_ops: client::RegionOperations,
    pub global_ops: client::GlobalOperations,
}

impl Clients {
    /// Every client on `endpoint`, with `credentials` (None: Application Default
    /// Credentials) and the client's own retries off (ours are in `calls`).
    pub async fn build(
        endpoint: &str,
        credentials: Option<google_cloud_auth::credentials::Credentials>,
    ) -> Result<Self, ProviderError> {
        let credentials = match credentials {
            Some(c) => c,
            None => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| ProviderError::Configuration {
                    reason: "NoCredentials",
                    message: format!(
                        "no Google credentials (Workload Identity, the metadata server or GOOGLE_APPLICATION_CREDENTIALS): {e}"
                    ),
                })?,
        };
        macro_rules! build {
            ($client:ty) => {
                <$client>::builder()
                    .with_endpoint(endpoint)
                    .with_credentials(credentials.clone())
                    .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
                    .build()
                    .await
                    .map_err(|e| ProviderError::Configuration {
                        reason: "GCEClient",
                        message: format!("cannot build the Compute Engine client: {e}"),
                    })?
            };
        }
        Ok(Self {
            addresses: build!(client::Addresses),
            rules: build!(client::ForwardingRules),
            pools: build!(client::TargetPools),
            health_checks: build!(client::HttpHealthChecks),
            firewalls: build!(client::Firewalls),
            instances: build!(client::Instances),
            region_ops: build!(client::RegionOperations),
            global_ops: build!(client::GlobalOperations),
        })
    }
}

pub struct Api {
    pub clients: Clients,
    pub calls: Calls,
    pub location: Location,
    operation_wait: Duration,
    pending: Mutex<HashMap<String, Vec<Pending>>>,
}

/// The part of a resource URL from `projects/` on, which is what identifies it whichever
/// host name the URL carries (GCE accepts and answers several).
pub fn relative(link: &str) -> &str {
    link.find("projects/").map_or(link, |i| &link[i..])
}

/// The last segment of a resource URL: its name.
pub fn last_segment(link: &str) -> &str {
    link.rsplit('/').next().unwrap_or(link)
}

impl Api {
    pub fn new(
        clients: Clients,
        location: Location,
        calls_per_second: f64,
        retry: RetryPolicy,
        operation_wait: Duration,
    ) -> Self {
        Self {
            clients,
            calls: Calls::new(calls_per_second, retry),
            location,
            operation_wait,
            pending: Mutex::default(),
        }
    }

    pub fn project(&self) -> &str {
        &self.location.project
    }

    pub fn region(&self) -> &str {
        &self.location.region
    }

    /// A regional resource's partial URL (`collection` as in the API: `addresses`,
    /// `targetPools`). References are partial URLs, which GCE takes whichever endpoint it
    /// is reached at, and answers as full ones (compared through `relative`).
    pub fn regional(&self, collection: &str, name: &str) -> String {
        format!(
            "projects/{}/regions/{}/{collection}/{name}",
            self.project(),
            self.region()
        )
    }

    /// A global resource's partial URL (`httpHealthChecks`, `firewalls`, `networks`).
    pub fn global(&self, collection: &str, name: &str) -> String {
        format!("projects/{}/global/{collection}/{name}", self.project())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Pending>>> {
        // Each critical section is one map operation; a poisoned lock is still sound.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for `op` (started for the Service `uid`) to finish, for at most the operation
    /// wait; a failed Operation is its error, one still running `InProgress`.
    pub async fn settle(
        &self,
        uid: &str,
        scope: Scope,
        what: String,
        op: Operation,
    ) -> Result<(), ProviderError> {
        let deadline = Instant::now() + self.operation_wait;
        let mut op = op;
        let mut interval = Duration::from_millis(200);
        loop {
            if let Some(result) = finished(&what, &op) {
                return result;
            }
            let Some(name) = op.name.clone() else {
                return Err(ProviderError::transient(format!(
                    "{what}: Compute Engine answered an Operation with no name"
                )));
            };
            if Instant::now() + interval > deadline {
                self.pending()
                    .entry(uid.to_string())
                    .or_default()
                    .push(Pending {
                        scope,
                        name,
                        what: what.clone(),
                    });
                return Err(still_running(&what));
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_secs(2));
            op = self.operation(scope, &name).await?.ok_or_else(|| {
                ProviderError::transient(format!("{what}: Compute Engine lost the Operation"))
            })?;
        }
    }

    /// The Operation `name`; `None` once GCE no longer knows it.
    async fn operation(
        &self,
        scope: Scope,
        name: &str,
    ) -> Result<Option<Operation>, ProviderError> {
        let (p, r) = (self.project(), self.region());
        Ok(match scope {
            Scope::Region => {
                self.calls
                    .find("regionOperations.get", || {
                        self.clients
                            .region_ops
                            .get()
                            .set_project(p)
                            .set_region(r)
                            .set_operation(name)
                            .send()
                    })
                    .await?
            }
            Scope::Global => {
                self.calls
                    .find("globalOperations.get", || {
                        self.clients
                            .global_ops
                            .get()
                            .set_project(p)
                            .set_operation(name)
                            .send()
                    })
                    .await?
            }
        })
    }

    /// Asks after the Operations remembered for `uid`: `InProgress` while one still runs,
    /// the error of one that failed (reported once), else nothing is pending any more.
    pub async fn check_pending(&self, uid: &str) -> Result<(), ProviderError> {
        let Some(pending) = self.pending().remove(uid) else {
            return Ok(());
        };
        let mut running = Vec::new();
        let mut failure = None;
        for p in pending {
            match self.operation(p.scope, &p.name).await {
                Ok(Some(op)) => match finished(&p.what, &op) {
                    None => running.push(p),
                    Some(Ok(())) => {}
                    Some(Err(e)) => failure = failure.or(Some(e)),
                },
                // An Operation GCE no longer knows is over; converge reads the outcome.
                Ok(None) => {}
                // Unknown for now: ask again next time, and say why.
                Err(e) => {
                    running.push(p);
                    failure = failure.or(Some(e));
                }
            }
        }
        let first = running.first().map(|p| p.what.clone());
        if !running.is_empty() {
            self.pending().insert(uid.to_string(), running);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        match first {
            Some(what) => Err(still_running(&what)),
            None => Ok(()),
        }
    }

    /// Forgets what was pending for `uid` (its Service is gone from this provider's care).
    pub fn forget(&self, uid: &str) {
        self.pending().remove(uid);
    }
}

fn still_running(what: &str) -> ProviderError {
    ProviderError::in_progress(
        format!("waiting for Compute Engine: {what} is still running"),
        RECHECK,
    )
}

/// `Some` once `op` is DONE: its error, if it failed.
fn finished(what: &str, op: &Operation) -> Option<Result<(), ProviderError>> {
    if op.status != Some(OpStatus::Done) {
        return None;
    }
    let codes: Vec<(String, String)> = op
        .error
        .iter()
        .flat_map(|e| e.errors.iter())
        .map(|e| {
            (
                e.code.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default(),
            )
        })
        .collect();
    if codes.is_empty() && op.http_error_status_code.is_none_or(|c| c < 400) {
        return Some(Ok(()));
    }
    let codes = if codes.is_empty() {
        vec![(
            "HTTP_ERROR".to_string(),
            op.http_error_message.clone().unwrap_or_default(),
        )]
    } else {
        codes
    };
    Some(Err(operation_failed(what, &codes)))
}
