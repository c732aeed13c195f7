//! ferry's forwarder: one per node (a host-network DaemonSet). It watches Services, Nodes,
//! EndpointSlices, LoadBalancerPools and the forwarders' heartbeat Leases, computes this
//! node's `plan` (which VIPs it holds, which ports it forwards where), and applies it: VIPs
//! through `announce` (netlink plus ARP/NDP), traffic through the `kernel` (nftables) or
//! `userspace` (tokio) data plane, backends kept honest by `health`. It never talks to the
//! operator: both read and write only the Kubernetes API, so either can restart alone.
//!
//! Shutdown withdraws first: VIPs leave the interface and the heartbeat Lease is deleted (so
//! another node takes over at once), then the data plane is torn down.

pub mod announce;
pub mod balance;
pub mod config;
pub mod health;
pub mod heartbeat;
pub mod kernel;
pub mod metrics;
pub mod neighbour;
pub mod ownership;
pub mod plan;
pub mod proxy_protocol;
pub mod userspace;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_crds::LoadBalancerPool;
use ferry_providers::class::ClassFilter;
use ferry_providers::eligibility::target_of;
use ferry_providers::local::pools;
use ferry_runtime::server::{self, Health, MetricsText};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::announce::Announcer;
use crate::config::{Announce, Config, Mode};
use crate::health::HealthChecker;
use crate::heartbeat::{Heartbeat, Liveness};
use crate::kernel::{Forwarding, Kernel};
use crate::metrics::Metrics;
use crate::plan::{ClusterView, Frontend, NodePlan, Notice};
use crate::userspace::{Limits, Userspace, relay::Timeouts};

/// How often the node's state is re-checked even when nothing was reported (an address
/// removed by hand comes back within this).
const RESYNC: Duration = Duration::from_secs(10);
/// Changes arriving within this window are applied together.
const SETTLE: Duration = Duration::from_millis(20);

/// Resolves once `stop` turns true (or its sender is gone). The borrow `wait_for` returns is
/// dropped here, so futures selecting on this stay `Send`.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sets up logging as configured.
pub fn init_logging(config: &Config) -> anyhow::Result<()> {
    ferry_runtime::init_logging(&config.log_filter, config.log_format)
}

/// Runs the forwarder until SIGTERM/Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = ferry_runtime::kube_client().await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        ferry_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    run_with_client(config, client, stop_rx).await
}

/// Keeps a reflector store of `api` current, poking `changed` on every event.
fn watch_into<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    what: &'static str,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watch_filtered(api, config, changed, what, |_, _| true)
}

/// Keeps a reflector store of `api` current, poking `changed` on the events `matters` (given
/// each event once the store has it) says count.
pub(crate) fn watch_filtered<K, F>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    what: &'static str,
    mut matters: F,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    F: FnMut(&watcher::Event<K>, &Store<K>) -> bool + Send + 'static,
{
    let (store, writer) = reflector::store();
    let reader = store.clone();
    tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, config).default_backoff());
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if matters(&event, &reader) {
                        changed.notify_one();
                    }
                }
                Err(err) => warn!(error = %err, "watching {what}"),
            }
        }
    });
    store
}

/// Why the planner woke up.
enum Wake {
    /// A reported change or health verdict.
    Reported,
    /// Its own deadline (a Lease expiry, a retry or the resync).
    Timer,
    Stop,
}

/// Waits for a change, a health verdict, `deadline`, or the stop.
async fn wait_for_work(
    changed: &Notify,
    health_changed: &Notify,
    deadline: Instant,
    stop: &mut watch::Receiver<bool>,
) -> Wake {
    tokio::select! {
        _ = changed.notified() => {
            tokio::time::sleep(SETTLE).await;
            Wake::Reported
        }
        _ = health_changed.notified() => Wake::Reported,
        _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
        _ = crate::stopped(stop) => Wake::Stop,
    }
}

/// When the planner must look again with nothing reported: the next Lease expiry, the retry
/// of a failed apply, or the resync.
fn next_wake(
    liveness: &Mutex<Liveness>,
    failed: Option<&FailedApply>,
    last_pass: Instant,
) -> Instant {
    let next_expiry = liveness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .next_expiry(Instant::now())
        .map(|at| at + Duration::from_millis(5));
    let retry = failed.map(|f| f.retry_at);
    [next_expiry, retry, Some(last_pass + RESYNC)]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(last_pass + RESYNC)
}

/// The last attempt to program the data plane, when it failed.
struct FailedApply {
    frontends: Vec<Frontend>,
    message: String,
    attempts: u32,
    retry_at: Instant,
}

/// How long to wait before the `attempts`+1-th try to program the data plane.
fn apply_retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// The data plane chosen at start.
enum Dataplane {
    /// nftables, with a userspace side for what nftables cannot serve (`kernel::split`);
    /// the node's own addresses.
    Kernel(Kernel, Userspace, Vec<IpAddr>),
    Userspace(Userspace),
}

impl Dataplane {
    async fn apply(&mut self, frontends: &[Frontend]) -> anyhow::Result<()> {
        let (userspace, rest) = match self {
            Dataplane::Kernel(kernel, userspace, own) => {
                let (kernel_side, userspace_side) =
                    kernel::split(frontends, Forwarding::read(), own);
                kernel.apply(&kernel_side).await?;
                (userspace, userspace_side)
            }
            Dataplane::Userspace(userspace) => (userspace, frontends.to_vec()),
        };
        let failed = userspace.apply(&rest);
        if let Some((f, err)) = failed.first() {
            anyhow::bail!(
                "cannot listen on {}:{}/{} for {} ({} listener(s) failed): {err}",
                f.vip,
                f.port,
                f.protocol,
                f.service,
                failed.len()
            );
        }
        Ok(())
    }

    async fn clear(&mut self) {
        match self {
            Dataplane::Kernel(kernel, userspace, _) => {
                if let Err(err) = kernel.clear().await {
                    warn!(error = %err, "removing the nftables table");
                }
                userspace.apply(&[]);
            }
            Dataplane::Userspace(userspace) => {
                userspace.apply(&[]);
            }
        }
    }
}

/// The pools the operator of this class allocates from (the same validation, so both agree
/// on them).
fn valid_pools(
    store: &Store<LoadBalancerPool>,
    class: &str,
) -> Vec<ferry_providers::local::ipam::Pool> {
    let all: Vec<LoadBalancerPool> = store.state().iter().map(|p| (**p).clone()).collect();
    pools::validate_for(&all, class).valid
}

async fn choose_dataplane(
    config: &Config,
    limits: Limits,
    metrics: &Metrics,
    own: &[IpAddr],
) -> anyhow::Result<Dataplane> {
    let userspace = Userspace::new(limits, metrics.dataplane.clone());
    let kernel = |userspace| Dataplane::Kernel(Kernel::default(), userspace, own.to_vec());
    let forwarding = Forwarding::read();
    let off = match (forwarding.ipv4, forwarding.ipv6) {
        (true, true) => None,
        (false, true) => Some("net.ipv4.ip_forward is 0"),
        (true, false) => Some("net.ipv6.conf.all.forwarding is 0"),
        (false, false) => Some("net.ipv4.ip_forward and net.ipv6.conf.all.forwarding are 0"),
    };
    if let Some(off) = off.filter(|_| config.mode != Mode::Userspace) {
        info!(
            "{off}: VIPs of that family with backends on other nodes are relayed by the \
             userspace side (NAT would need the node to forward)"
        );
    }
    match config.mode {
        Mode::Userspace => {
            info!("data plane: userspace (as configured)");
            Ok(Dataplane::Userspace(userspace))
        }
        Mode::Kernel => {
            Kernel::probe()
                .await
                .context("--mode kernel, but nftables cannot be programmed here")?;
            info!("data plane: kernel (nftables, as configured)");
            Ok(kernel(userspace))
        }
        Mode::Auto => match Kernel::probe().await {
            Ok(()) => {
                info!("data plane: kernel (nftables works)");
                Ok(kernel(userspace))
            }
            Err(err) => {
                info!(reason = %err, "data plane: userspace (nftables cannot be programmed here)");
                Ok(Dataplane::Userspace(userspace))
            }
        },
    }
}

/// Lets the process hold as many sockets as it may (as root with CAP_SYS_RESOURCE, past the
/// hard limit up to `fs.nr_open`, at most 2^20; else up to the hard limit): every relayed TCP
/// connection costs two. Returns the open-file limit in force afterwards.
pub fn raise_open_files_limit() -> u64 {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    // SAFETY: getrlimit/setrlimit on stack values.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let up = ceiling.max(lim.rlim_max);
        let want = libc::rlimit {
            rlim_cur: up,
            rlim_max: up,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return up;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// The connection limit the open-file limit allows: two sockets per connection, with room
/// kept for watches, listeners, health checks and UDP flows.
fn connection_limit(configured: u32, open_files: u64) -> usize {
    let affordable = open_files.saturating_sub(1024) / 2;
    (configured as u64).min(affordable).max(1) as usize
}

/// Runs the forwarder with `client` until `stop` turns true.
pub async fn run_with_client(
    config: Config,
    client: Client,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let open_files = raise_open_files_limit();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let metrics_text: MetricsText = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.encode())
    };
    let (metrics_addr, _) = server::serve_endpoints(
        config.metrics_addr,
        config.health_addr,
        metrics_text,
        health.clone(),
    )
    .await?;
    let class = ClassFilter {
        class: config.load_balancer_class.clone(),
        default_class: config.default_class,
    };
    info!(node = %config.node_name, class = %class.class, %metrics_addr, "ferry-forwarder starting");

    let changed = Arc::new(Notify::new());
    let services = watch_into(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        "Services",
    );
    let nodes = watch_into(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        "Nodes",
    );
    let slices = watch_into(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        "EndpointSlices",
    );
    let liveness = Arc::new(Mutex::new(Liveness::default()));
    let leases = heartbeat::watch(
        Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
        liveness.clone(),
        changed.clone(),
    );
    let pool_store = watch_into(
        Api::<LoadBalancerPool>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        "LoadBalancerPools",
    );
    for (ready, what) in [
        (services.wait_until_ready().await.is_ok(), "Services"),
        (nodes.wait_until_ready().await.is_ok(), "Nodes"),
        (slices.wait_until_ready().await.is_ok(), "EndpointSlices"),
        (leases.wait_until_ready().await.is_ok(), "Leases"),
        (
            pool_store.wait_until_ready().await.is_ok(),
            "LoadBalancerPools",
        ),
    ] {
        if !ready {
            anyhow::bail!("the {what} watch ended before it was ready");
        }
    }

    // The node's own addresses: where VIPs go, and what is never withdrawn.
    let node_ips: Vec<IpAddr> = loop {
        let me = nodes
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str()));
        if let Some(ips) = me.as_deref().and_then(target_of).map(|t| t.internal_ips) {
            break ips;
        }
        warn!(node = %config.node_name, "waiting for this Node (with an InternalIP) to exist");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = crate::stopped(&mut stop) => return Ok(()),
        }
    };
    let announcer = match config.announce {
        Announce::Netlink => Some(
            Announcer::new(config.interface.as_deref(), &node_ips)
                .await
                .context("cannot set up VIP announcement")?,
        ),
        Announce::None => None,
    };
    if let Some(a) = &announcer {
        info!(interface = %a.interface.name, "VIPs go on this interface");
    }
    let limits = Limits {
        connect_timeout: config.connect_timeout,
        timeouts: Timeouts {
            idle: config.idle_timeout,
            half_close: config.half_close_timeout,
        },
        max_connections: connection_limit(config.max_connections, open_files),
        udp_max_flows: config.udp_max_flows as usize,
        udp_idle_timeout: config.udp_idle_timeout,
    };
    if limits.max_connections < config.max_connections as usize {
        warn!(
            configured = config.max_connections,
            effective = limits.max_connections,
            open_files,
            "the open-file limit caps relayed TCP connections below --max-connections"
        );
    }
    let mut dataplane = choose_dataplane(&config, limits, &metrics, &node_ips).await?;

    let live_now = || {
        liveness
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live(Instant::now())
    };
    let heartbeat = Arc::new(Heartbeat::new(
        client.clone(),
        &config.lease_namespace,
        &config.node_name,
        config.lease_duration,
    ));
    // Be live before planning: otherwise a restarted forwarder would first withdraw the VIPs
    // it is about to own again (its old Lease has expired), then take them back.
    if let Err(err) = heartbeat.renew().await {
        warn!(error = %err, "cannot write the heartbeat Lease yet");
    } else {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if live_now().contains(&config.node_name) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let heartbeat_task = {
        let (heartbeat, interval, stop) =
            (heartbeat.clone(), config.lease_renew_interval, stop.clone());
        tokio::spawn(async move { heartbeat.run(interval, stop).await })
    };

    let mut checker = HealthChecker::new(health::Settings {
        interval: config.health_check_interval,
        timeout: config.health_check_timeout,
    });
    let health_changed = checker.changed();
    let mut last_plan: Option<NodePlan> = None;
    let mut last_effective: Option<Vec<Frontend>> = None;
    let mut failed_apply: Option<FailedApply> = None;
    let mut logged: BTreeSet<Notice> = BTreeSet::new();
    let mut last_sync = Instant::now() - RESYNC;
    let mut last_pass = Instant::now();
    let mut last_live: Option<BTreeSet<String>> = None;
    let mut woken_by_timer = false;
    health.set_ready(true);

    loop {
        let live = live_now();
        // A timer wake-up is for a Lease that may have expired, a retry or the resync; when
        // it finds none of them due, there is nothing to plan.
        let due = last_pass.elapsed() >= RESYNC
            || failed_apply
                .as_ref()
                .is_some_and(|f| Instant::now() >= f.retry_at);
        if woken_by_timer && !due && last_live.as_ref() == Some(&live) {
            let deadline = next_wake(&liveness, failed_apply.as_ref(), last_pass);
            match wait_for_work(&changed, &health_changed, deadline, &mut stop).await {
                Wake::Stop => break,
                wake => woken_by_timer = matches!(wake, Wake::Timer),
            }
            continue;
        }
        last_pass = Instant::now();
        let valid_pools = valid_pools(&pool_store, &class.class);
        let (services_now, nodes_now, slices_now) =
            (services.state(), nodes.state(), slices.state());
        let (plan, notices) = plan::plan(&ClusterView {
            node_name: &config.node_name,
            class: &class,
            services: &services_now,
            nodes: &nodes_now,
            slices: &slices_now,
            pools: &valid_pools,
            live: &live,
        });
        metrics.live_forwarders.set(live.len() as i64);
        let notices: BTreeSet<Notice> = notices.into_iter().collect();
        for n in notices.difference(&logged) {
            info!(service = %n.service, "{}", n.message);
        }
        logged = notices;

        let announce_changed = last_plan.as_ref().map(|p| &p.announce) != Some(&plan.announce);
        if let Some(a) = &announcer
            && (announce_changed || last_sync.elapsed() >= RESYNC)
        {
            last_sync = Instant::now();
            match a.sync(&plan.announce, &valid_pools).await {
                Ok(added) => {
                    let counter = metrics.announcements.clone();
                    a.announce(added, move |n| {
                        counter.inc_by(n as u64);
                    });
                }
                Err(err) => error!(error = %err, "cannot hold or withdraw VIPs"),
            }
        }
        if announce_changed {
            for (vip, owner) in &plan.owners {
                if last_plan.as_ref().and_then(|p| p.owners.get(vip)) != Some(owner) {
                    info!(%vip, %owner, held_here = (*owner == config.node_name), "VIP owner");
                }
            }
        }
        metrics.vips_held.set(plan.announce.len() as i64);
        checker.set_probes(&health::probes(&plan.frontends));
        let effective = health::effective(&plan.frontends, |p| checker.healthy(p));
        // A failed apply is retried with backoff (1 s doubling to 1 min), sooner only when
        // the frontends change; it is logged as an error when its message changes.
        let retry_due = failed_apply
            .as_ref()
            .is_none_or(|f| f.frontends != effective || Instant::now() >= f.retry_at);
        if last_effective.as_ref() != Some(&effective) && retry_due {
            match dataplane.apply(&effective).await {
                Ok(()) => {
                    metrics.applied("ok");
                    metrics.frontends.set(effective.len() as i64);
                    last_effective = Some(effective);
                    failed_apply = None;
                }
                Err(err) => {
                    metrics.applied("error");
                    let message = format!("{err:#}");
                    let attempts = failed_apply.as_ref().map_or(0, |f| f.attempts) + 1;
                    let delay = apply_retry_delay(attempts);
                    if failed_apply.as_ref().map(|f| &f.message) != Some(&message) {
                        error!(error = %message, retry_in = ?delay, "cannot program the data plane");
                    } else {
                        debug!(error = %message, attempts, "still cannot program the data plane");
                    }
                    last_effective = None;
                    failed_apply = Some(FailedApply {
                        frontends: effective,
                        message,
                        attempts,
                        retry_at: Instant::now() + delay,
                    });
                }
            }
        }
        last_plan = Some(plan);
        last_live = Some(live);

        let deadline = next_wake(&liveness, failed_apply.as_ref(), last_pass);
        match wait_for_work(&changed, &health_changed, deadline, &mut stop).await {
            Wake::Stop => break,
            wake => woken_by_timer = matches!(wake, Wake::Timer),
        }
    }

    info!("shutting down: withdrawing VIPs first");
    health.set_ready(false);
    if let Some(a) = &announcer
        && let Err(err) = a
            .sync(&BTreeSet::new(), &valid_pools(&pool_store, &class.class))
            .await
    {
        error!(error = %err, "cannot withdraw VIPs");
    }
    heartbeat_task.abort();
    heartbeat.release().await;
    dataplane.clear().await;
    info!("ferry-forwarder stopped");
    Ok(())
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
    fn the_connection_limit_fits_the_open_file_limit() {
        assert_eq!(connection_limit(65_536, 1 << 20), 65_536);
        assert_eq!(connection_limit(65_536, 20_000), 9_488);
        assert_eq!(connection_limit(100, 20_000), 100);
        assert_eq!(connection_limit(100, 512), 1);
    }
}
