//! Reconciling one Service: decide whether it is ours, hold the finalizer while a balancer
//! may exist, compute the desired balancer, let the provider converge it, and publish the
//! result as status, condition and Events. `error_policy` maps each typed error to the next
//! action: backoff, Retry-After, or waiting for a change.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_providers::{DesiredLoadBalancer, LoadBalancerId, LoadBalancerProvider, ProviderError};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::class::{ClassFilter, PROVISIONED_BY, Provisioner, provisioned_by};
use crate::desired::{self, InvalidService, id_of};
use crate::eligibility::eligible_targets;
use crate::metrics::Metrics;
use crate::status::{self, Readiness, current_ingress, ingress_of, status_patch};

pub use ferry_providers::class::FINALIZER;
const FIELD_MANAGER: &str = "ferry-operator";

/// Waiting time after errors that need an outside change but might also pass (an address
/// held by another Service, a permission): long enough never to be a hot loop.
const SLOW_RETRY: Duration = Duration::from_secs(300);

/// The condition reason of a Service whose balancer the cloud is still provisioning.
pub const PROVISIONING: &str = "Provisioning";
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A provider that answers within this time needs no "Ensuring" Event first.
const ENSURING_EVENT_AFTER: Duration = Duration::from_millis(500);
const MAX_EVENTS_IN_FLIGHT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(#[from] InvalidService),
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_service",
            Self::Provider(e) => e.kind(),
            Self::Kube(_) => "kubernetes",
        }
    }
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub provider: Arc<dyn LoadBalancerProvider>,
    pub class: ClassFilter,
    pub nodes: Store<Node>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub resync: Duration,
    /// What was last ensured per Service UID, so a node change can become a target update.
    applied: Mutex<HashMap<String, DesiredLoadBalancer>>,
    /// Consecutive transient failures per Service UID, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Events being published at once.
    event_slots: Arc<tokio::sync::Semaphore>,
    /// The API server was seen to drop `ingress[].ipMode` from what was written.
    ip_mode_dropped: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single map operation; a poisoned lock is still sound.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Context {
    pub fn new(
        client: Client,
        provider: Arc<dyn LoadBalancerProvider>,
        class: ClassFilter,
        nodes: Store<Node>,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        resync: Duration,
    ) -> Self {
        Self {
            client,
            provider,
            class,
            nodes,
            recorder,
            metrics,
            resync,
            applied: Mutex::default(),
            failures: Mutex::default(),
            event_slots: Arc::new(tokio::sync::Semaphore::new(MAX_EVENTS_IN_FLIGHT)),
            ip_mode_dropped: AtomicBool::new(false),
        }
    }

    /// Eligible targets for balancers, as the provider can use them.
    pub fn targets(&self) -> Vec<ferry_providers::NodeTarget> {
        let nodes = self.nodes.state();
        eligible_targets(nodes.iter().map(|n| n.as_ref()), |t| {
            self.provider.can_target(t)
        })
    }

    /// What was last ensured for `uid`.
    pub fn applied(&self, uid: &str) -> Option<DesiredLoadBalancer> {
        lock(&self.applied).get(uid).cloned()
    }

    fn forget(&self, uid: &str) {
        lock(&self.applied).remove(uid);
        lock(&self.failures).remove(uid);
    }

    async fn call<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let start = Instant::now();
        let result = fut.await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics
            .provider_call(operation, outcome, start.elapsed());
        result
    }

    async fn event(
        &self,
        svc: &Service,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        // Events are published off the reconcile path: they must not add a round trip to
        // every Service, and under pressure they are dropped (as client-go's broadcaster
        // does) rather than queued without bound.
        let Ok(permit) = self.event_slots.clone().try_acquire_owned() else {
            debug!(reason, "too many Events in flight; dropping one");
            return;
        };
        let recorder = self.recorder.clone();
        let reference = svc.object_ref(&());
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&event, &reference).await {
                warn!(error = %err, reason, "could not publish Event");
            }
            drop(permit);
        });
    }
}

fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

/// `/metadata/annotations/<PROVISIONED_BY>` as a JSON pointer.
fn record_path() -> String {
    format!(
        "/metadata/annotations/{}",
        PROVISIONED_BY.replace('~', "~0").replace('/', "~1")
    )
}

/// The JSON patch that gives `svc` ferry's finalizer and `class`'s record, or `None` when it
/// has both. `test` operations make a concurrent writer's change fail the patch instead of
/// being lost.
fn claim_ops(svc: &Service, class: &str) -> Option<serde_json::Value> {
    let finalizers = svc.finalizers();
    let recorded = provisioned_by(svc) == Some(class);
    if has_finalizer(svc) && recorded {
        return None;
    }
    let mut ops = Vec::new();
    if !has_finalizer(svc) {
        if finalizers.is_empty() {
            ops.push(json!({ "op": "test", "path": "/metadata/finalizers", "value": null }));
            ops.push(json!({ "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }));
        } else {
            ops.push(json!({ "op": "test", "path": "/metadata/finalizers", "value": finalizers }));
            ops.push(json!({ "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER }));
        }
    }
    if !recorded {
        match svc.metadata.annotations.as_ref() {
            None => {
                ops.push(json!({ "op": "test", "path": "/metadata/annotations", "value": null }));
                ops.push(json!({ "op": "add", "path": "/metadata/annotations", "value": { PROVISIONED_BY: class } }));
            }
            Some(annotations) => {
                ops.push(json!({ "op": "test", "path": record_path(), "value": annotations.get(PROVISIONED_BY) }));
                ops.push(json!({ "op": "add", "path": record_path(), "value": class }));
            }
        }
    }
    Some(serde_json::Value::Array(ops))
}

/// Claims the Service for this instance: finalizer and record, in one write.
async fn claim(api: &Api<Service>, svc: &Service, class: &str) -> Result<(), kube::Error> {
    match claim_ops(svc, class) {
        Some(ops) => patch_json(api, svc, ops).await,
        None => Ok(()),
    }
}

/// Releases the Service: the finalizer and, when it names `class`, the record, in one write.
async fn release(api: &Api<Service>, svc: &Service, class: &str) -> Result<(), kube::Error> {
    let mut ops = Vec::new();
    if let Some(index) = svc.finalizers().iter().position(|f| f == FINALIZER) {
        let path = format!("/metadata/finalizers/{index}");
        ops.push(json!({ "op": "test", "path": path, "value": FINALIZER }));
        ops.push(json!({ "op": "remove", "path": path }));
    }
    if provisioned_by(svc) == Some(class) {
        ops.push(json!({ "op": "test", "path": record_path(), "value": class }));
        ops.push(json!({ "op": "remove", "path": record_path() }));
    }
    if ops.is_empty() {
        return Ok(());
    }
    match patch_json(api, svc, serde_json::Value::Array(ops)).await {
        // Already gone with the object: nothing left to do.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

async fn patch_json(
    api: &Api<Service>,
    svc: &Service,
    ops: serde_json::Value,
) -> Result<(), kube::Error> {
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    api.patch::<Service>(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Json::<Service>(patch),
    )
    .await
    .map(|_| ())
}

/// Writes what differs of `ingress` and `readiness`; returns whether anything was written.
/// An API server that drops `ipMode` (before Kubernetes 1.30, or with the LoadBalancerIPMode
/// gate off) is noticed from its answer, and `ipMode` is left out of comparisons from then
/// on: otherwise every reconcile would write the same status again, and the write's own
/// watch event would start the next one.
async fn write_status(
    ctx: &Context,
    api: &Api<Service>,
    svc: &Service,
    ingress: Option<&[k8s_openapi::api::core::v1::LoadBalancerIngress]>,
    readiness: Option<&Readiness>,
) -> Result<bool, kube::Error> {
    let ip_mode_kept = !ctx.ip_mode_dropped.load(Ordering::Relaxed);
    let Some(body) = status_patch(svc, ingress, readiness, ip_mode_kept) else {
        return Ok(false);
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let written = api
        .patch_status(&svc.name_any(), &params, &Patch::Strategic(&body))
        .await?;
    if ip_mode_kept
        && let Some(sent) = ingress
        && status::ip_mode_dropped(sent, &current_ingress(&written))
        && !ctx.ip_mode_dropped.swap(true, Ordering::Relaxed)
    {
        warn!(
            "this API server drops status.loadBalancer.ingress[].ipMode (Kubernetes before 1.30, \
             or the LoadBalancerIPMode feature gate off): Services read as ipMode VIP, so the \
             forwarders only announce their addresses and kube-proxy forwards the traffic"
        );
    }
    Ok(true)
}

/// The reconcile entry point for the controller.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()));
    let start = Instant::now();
    let result = reconcile_inner(&svc, &ctx).instrument(span).await;
    ctx.metrics
        .reconciled(if result.is_ok() { "ok" } else { "error" }, start.elapsed());
    if result.is_ok() {
        lock(&ctx.failures).remove(&svc.uid().unwrap_or_default());
    }
    result
}

async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let id = id_of(svc);
    let deleting = svc.metadata.deletion_timestamp.is_some();
    let serving = !deleting && ctx.class.owns(svc);
    match ctx.class.provisioner(svc) {
        // Another instance provisioned it: only that instance may clean it up, and it must
        // have done so before this one provisions anything (the release of its record
        // wakes this Service up again).
        Provisioner::Other(class) => {
            ctx.forget(&id.uid);
            if !serving {
                return Ok(Action::await_change());
            }
            let message = format!(
                "waiting for the ferry instance of class {class:?}, which provisioned this Service, to release it (it removes the {PROVISIONED_BY} annotation and the {FINALIZER} finalizer; if no such instance runs any more, remove both by hand)"
            );
            info!(previous = %class, "Service moved to this class; waiting for the previous instance to clean up");
            ctx.event(
                svc,
                EventType::Normal,
                "EnsuringLoadBalancer",
                message.clone(),
                "Ensure",
            )
            .await;
            write_status(
                ctx,
                &api,
                svc,
                None,
                Some(&Readiness::failed("ReleasedByPreviousClass", message)),
            )
            .await?;
            return Ok(Action::requeue(SLOW_RETRY));
        }
        Provisioner::Us if !serving => {
            if let Cleanup::InProgress(after) = cleanup(svc, &id, deleting, &api, ctx).await? {
                return Ok(Action::requeue(after));
            }
            ctx.forget(&id.uid);
            return Ok(Action::await_change());
        }
        // A finalizer from before records: cleaned up only by the instance whose provider
        // holds something for the Service.
        Provisioner::Unrecorded if !serving => {
            if ctx.call("get", ctx.provider.get(&id)).await?.is_some() {
                if let Cleanup::InProgress(after) = cleanup(svc, &id, deleting, &api, ctx).await? {
                    return Ok(Action::requeue(after));
                }
            } else {
                debug!(
                    "ferry's finalizer without a record, and nothing of this instance's; leaving it to its owner"
                );
            }
            ctx.forget(&id.uid);
            return Ok(Action::await_change());
        }
        Provisioner::Nobody if !serving => {
            ctx.forget(&id.uid);
            return Ok(Action::await_change());
        }
        Provisioner::Us | Provisioner::Unrecorded | Provisioner::Nobody => {}
    }

    // The finalizer and the record go on before anything is provisioned, so nothing can
    // outlive the Service and only this instance will clean it up.
    claim(&api, svc, &ctx.class.class).await?;

    let targets = ctx.targets();
    let desired = match desired::desired(svc, &targets) {
        Ok(d) => d,
        Err(invalid) => {
            report_failure(
                svc,
                &api,
                ctx,
                "InvalidConfiguration",
                invalid.reason,
                &invalid.message,
            )
            .await?;
            return Err(invalid.into());
        }
    };

    let previous = ctx.applied(&id.uid);
    let only_targets = previous.as_ref().is_some_and(|p| {
        p.targets != desired.targets && p.without_targets() == desired.without_targets()
    });
    let fresh = current_ingress(svc).is_empty() && previous.is_none();
    let result = if only_targets {
        ctx.call("update_targets", ctx.provider.update_targets(&desired))
            .await
    } else {
        let ensure = ctx.call("ensure", ctx.provider.ensure(&desired));
        tokio::pin!(ensure);
        // "Ensuring" only when provisioning takes long enough for someone to wonder.
        tokio::select! {
            result = &mut ensure => result,
            _ = tokio::time::sleep(ENSURING_EVENT_AFTER), if fresh => {
                ctx.event(svc, EventType::Normal, "EnsuringLoadBalancer", "Ensuring load balancer".into(), "Ensure").await;
                ensure.await
            }
        }
    };
    let observed = match result {
        Ok(o) => o,
        // The cloud is still at it: say so, and look again when it said to.
        Err(ProviderError::InProgress {
            message,
            retry_after,
        }) => {
            let already = status::current_condition(svc).is_some_and(|c| c.reason == PROVISIONING);
            info!(%message, after = ?retry_after, "load balancer still provisioning");
            if !already {
                ctx.event(
                    svc,
                    EventType::Normal,
                    "EnsuringLoadBalancer",
                    format!("Ensuring load balancer: {message}"),
                    "Ensure",
                )
                .await;
            }
            write_status(
                ctx,
                &api,
                svc,
                None,
                Some(&Readiness::failed(PROVISIONING, message)),
            )
            .await?;
            return Ok(Action::requeue(recheck_after(retry_after)));
        }
        Err(err) => {
            let event_reason = match (&err, only_targets) {
                (ProviderError::Allocation { .. }, _) => "IPAllocationFailed",
                (ProviderError::InvalidInput { .. }, _) => "InvalidConfiguration",
                (_, true) => "UpdateLoadBalancerFailed",
                _ => "SyncLoadBalancerFailed",
            };
            report_failure(svc, &api, ctx, event_reason, err.reason(), &err.to_string()).await?;
            return Err(err.into());
        }
    };
    lock(&ctx.applied).insert(id.uid.clone(), desired.clone());
    if previous.as_ref() != Some(&desired) {
        // Said once per change of the balancer, not at every resync.
        for notice in &observed.notices {
            ctx.event(
                svc,
                EventType::Warning,
                "IgnoredSetting",
                notice.clone(),
                "Ensure",
            )
            .await;
        }
    }

    let ingress = ingress_of(&observed);
    let changed_ingress = !status::same_ingress(
        &current_ingress(svc),
        &ingress,
        !ctx.ip_mode_dropped.load(Ordering::Relaxed),
    );
    if write_status(ctx, &api, svc, Some(&ingress), Some(&Readiness::ready())).await? {
        debug!("status updated");
    }
    if only_targets {
        let names: Vec<_> = desired.targets.iter().map(|t| t.name.as_str()).collect();
        ctx.event(
            svc,
            EventType::Normal,
            "UpdatedLoadBalancer",
            format!(
                "Updated load balancer with new hosts ({} nodes)",
                names.len()
            ),
            "Update",
        )
        .await;
    } else if changed_ingress {
        let shown: Vec<String> = ingress
            .iter()
            .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
            .collect();
        info!(ingress = ?shown, "load balancer ensured");
        ctx.event(
            svc,
            EventType::Normal,
            "EnsuredLoadBalancer",
            format!("Ensured load balancer: {}", shown.join(", ")),
            "Ensure",
        )
        .await;
    }
    Ok(Action::requeue(jitter(ctx.resync, &id.uid)))
}

/// Publishes a failure: a Warning Event and the condition, keeping whatever ingress the
/// Service already shows (a failed change never takes an address away).
async fn report_failure(
    svc: &Service,
    api: &Api<Service>,
    ctx: &Context,
    event_reason: &str,
    reason: &'static str,
    message: &str,
) -> Result<(), kube::Error> {
    warn!(reason, message, "load balancer not ready");
    ctx.event(
        svc,
        EventType::Warning,
        event_reason,
        message.to_string(),
        "Ensure",
    )
    .await;
    write_status(
        ctx,
        api,
        svc,
        None,
        Some(&Readiness::failed(reason, message)),
    )
    .await?;
    Ok(())
}

async fn cleanup(
    svc: &Service,
    id: &LoadBalancerId,
    deleting: bool,
    api: &Api<Service>,
    ctx: &Context,
) -> Result<Cleanup, Error> {
    ctx.event(
        svc,
        EventType::Normal,
        "DeletingLoadBalancer",
        "Deleting load balancer".into(),
        "Delete",
    )
    .await;
    // What this instance published, so that only that is withdrawn: the controller the
    // Service moved to may already have written its own.
    let published = ctx
        .call("get", ctx.provider.get(id))
        .await?
        .map(|observed| ingress_of(&observed));
    let ours = published.is_some_and(|p| same_addresses(&current_ingress(svc), &p));
    // A Service being deleted stops showing the address before the address is given back:
    // otherwise, until its finalizer goes (or after a crash, for as long as it stays), it
    // would show an address the next Service already has.
    if deleting && ours && !current_ingress(svc).is_empty() {
        write_status(ctx, api, svc, Some(&[]), None).await?;
    }
    match ctx.call("delete", ctx.provider.delete(id)).await {
        Ok(()) => {}
        Err(ProviderError::InProgress {
            message,
            retry_after,
        }) => {
            info!(%message, after = ?retry_after, "load balancer still being deleted");
            return Ok(Cleanup::InProgress(recheck_after(retry_after)));
        }
        Err(err) => {
            ctx.event(
                svc,
                EventType::Warning,
                "SyncLoadBalancerFailed",
                format!("Error deleting load balancer: {err}"),
                "Delete",
            )
            .await;
            return Err(err.into());
        }
    }
    if !deleting {
        // The Service stays but is no longer ours: take back what ferry published.
        write_status(ctx, api, svc, ours.then_some(&[][..]), None).await?;
    }
    release(api, svc, &ctx.class.class).await?;
    info!("load balancer deleted");
    ctx.event(
        svc,
        EventType::Normal,
        "DeletedLoadBalancer",
        "Deleted load balancer".into(),
        "Delete",
    )
    .await;
    Ok(Cleanup::Done)
}

/// How a cleanup ended.
enum Cleanup {
    Done,
    /// The provider is still deleting; look again after this long (finalizer kept).
    InProgress(Duration),
}

/// When to look again at a change the provider says is still running: when it said, within
/// a second and the slow retry.
fn recheck_after(retry_after: Duration) -> Duration {
    retry_after.clamp(Duration::from_secs(1), SLOW_RETRY)
}

/// Whether every address or name in `shown` is one of `ours` (ipMode aside).
fn same_addresses(
    shown: &[k8s_openapi::api::core::v1::LoadBalancerIngress],
    ours: &[k8s_openapi::api::core::v1::LoadBalancerIngress],
) -> bool {
    let key =
        |i: &k8s_openapi::api::core::v1::LoadBalancerIngress| (i.ip.clone(), i.hostname.clone());
    shown.iter().all(|s| ours.iter().any(|o| key(o) == key(s)))
}

/// Spreads periodic resyncs so that they do not all land at once.
fn jitter(base: Duration, key: &str) -> Duration {
    base + spread(key, base / 10)
}

/// A duration below `max`, fixed per `key`, so that retries of many Services fan out.
fn spread(key: &str, max: Duration) -> Duration {
    let hash = key
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let max = max.as_millis() as u64;
    Duration::from_millis(if max == 0 { 0 } else { hash % max })
}

/// What to do after a failed reconcile.
pub fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(err.kind());
    match retry_delay(err, &ctx, &svc.uid().unwrap_or_default()) {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    }
}

/// When to try again after `err` (`None`: when the Service changes); counts consecutive
/// transient failures of `uid` for its backoff.
pub fn retry_delay(err: &Error, ctx: &Context, uid: &str) -> Option<Duration> {
    let uid = uid.to_string();
    match err {
        // Retrying changes nothing until the Service changes (which triggers a reconcile).
        Error::Invalid(_) | Error::Provider(ProviderError::InvalidInput { .. }) => None,
        // Also retried at once when the provider signals a change (pool edited, address freed).
        Error::Provider(
            ProviderError::Allocation { .. }
            | ProviderError::Conflict { .. }
            | ProviderError::Configuration { .. },
        ) => Some(SLOW_RETRY),
        Error::Provider(ProviderError::Transient {
            retry_after: Some(after),
            ..
        }) => Some(*after),
        Error::Provider(ProviderError::InProgress { retry_after, .. }) => {
            Some(recheck_after(*retry_after))
        }
        // An overloaded API server says when to come back; that is not this Service's fault,
        // so it does not grow the Service's backoff.
        Error::Kube(kube::Error::Api(status)) if status.code == 429 => {
            let after = status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .unwrap_or(1);
            Some(Duration::from_secs(u64::from(after)) + spread(&uid, Duration::from_secs(1)))
        }
        Error::Provider(ProviderError::Transient {
            retry_after: None, ..
        })
        | Error::Kube(_) => {
            let attempts = {
                let mut failures = lock(&ctx.failures);
                let n = failures.entry(uid.clone()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            };
            Some(backoff(attempts, &uid))
        }
    }
}

/// Exponential backoff from 1 s to 5 min, with up to 10% jitter.
pub fn backoff(attempts: u32, key: &str) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
    let base = exp.min(BACKOFF_MAX);
    jitter(base, &format!("{key}/{attempts}"))
}

/// Used by the readiness condition of a Service that is not provisioned yet.
pub fn is_ready(svc: &Service) -> bool {
    status::current_condition(svc).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
