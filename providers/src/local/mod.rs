//! The local provider: addresses from `LoadBalancerPool`s for clusters without a cloud.
//! It owns the pools (watching them, validating them, writing their status) and the
//! allocator; traffic is the forwarder's business, so targets are ignored here.
//!
//! Allocation state lives in memory and is rebuilt from Services' `status` in `start`, which
//! the operator calls each time it becomes leader, before any allocation.

mod args;
pub mod ipam;

pub use ferry_model::desired::{PROXY_PROTOCOL_ANNOTATION, proxy_protocol_of};
pub use ferry_model::ingress::status_ingress;
pub use ferry_model::{pools, ranges};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use ferry_crds::{LoadBalancerPool, LoadBalancerPoolStatus, POOL_READY_CONDITION};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::{
    DesiredLoadBalancer, Ingress, IpMode, LoadBalancerId, LoadBalancerProvider,
    ObservedLoadBalancer, Owned, Protocol, ProviderError, ProviderSignal, TrafficPolicy,
};
pub use args::LocalArgs;
use ipam::{AllocationRequest, Assigned, PoolAllocator};

/// Annotation choosing how traffic reaches a Service's address (`Proxy` or `VIP`).
pub const IP_MODE_ANNOTATION: &str = "ferry.dev/ip-mode";

/// How the operator sees a Service: `None` when it is not this operator's, `Some(Ok)` with its
/// desired balancer, `Some(Err(id))` when it is ours but its spec is invalid (its addresses
/// are still held, so nobody else gets them).
pub type ServiceLens =
    Arc<dyn Fn(&Service) -> Option<Result<DesiredLoadBalancer, LoadBalancerId>> + Send + Sync>;

pub struct LocalConfig {
    pub client: Client,
    /// The `loadBalancerClass` this instance serves: it allocates only from pools for it.
    pub class: String,
    pub lens: ServiceLens,
    /// How often the repair pass compares allocations with Services' status.
    pub repair_interval: Duration,
}

struct State {
    allocator: PoolAllocator,
    verdicts: BTreeMap<String, pools::Verdict>,
    /// What the pools said (name, creation time, spec) when last applied: status updates of
    /// the pools, including ferry's own, change nothing and must not requeue every Service.
    applied_specs: Option<Vec<(String, Option<String>, String)>>,
    started: bool,
}

struct Inner {
    client: Client,
    class: String,
    lens: ServiceLens,
    repair_interval: Duration,
    state: Mutex<State>,
    pools: Store<LoadBalancerPool>,
    namespaces: Store<Namespace>,
    signal_tx: mpsc::Sender<ProviderSignal>,
    signal_rx: Mutex<Option<mpsc::Receiver<ProviderSignal>>>,
    status_dirty: Notify,
    pool_addresses: Family<Vec<(String, String)>, Gauge>,
}

pub struct LocalProvider {
    inner: Arc<Inner>,
    /// The stores' writers until `start` hands them to their watches.
    writers: Mutex<Option<Writers>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Writers {
    pools: reflector::store::Writer<LoadBalancerPool>,
    namespaces: reflector::store::Writer<Namespace>,
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

fn ip_mode_of(desired: &DesiredLoadBalancer) -> Result<Option<IpMode>, ProviderError> {
    match desired
        .annotations
        .get(IP_MODE_ANNOTATION)
        .map(|s| s.trim())
    {
        None => Ok(None),
        Some("Proxy") | Some("proxy") => Ok(Some(IpMode::Proxy)),
        Some("VIP") | Some("vip") => Ok(Some(IpMode::Vip)),
        Some(other) => Err(ProviderError::invalid(
            "InvalidAnnotation",
            format!("annotation {IP_MODE_ANNOTATION}: {other:?} is neither \"Proxy\" nor \"VIP\""),
        )),
    }
}

/// The allocator's view of a desired balancer.
pub fn allocation_request(
    desired: &DesiredLoadBalancer,
    namespace_labels: BTreeMap<String, String>,
) -> AllocationRequest {
    AllocationRequest {
        id: desired.id.clone(),
        service_labels: desired.service_labels.clone(),
        namespace_labels,
        families: desired.ip_families.clone(),
        policy: desired.ip_family_policy,
        requested: desired.requested_ips.clone(),
        pool: desired.requested_pool.clone(),
        sharing_key: desired.sharing_key.clone(),
        ports: desired.ports.iter().map(|p| (p.protocol, p.port)).collect(),
        local_traffic: matches!(desired.traffic_policy, TrafficPolicy::Local { .. }),
    }
}

fn status_ips(svc: &Service) -> Vec<IpAddr> {
    status_ingress(svc).into_iter().map(|(ip, _)| ip).collect()
}

impl LocalProvider {
    /// The provider for an instance serving `ctx.class`: it holds the addresses of the
    /// Services it serves, and of those it provisioned and has not cleaned up yet (held
    /// exclusively until then, so nobody else gets them meanwhile).
    pub fn from_args(args: &LocalArgs, ctx: crate::registry::ProviderContext) -> Self {
        let class = ctx.class;
        let lens_class = class.clone();
        let lens: ServiceLens = Arc::new(move |svc: &Service| {
            if !lens_class.may_hold(svc) {
                return None;
            }
            if !lens_class.owns(svc) {
                return Some(Err(crate::desired::id_of(svc)));
            }
            Some(crate::desired::desired(svc, &[]).map_err(|_| crate::desired::id_of(svc)))
        });
        Self::new(LocalConfig {
            client: ctx.client,
            class: class.class,
            lens,
            repair_interval: args.repair_interval,
        })
    }

    /// A provider that does nothing until `start` (through the trait).
    pub fn new(config: LocalConfig) -> Self {
        let (pool_reader, pool_writer) = reflector::store();
        let (ns_reader, ns_writer) = reflector::store();
        let (signal_tx, signal_rx) = mpsc::channel(64);
        let inner = Arc::new(Inner {
            client: config.client.clone(),
            class: config.class,
            lens: config.lens,
            repair_interval: config.repair_interval,
            state: Mutex::new(State {
                allocator: PoolAllocator::new(),
                verdicts: BTreeMap::new(),
                applied_specs: None,
                started: false,
            }),
            pools: pool_reader,
            namespaces: ns_reader,
            signal_tx,
            signal_rx: Mutex::new(Some(signal_rx)),
            status_dirty: Notify::new(),
            pool_addresses: Family::default(),
        });
        Self {
            inner,
            writers: Mutex::new(Some(Writers {
                pools: pool_writer,
                namespaces: ns_writer,
            })),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Starts the watches and background passes, once.
    fn spawn_tasks(&self) {
        let Some(writers) = self.writers.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        let client = self.inner.client.clone();
        let mut tasks = Vec::new();
        let pools_api: Api<LoadBalancerPool> = Api::all(client.clone());
        let pool_inner = self.inner.clone();
        tasks.push(tokio::spawn(async move {
            let events = reflector::reflector(
                writers.pools,
                watcher(pools_api, watcher::Config::default()),
            )
            .default_backoff();
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(
                        watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitDone,
                    ) => {
                        pool_inner.refresh_pools().await;
                    }
                    Ok(_) => {}
                    Err(err) => warn!(error = %err, "watching LoadBalancerPools"),
                }
            }
        }));
        let ns_api: Api<Namespace> = Api::all(client);
        tasks.push(tokio::spawn(async move {
            let events = reflector::reflector(
                writers.namespaces,
                watcher(ns_api, watcher::Config::default()).default_backoff(),
            );
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                if let Err(err) = event {
                    warn!(error = %err, "watching Namespaces");
                }
            }
        }));
        let status_inner = self.inner.clone();
        tasks.push(tokio::spawn(async move {
            status_inner.write_pool_status_forever().await;
        }));
        let repair_inner = self.inner.clone();
        tasks.push(tokio::spawn(async move {
            repair_inner.repair_forever().await;
        }));
        if let Ok(mut held) = self.tasks.lock() {
            held.extend(tasks);
        }
    }

    fn stop_tasks(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }

    /// Whether the background work runs (a standby's does not).
    pub fn is_running(&self) -> bool {
        self.tasks.lock().map(|t| !t.is_empty()).unwrap_or(false)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the allocator half-updated (every
        // mutation is a single commit), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn signal(&self, signal: ProviderSignal) {
        // Full channel: the operator is behind, and it re-reads everything it is sent anyway.
        let _ = self.signal_tx.try_send(signal);
    }

    async fn refresh_pools(&self) {
        let objects: Vec<LoadBalancerPool> =
            self.pools.state().iter().map(|p| (**p).clone()).collect();
        let mut specs: Vec<(String, Option<String>, String)> = objects
            .iter()
            .map(|p| {
                (
                    p.name_any(),
                    p.creation_timestamp().map(|t| t.0.to_string()),
                    serde_json::to_string(&p.spec).unwrap_or_default(),
                )
            })
            .collect();
        specs.sort();
        if self.lock().applied_specs.as_ref() == Some(&specs) {
            return;
        }
        let set = pools::validate_for(&objects, &self.class);
        for (name, verdict) in &set.verdicts {
            if !verdict.ready {
                warn!(pool = %name, reason = verdict.reason, message = %verdict.message, "address pool not ready");
            }
        }
        {
            let mut state = self.lock();
            state.allocator.set_pools(set.valid, set.unready);
            state.allocator.set_foreign(set.foreign);
            state.verdicts = set.verdicts;
            state.applied_specs = Some(specs);
        }
        self.signal(ProviderSignal::ConfigurationChanged).await;
        self.status_dirty.notify_one();
    }

    /// What the allocator would be asked for `svc`, if it is ours. A Service whose spec is
    /// invalid still holds its addresses, exclusively (no sharing key), so nobody else gets them.
    fn request_of(&self, svc: &Service) -> Option<AllocationRequest> {
        Some(self.request_from((self.lens)(svc)?))
    }

    fn request_from(&self, seen: Result<DesiredLoadBalancer, LoadBalancerId>) -> AllocationRequest {
        match seen {
            Ok(desired) => {
                allocation_request(&desired, self.namespace_labels(&desired.id.namespace))
            }
            Err(id) => AllocationRequest {
                id,
                ..AllocationRequest::default()
            },
        }
    }

    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.labels().clone())
            .unwrap_or_default()
    }

    fn ip_mode_for(&self, assigned: &[Assigned], requested: Option<IpMode>) -> IpMode {
        requested.unwrap_or_else(|| {
            let state = self.lock();
            assigned
                .iter()
                .find_map(|a| {
                    let name = a.pool.as_ref()?;
                    state.allocator.pools().iter().find(|p| &p.name == name)
                })
                .map(|p| p.ip_mode)
                .unwrap_or(IpMode::Proxy)
        })
    }

    fn observed(&self, assigned: &[Assigned], ip_mode: IpMode) -> ObservedLoadBalancer {
        ObservedLoadBalancer {
            ingress: assigned
                .iter()
                .map(|a| Ingress::ip(a.ip, ip_mode))
                .collect(),
            port_errors: Vec::new(),
            notices: Vec::new(),
        }
    }

    /// Rebuilds allocations from every Service's status, oldest Service first, so that if two
    /// Services claim one address the older keeps it and the younger is re-ensured.
    async fn rebuild(&self) -> Result<(), ProviderError> {
        let wait = async {
            self.pools.wait_until_ready().await.ok();
            self.namespaces.wait_until_ready().await.ok();
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .map_err(|_| {
                ProviderError::transient("timed out waiting for LoadBalancerPools to sync")
            })?;
        self.refresh_pools().await;
        let services = Api::<Service>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| ProviderError::transient(format!("listing Services: {e}")))?;
        let mut items = services.items;
        items.sort_by(|a, b| {
            a.creation_timestamp()
                .map(|t| t.0)
                .cmp(&b.creation_timestamp().map(|t| t.0))
                .then_with(|| a.namespace().cmp(&b.namespace()))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let mut losers = Vec::new();
        let mut restored = 0usize;
        {
            let mut state = self.lock();
            state.allocator.clear();
            for svc in &items {
                let ips = status_ips(svc);
                if ips.is_empty() {
                    continue;
                }
                let Some(seen) = (self.lens)(svc) else {
                    continue;
                };
                // A Service this instance no longer serves holds only addresses of its own
                // pools: that is what proves an unrecorded one was provisioned here.
                if seen.is_err() && !ips.iter().all(|ip| state.allocator.is_ours(ip)) {
                    continue;
                }
                let req = self.request_from(seen);
                match state.allocator.restore(&req, &ips) {
                    Ok(()) => restored += 1,
                    Err(err) => {
                        warn!(service = %req.id, error = %err, "duplicate address found while rebuilding allocations; the younger Service gets a new one");
                        losers.push(req.id);
                    }
                }
            }
            state.started = true;
        }
        info!(
            restored,
            duplicates = losers.len(),
            "rebuilt address allocations from Service status"
        );
        if !losers.is_empty() {
            self.signal(ProviderSignal::Resync(losers)).await;
        }
        self.status_dirty.notify_one();
        Ok(())
    }

    /// The repair pass: allocations whose Service is gone are released (leaks), and Services
    /// whose status shows addresses other than what they hold are re-ensured (duplicates,
    /// stale status), as the upstream ClusterIP repair loop does.
    async fn repair(&self) -> Result<(), kube::Error> {
        // Only what was allocated before the list began can be missing from it for good: a
        // Service allocated while the list is under way is live even though it is not in it.
        let listed_after = self.lock().allocator.epoch();
        let services = Api::<Service>::all(self.client.clone())
            .list(&ListParams::default())
            .await?;
        let mut live = BTreeMap::new();
        let mut resync = Vec::new();
        for svc in &services.items {
            let Some(req) = self.request_of(svc) else {
                continue;
            };
            let shown = status_ips(svc);
            live.insert(req.id.uid.clone(), (req.id, shown));
        }
        let mut leaked = Vec::new();
        {
            let mut state = self.lock();
            if !state.started {
                return Ok(());
            }
            for holder in state.allocator.holders() {
                let seen_by_list = state
                    .allocator
                    .committed_at(&holder.uid)
                    .is_some_and(|at| at <= listed_after);
                if seen_by_list && !live.contains_key(&holder.uid) {
                    leaked.push(holder);
                }
            }
            for id in &leaked {
                state.allocator.release(&id.uid);
            }
            for (id, shown) in live.values() {
                let mut held: Vec<IpAddr> = state
                    .allocator
                    .assigned(&id.uid)
                    .map(|a| a.iter().map(|a| a.ip).collect())
                    .unwrap_or_default();
                let mut shown = shown.clone();
                held.sort();
                shown.sort();
                if held != shown && !shown.is_empty() {
                    resync.push(id.clone());
                }
            }
        }
        if !leaked.is_empty() {
            warn!(
                count = leaked.len(),
                "repair released addresses of Services that no longer exist"
            );
            self.signal(ProviderSignal::CapacityFreed).await;
            self.status_dirty.notify_one();
        }
        if !resync.is_empty() {
            info!(
                count = resync.len(),
                "repair found Services whose status disagrees with their allocation"
            );
            self.signal(ProviderSignal::Resync(resync)).await;
        }
        Ok(())
    }

    async fn repair_forever(&self) {
        let mut tick = tokio::time::interval(self.repair_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(err) = self.repair().await {
                warn!(error = %err, "address repair pass failed; will retry");
            }
        }
    }

    /// Writes each pool's status when it differs from what is there, at most every 500 ms.
    async fn write_pool_status_forever(&self) {
        loop {
            self.status_dirty.notified().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Err(err) = self.write_pool_status().await {
                warn!(error = %err, "writing LoadBalancerPool status; will retry");
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.status_dirty.notify_one();
            }
        }
    }

    async fn write_pool_status(&self) -> Result<(), kube::Error> {
        let api: Api<LoadBalancerPool> = Api::all(self.client.clone());
        let mut patches = Vec::new();
        {
            let state = self.lock();
            if !state.started {
                return Ok(());
            }
            for obj in self.pools.state() {
                let name = obj.name_any();
                let Some(verdict) = state.verdicts.get(&name) else {
                    continue;
                };
                let (total, allocated) = state
                    .allocator
                    .pools()
                    .iter()
                    .find(|p| p.name == name)
                    .map(|p| (p.total(), state.allocator.allocated_in(p)))
                    .unwrap_or((0, 0));
                let clamp = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
                // allocated + available = the pool's size, so sum() over states means something.
                self.pool_addresses
                    .get_or_create(&vec![
                        ("pool".into(), name.clone()),
                        ("state".into(), "available".into()),
                    ])
                    .set(clamp(total.saturating_sub(allocated)));
                self.pool_addresses
                    .get_or_create(&vec![
                        ("pool".into(), name.clone()),
                        ("state".into(), "allocated".into()),
                    ])
                    .set(clamp(allocated));
                let old = obj.status.clone().unwrap_or_default();
                let status_word = if verdict.ready { "True" } else { "False" };
                let old_cond = old
                    .conditions
                    .iter()
                    .find(|c| c.type_ == POOL_READY_CONDITION);
                let transition = match old_cond {
                    Some(c) if c.status == status_word => c.last_transition_time.clone(),
                    _ => Time(jiff::Timestamp::now()),
                };
                let new = LoadBalancerPoolStatus {
                    total: clamp(total),
                    allocated: clamp(allocated),
                    available: clamp(total.saturating_sub(allocated)),
                    observed_generation: obj.metadata.generation,
                    conditions: vec![Condition {
                        type_: POOL_READY_CONDITION.to_string(),
                        status: status_word.to_string(),
                        reason: verdict.reason.to_string(),
                        message: verdict.message.clone(),
                        observed_generation: obj.metadata.generation,
                        last_transition_time: transition,
                    }],
                };
                if old != new {
                    patches.push((name, new));
                }
            }
        }
        for (name, status) in patches {
            debug!(pool = %name, allocated = status.allocated, "updating pool status");
            let patch = serde_json::json!({ "status": status });
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl LoadBalancerProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn start(&self) -> Result<(), ProviderError> {
        self.spawn_tasks();
        self.inner.rebuild().await
    }

    async fn stop(&self) {
        self.stop_tasks();
        self.inner.lock().started = false;
    }

    async fn ensure(
        &self,
        desired: &DesiredLoadBalancer,
    ) -> Result<ObservedLoadBalancer, ProviderError> {
        for port in &desired.ports {
            if port.protocol == Protocol::Sctp {
                return Err(ProviderError::invalid(
                    "UnsupportedProtocol",
                    format!(
                        "port {} uses SCTP; the local provider serves TCP and UDP",
                        port.port
                    ),
                ));
            }
        }
        let ip_mode = ip_mode_of(desired)?;
        proxy_protocol_of(&desired.annotations)?;
        let req = allocation_request(desired, self.inner.namespace_labels(&desired.id.namespace));
        let (assigned, changed) = {
            let mut state = self.inner.lock();
            if !state.started {
                return Err(ProviderError::transient(
                    "local provider has not rebuilt its allocations yet",
                ));
            }
            let before = state.allocator.assigned(&desired.id.uid).map(<[_]>::to_vec);
            let assigned = state
                .allocator
                .allocate(&req)
                .map_err(|e| ProviderError::allocation(e.reason(), e.to_string()))?;
            let changed = before.as_deref() != Some(assigned.as_slice());
            (assigned, changed)
        };
        if changed {
            info!(service = %desired.id, ips = ?assigned.iter().map(|a| a.ip).collect::<Vec<_>>(), "allocated addresses");
            self.inner.status_dirty.notify_one();
        }
        let mode = self.inner.ip_mode_for(&assigned, ip_mode);
        Ok(self.inner.observed(&assigned, mode))
    }

    async fn delete(&self, id: &LoadBalancerId) -> Result<(), ProviderError> {
        let released = self.inner.lock().allocator.release(&id.uid);
        if released {
            info!(service = %id, "released addresses");
            self.inner.signal(ProviderSignal::CapacityFreed).await;
            self.inner.status_dirty.notify_one();
        }
        Ok(())
    }

    async fn get(
        &self,
        id: &LoadBalancerId,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        let assigned = self
            .inner
            .lock()
            .allocator
            .assigned(&id.uid)
            .map(<[_]>::to_vec);
        Ok(assigned.map(|a| {
            let mode = self.inner.ip_mode_for(&a, None);
            self.inner.observed(&a, mode)
        }))
    }

    async fn list_owned(&self) -> Result<Owned, ProviderError> {
        Ok(Owned {
            ours: self.inner.lock().allocator.holders(),
            foreign: Vec::new(),
        })
    }

    fn take_signals(&self) -> Option<mpsc::Receiver<ProviderSignal>> {
        self.inner
            .signal_rx
            .lock()
            .ok()
            .and_then(|mut rx| rx.take())
    }

    fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "ferry_pool_addresses",
            "Addresses of each LoadBalancerPool, by state (allocated, available; their sum is the pool's size)",
            self.inner.pool_addresses.clone(),
        );
    }
}

#[cfg(test)]
mod tests;
