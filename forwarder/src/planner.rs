//! The planner loop: whenever something it reads changes (an object, a health verdict, who
//! is alive) or a deadline of its own comes (a heartbeat that may have expired, a retry, the
//! resync), it decides who is alive (`liveness`), computes this node's `plan`, and applies it:
//! VIPs through the announcer, frontends through the data plane. Whether a timer wake-up has
//! anything to do, and when to wake next, are pure functions (`due`, `next_wake`).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_crds::LoadBalancerPool;
use ferry_model::class::ClassFilter;
use ferry_model::eligibility::target_of;
use ferry_model::pools;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::announce::Announcer;
use crate::dataplane::{Dataplane, Failure};
use crate::health::{self, HealthChecker};
use crate::heartbeat;
use crate::kernel::Forwarding;
use crate::liveness::{self, Verdict};
use crate::membership::{Membership, Peer};
use crate::metrics::Metrics;
use crate::plan::{self, ClusterView, Frontend, NodePlan, Notice};
use crate::refusals::Refusals;
use crate::report::{self, Mode, Reporter};

/// How often the node's state is re-checked even when nothing was reported (an address
/// removed by hand comes back within this).
pub const RESYNC: Duration = Duration::from_secs(10);
/// Changes arriving within this window are applied together.
const SETTLE: Duration = Duration::from_millis(20);
/// How often the kernel's connection counters are read (besides before each table change).
const COUNT_EVERY: Duration = Duration::from_secs(5);
/// How long the withdrawal at shutdown may take.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the planner woke up.
enum Wake {
    /// A reported change or health verdict.
    Reported,
    /// Its own deadline (a heartbeat expiry, a retry or the resync).
    Timer,
    Stop,
}

/// Whether a pass is needed. A timer wake-up is for a heartbeat that may have expired, a
/// retry or the resync; when none of them is due and who is alive did not change, there is
/// nothing to plan. Anything reported is always planned.
pub fn due(
    woken_by_timer: bool,
    live_changed: bool,
    now: Instant,
    last_pass: Instant,
    retry_at: Option<Instant>,
) -> bool {
    !woken_by_timer
        || live_changed
        || now.saturating_duration_since(last_pass) >= RESYNC
        || retry_at.is_some_and(|at| now >= at)
}

/// When to look again with nothing reported: the next heartbeat expiry (of a Lease or of a
/// peer's direct heartbeats), the retry of a failed apply, or the resync.
pub fn next_wake(
    expiries: impl IntoIterator<Item = Instant>,
    retry_at: Option<Instant>,
    last_pass: Instant,
) -> Instant {
    let resync = last_pass + RESYNC;
    expiries
        .into_iter()
        .map(|at| at + Duration::from_millis(5))
        .chain(retry_at)
        .fold(resync, Instant::min)
}

/// How long to wait before the `attempts`+1-th try to program the data plane.
pub fn apply_retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// The last attempt to program the data plane, when it failed.
struct FailedApply {
    frontends: Vec<Frontend>,
    message: String,
    attempts: u32,
    retry_at: Instant,
}

/// What the planner reads.
pub struct Inputs {
    pub node_name: String,
    pub class: ClassFilter,
    pub services: Store<Service>,
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub pools: Store<LoadBalancerPool>,
    /// Heartbeat Leases as the API shows them.
    pub leases: Arc<Mutex<heartbeat::Liveness>>,
    /// Direct heartbeats, when enabled.
    pub membership: Option<Membership>,
    pub peer_timeout: Duration,
    /// How long a silent peer's last Lease renewal speaks for it (`liveness::renewal_window`).
    pub renewal_window: Duration,
    pub changed: Arc<Notify>,
    /// Events about Services this node cannot serve.
    pub recorder: Option<kube::runtime::events::Recorder>,
    /// Writes the data-plane state onto Services (none in tests without an API).
    pub reporter: Option<Reporter>,
    /// How this node carries VIPs, for what the reporter writes.
    pub mode: Mode,
}

/// What the planner acts on.
pub struct Outputs {
    pub announcer: Option<Announcer>,
    pub dataplane: Dataplane,
    pub checker: HealthChecker,
    pub metrics: Arc<Metrics>,
}

pub struct Planner {
    inputs: Inputs,
    outputs: Outputs,
    last_plan: Option<NodePlan>,
    /// What was last applied, and with which node facts.
    last_effective: Option<(Vec<Frontend>, Forwarding)>,
    /// The node facts read for the current pass.
    node: Forwarding,
    failed_apply: Option<FailedApply>,
    logged: BTreeSet<Notice>,
    last_sync: Instant,
    last_pass: Instant,
    last_live: Option<BTreeSet<String>>,
    /// The live set of the last verdict that was not frozen.
    trusted: BTreeSet<String>,
    last_verdict: Option<(bool, bool)>,
    refusals: Refusals,
    last_counts: Instant,
}

/// The pools the operator of this class allocates from (the same validation, so both agree
/// on them).
fn valid_pools(store: &Store<LoadBalancerPool>, class: &str) -> Vec<ferry_model::pools::Pool> {
    let all: Vec<LoadBalancerPool> = store.state().iter().map(|p| (**p).clone()).collect();
    pools::validate_for(&all, class).valid
}

impl Planner {
    pub fn new(inputs: Inputs, outputs: Outputs, refusals: Refusals) -> Self {
        let now = Instant::now();
        Self {
            refusals,
            inputs,
            outputs,
            last_plan: None,
            last_effective: None,
            node: Forwarding::read(),
            failed_apply: None,
            logged: BTreeSet::new(),
            last_sync: now - RESYNC,
            last_pass: now,
            last_live: None,
            trusted: BTreeSet::new(),
            last_verdict: None,
            last_counts: now,
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, heartbeat::Liveness> {
        self.inputs.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn heard(&self) -> std::collections::HashMap<String, Instant> {
        self.inputs
            .membership
            .as_ref()
            .map(Membership::heard)
            .unwrap_or_default()
    }

    /// Who is alive now.
    fn verdict(&mut self, now: Instant) -> Verdict {
        let me = self.inputs.node_name.clone();
        let peers = liveness::Peers::at(&me, &self.heard(), self.inputs.peer_timeout, now);
        let (verdict, unheard) = {
            let leases = self.leases();
            let window = self.inputs.renewal_window;
            // Forwarders with a live Lease this node has never heard: their failover waits
            // for the Lease (peer traffic blocked, or this process has only just started).
            let unheard = leases
                .live(now)
                .iter()
                .filter(|n| **n != me && !peers.heard.contains(*n) && !peers.silent.contains(*n))
                .count();
            let verdict = liveness::decide(&me, now, &leases, &peers, window, &self.trusted);
            (verdict, unheard)
        };
        self.outputs.metrics.set_peers(
            peers.heard.len().saturating_sub(1),
            peers.silent.len(),
            unheard,
        );
        if !verdict.frozen {
            self.trusted = verdict.live.clone();
        }
        let summary = (verdict.api_fresh, verdict.frozen);
        if self.last_verdict != Some(summary) {
            match summary {
                (true, _) if self.last_verdict.is_some() => {
                    info!("the API's view is fresh again: heartbeat Leases count again")
                }
                (true, _) => {}
                (false, false) => warn!(
                    live = ?verdict.live,
                    "the API's view is stale (own heartbeat not seen back): liveness from peers' direct heartbeats only; VIPs stay where they are unless a majority agrees a node is gone"
                ),
                (false, true) => warn!(
                    live = ?verdict.live,
                    "the API's view is stale and too few peers are heard to tell who is gone: nothing moves"
                ),
            }
            self.last_verdict = Some(summary);
        }
        verdict
    }

    /// The peers to heartbeat to: every other node with a heartbeat Lease and an address.
    fn refresh_peers(&self, nodes: &[Arc<Node>]) {
        let Some(membership) = &self.inputs.membership else {
            return;
        };
        let known = self.leases().known();
        let peers = nodes
            .iter()
            .filter_map(|n| target_of(n))
            .filter(|t| t.name != self.inputs.node_name && known.contains(&t.name))
            .map(|t| Peer {
                node: t.name,
                ips: t.internal_ips,
            })
            .collect();
        membership.set_peers(peers);
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut expiries: Vec<Instant> = self.leases().next_expiry(now).into_iter().collect();
        let heard = self.heard();
        expiries.extend(
            heard
                .values()
                .map(|at| *at + self.inputs.peer_timeout)
                .filter(|at| *at > now),
        );
        // A silent peer is dead once its renewals are overdue too: wake then (only for silent
        // peers, so renewals of peers that are heard wake nothing).
        let timeout = self.inputs.peer_timeout;
        let leases = self.leases();
        expiries.extend(
            heard
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(**at) >= timeout)
                .filter_map(|(node, _)| leases.renewed_at(node))
                .map(|at| at + self.inputs.renewal_window)
                .filter(|at| *at > now),
        );
        drop(leases);
        expiries.extend(self.refusals.next_retry());
        next_wake(
            expiries,
            self.failed_apply.as_ref().map(|f| f.retry_at),
            self.last_pass,
        )
    }

    async fn wait(&self, health_changed: &Notify, stop: &mut watch::Receiver<bool>) -> Wake {
        let deadline = self.next_wake();
        tokio::select! {
            _ = self.inputs.changed.notified() => {
                tokio::time::sleep(SETTLE).await;
                Wake::Reported
            }
            _ = health_changed.notified() => Wake::Reported,
            _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
            _ = crate::stopped(stop) => Wake::Stop,
        }
    }

    /// Plans and applies until `stop`, then withdraws.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let health_changed = self.outputs.checker.changed();
        let mut woken_by_timer = false;
        loop {
            let now = Instant::now();
            let verdict = self.verdict(now);
            let live_changed = self.last_live.as_ref() != Some(&verdict.live);
            let retry_at = [
                self.failed_apply.as_ref().map(|f| f.retry_at),
                self.refusals.next_retry(),
            ]
            .into_iter()
            .flatten()
            .min();
            if due(woken_by_timer, live_changed, now, self.last_pass, retry_at) {
                self.pass(verdict.live, verdict.api_fresh).await;
            }
            match self.wait(&health_changed, &mut stop).await {
                Wake::Stop => break,
                wake => woken_by_timer = matches!(wake, Wake::Timer),
            }
        }
        self.shutdown().await;
    }

    /// Which VIPs each node cannot serve: this node's own refusals, each peer's as its last
    /// heartbeat said, or as its Lease says for a peer not heard.
    fn refused_view(
        &self,
        nodes: &[Arc<Node>],
    ) -> std::collections::BTreeMap<String, BTreeSet<IpAddr>> {
        let mut view = std::collections::BTreeMap::new();
        view.insert(self.inputs.node_name.clone(), self.refusals.vips());
        let heard = self
            .inputs
            .membership
            .as_ref()
            .map(Membership::refusals)
            .unwrap_or_default();
        let leases = self.leases();
        for n in nodes.iter().filter_map(|n| n.metadata.name.clone()) {
            if n == self.inputs.node_name {
                continue;
            }
            let refused = heard.get(&n).cloned().unwrap_or_else(|| leases.refused(&n));
            if !refused.is_empty() {
                view.insert(n, refused);
            }
        }
        view
    }

    /// Probes the refusals that are due; returns whether one was lifted.
    fn check_refusals(&mut self) -> bool {
        let now = Instant::now();
        let mut lifted = false;
        for (vip, refusal) in self.refusals.due(now) {
            let clear = match refusal.kind {
                crate::dataplane::FailureKind::Bind => {
                    self.outputs.dataplane.probe(&refusal.frontends).is_ok()
                }
                crate::dataplane::FailureKind::Kernel => true,
            };
            if clear {
                info!(%vip, "this node can try to serve the VIP again");
                self.refusals.lift(&vip);
                lifted = true;
            } else {
                self.refusals.defer(&vip, now);
            }
        }
        lifted
    }

    async fn pass(&mut self, live: BTreeSet<String>, api_fresh: bool) {
        self.last_pass = Instant::now();
        // Node facts are read where the plan is made: a change of them alone is applied too.
        self.node = Forwarding::read();
        self.check_refusals();
        let class = self.inputs.class.clone();
        let valid_pools = valid_pools(&self.inputs.pools, &class.class);
        let (services, nodes, slices) = (
            self.inputs.services.state(),
            self.inputs.nodes.state(),
            self.inputs.slices.state(),
        );
        self.refresh_peers(&nodes);
        // Planned, then applied; what could not be set up is refused and planned once more
        // without it, so this node never announces a VIP it would black-hole.
        let mut plan = NodePlan::default();
        let mut notices = Vec::new();
        for _ in 0..3 {
            let refused = self.refused_view(&nodes);
            (plan, notices) = plan::plan(&ClusterView {
                node_name: &self.inputs.node_name,
                class: &class,
                services: &services,
                nodes: &nodes,
                slices: &slices,
                pools: &valid_pools,
                live: &live,
                refused: &refused,
            });
            self.outputs
                .checker
                .set_probes(&health::probes(&plan.frontends));
            let effective = health::effective(&plan.frontends, |p| self.outputs.checker.healthy(p));
            let failures = self.apply(effective).await;
            if failures.is_empty() {
                break;
            }
            let news = self.refusals.record(&failures, Instant::now());
            self.report(&news, &services).await;
        }
        self.refusals
            .succeeded(plan.announce.iter().copied().collect::<Vec<_>>());
        if self.last_counts.elapsed() >= COUNT_EVERY {
            self.last_counts = Instant::now();
            let metrics = self.outputs.metrics.clone();
            self.outputs.dataplane.collect_counts(&metrics).await;
        }
        let metrics = self.outputs.metrics.clone();
        metrics.live_forwarders.set(live.len() as i64);
        let notices: BTreeSet<Notice> = notices.into_iter().collect();
        for n in notices.difference(&self.logged) {
            info!(service = %n.service, "{}", n.message);
        }
        self.logged = notices;

        let announce_changed = self.last_plan.as_ref().map(|p| &p.announce) != Some(&plan.announce);
        // A VIP is guarded before it appears and until it is gone: the guard covers the VIPs
        // held before and after while the interface changes, then the new ones alone.
        let mut guarded = plan.announce.clone();
        let mut exposed = plan.exposed.clone();
        if let Some(last) = &self.last_plan {
            guarded.extend(last.announce.iter().copied());
            exposed.extend(last.exposed.iter().copied());
        }
        self.guard(&guarded, &exposed, &plan.frontends).await;
        if let Some(a) = &self.outputs.announcer
            && (announce_changed || self.last_sync.elapsed() >= RESYNC)
        {
            self.last_sync = Instant::now();
            match a.sync(&plan.announce).await {
                Ok(added) => {
                    let counter = metrics.announcements.clone();
                    a.announce(added, move |n| {
                        counter.inc_by(n as u64);
                    });
                }
                Err(err) => error!(error = %err, "cannot hold or withdraw VIPs"),
            }
        }
        self.guard(&plan.announce, &plan.exposed, &plan.frontends)
            .await;
        if announce_changed {
            for (vip, owner) in &plan.owners {
                if self.last_plan.as_ref().and_then(|p| p.owners.get(vip)) != Some(owner) {
                    info!(%vip, %owner, held_here = (*owner == self.inputs.node_name), "VIP owner");
                }
            }
        }
        metrics.vips_held.set(plan.announce.len() as i64);
        metrics.refused_vips.set(self.refusals.vips().len() as i64);
        self.record_vips(&plan);
        // Fail static: with the API's view stale, nothing is reported either.
        if let Some(reporter) = self.inputs.reporter.as_ref().filter(|_| api_fresh) {
            let reports = report::reports(&plan, &live, &self.inputs.node_name, &self.inputs.mode);
            reporter.publish(&reports, &services, &live);
        }
        self.last_plan = Some(plan);
        self.last_live = Some(live);
    }

    /// The per-VIP metrics: what this node announces and took over, what nobody can
    /// announce, and the health of the backends it forwards to.
    fn record_vips(&self, plan: &NodePlan) {
        let metrics = &self.outputs.metrics;
        let per_service = |vip: &IpAddr| {
            plan.claimants
                .get(vip)
                .into_iter()
                .flatten()
                .map(|c| c.service.as_str())
                .collect::<Vec<_>>()
        };
        let with_vip = |vip: &IpAddr, service: &str| {
            let mut labels = vec![("vip", vip.to_string())];
            labels.extend(crate::metrics::service_labels(service));
            labels
        };
        metrics.vip_owner.set(plan.announce.iter().flat_map(|vip| {
            per_service(vip).into_iter().map(move |service| {
                let mut labels = with_vip(vip, service);
                labels.push(("node", self.inputs.node_name.clone()));
                (labels, 1)
            })
        }));
        if let Some(last) = &self.last_plan {
            for vip in plan.announce.difference(&last.announce) {
                for service in per_service(vip) {
                    metrics.took_over(service);
                }
            }
        }
        metrics
            .vip_unannounced
            .set(plan.unowned.keys().flat_map(|vip| {
                per_service(vip)
                    .into_iter()
                    .map(move |service| (with_vip(vip, service), 1))
            }));
        let mut backends: std::collections::BTreeMap<(&str, std::net::SocketAddr), bool> =
            Default::default();
        for f in &plan.frontends {
            for b in &f.backends {
                let up = health::probe_for(f, *b).is_none_or(|p| self.outputs.checker.healthy(&p));
                let entry = backends.entry((f.service.as_str(), *b)).or_insert(true);
                *entry &= up;
            }
        }
        let mut counts: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
        for ((service, _), up) in backends {
            *counts
                .entry((service, if up { "healthy" } else { "unhealthy" }))
                .or_default() += 1;
        }
        metrics
            .backends
            .set(counts.into_iter().map(|((service, state), n)| {
                let mut labels = crate::metrics::service_labels(service);
                labels.push(("state", state.to_string()));
                (labels, n)
            }));
    }

    async fn guard(
        &mut self,
        held: &BTreeSet<IpAddr>,
        exposed: &BTreeSet<(IpAddr, ferry_model::Protocol, u16)>,
        frontends: &[Frontend],
    ) {
        let node = self.node;
        if let Err(err) = self
            .outputs
            .dataplane
            .guard(held, exposed, frontends, node)
            .await
        {
            error!(error = %format!("{err:#}"), "VIPs may expose host ports");
        }
    }

    /// Tells the Services whose forwarding could not be set up here, with an Event each.
    async fn report(&self, news: &[Failure], services: &[Arc<Service>]) {
        for f in news {
            let metrics = &self.outputs.metrics;
            metrics.forwarding_failed(&f.frontend.service);
            warn!(service = %f.frontend.service, vip = %f.frontend.vip, error = %f.error,
                  "cannot forward here; the VIP goes to another node");
            let Some(recorder) = &self.inputs.recorder else {
                continue;
            };
            let Some(svc) = services.iter().find(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default()
                ) == f.frontend.service
            }) else {
                continue;
            };
            use kube::Resource as _;
            let event = kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Warning,
                reason: "ForwardingFailed".into(),
                note: Some(format!(
                    "node {} cannot forward {}:{}/{}: {}; another node announces the VIP",
                    self.inputs.node_name,
                    f.frontend.vip,
                    f.frontend.port,
                    f.frontend.protocol,
                    f.error
                )),
                action: "Forward".into(),
                secondary: None,
            };
            let reference = svc.object_ref(&());
            let recorder = recorder.clone();
            // Off the planner's path, bounded: a slow API server must not hold up the data plane.
            tokio::spawn(async move {
                let publish = recorder.publish(&event, &reference);
                match tokio::time::timeout(Duration::from_secs(5), publish).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => warn!(error = %err, "cannot publish an Event"),
                    Err(_) => warn!("publishing an Event timed out"),
                }
            });
        }
    }

    /// Programs the data plane; returns what could not be set up. An apply that failed
    /// altogether is retried with backoff (1 s doubling to 1 min), sooner only when the
    /// frontends change; it is logged as an error when its message changes.
    async fn apply(&mut self, effective: Vec<Frontend>) -> Vec<Failure> {
        let retry_due = self
            .failed_apply
            .as_ref()
            .is_none_or(|f| f.frontends != effective || Instant::now() >= f.retry_at);
        let node = self.node;
        if self.last_effective.as_ref() == Some(&(effective.clone(), node)) || !retry_due {
            return Vec::new();
        }
        let metrics = self.outputs.metrics.clone();
        match self.outputs.dataplane.apply(&effective, node).await {
            Ok(failures) => {
                metrics.applied(if failures.is_empty() { "ok" } else { "partial" });
                metrics
                    .frontends
                    .set((effective.len() - failures.len().min(effective.len())) as i64);
                self.failed_apply = None;
                // A partial apply is done again, without what failed, once it is refused.
                self.last_effective = failures.is_empty().then_some((effective, node));
                failures
            }
            Err(err) => {
                metrics.applied("error");
                let message = format!("{err:#}");
                let attempts = self.failed_apply.as_ref().map_or(0, |f| f.attempts) + 1;
                let delay = apply_retry_delay(attempts);
                if self.failed_apply.as_ref().map(|f| &f.message) != Some(&message) {
                    error!(error = %message, retry_in = ?delay, "cannot program the data plane");
                } else {
                    debug!(error = %message, attempts, "still cannot program the data plane");
                }
                self.last_effective = None;
                self.failed_apply = Some(FailedApply {
                    frontends: effective,
                    message,
                    attempts,
                    retry_at: Instant::now() + delay,
                });
                Vec::new()
            }
        }
    }

    /// Withdraws every VIP (bounded: an interface that does not answer must not keep the
    /// process from exiting), then tears the data plane down.
    async fn shutdown(mut self) {
        info!("shutting down: withdrawing VIPs first");
        if let Some(a) = &self.outputs.announcer {
            match tokio::time::timeout(WITHDRAW_TIMEOUT, a.sync(&BTreeSet::<IpAddr>::new())).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => error!(error = %err, "cannot withdraw VIPs"),
                Err(_) => {
                    error!(timeout = ?WITHDRAW_TIMEOUT, "withdrawing VIPs timed out; their lifetimes will end them")
                }
            }
        }
        self.outputs.dataplane.clear().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_data_plane_is_retried_with_backoff_up_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| apply_retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn a_timer_wake_up_plans_only_when_something_is_due() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(100);
        assert!(
            due(false, false, soon, t0, None),
            "a report is always planned"
        );
        assert!(!due(true, false, soon, t0, None), "nothing due");
        assert!(due(true, true, soon, t0, None), "who is alive changed");
        assert!(due(true, false, t0 + RESYNC, t0, None), "the resync");
        assert!(due(true, false, soon, t0, Some(soon)), "a retry");
        assert!(!due(
            true,
            false,
            soon,
            t0,
            Some(soon + Duration::from_secs(1))
        ));
    }

    #[test]
    fn the_next_wake_is_the_earliest_deadline() {
        let t0 = Instant::now();
        let expiry = t0 + Duration::from_secs(1);
        assert_eq!(
            next_wake([expiry], None, t0),
            expiry + Duration::from_millis(5)
        );
        let retry = t0 + Duration::from_millis(300);
        assert_eq!(next_wake([expiry], Some(retry), t0), retry);
        assert_eq!(next_wake([], None, t0), t0 + RESYNC);
    }
}
