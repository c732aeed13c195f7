//! ferry's forwarder: one per node (a host-network DaemonSet). It watches Services, Nodes,
//! EndpointSlices, LoadBalancerPools and the forwarders' heartbeat Leases (`watches`,
//! `heartbeat`), hears its peers directly (`membership`), decides who is alive (`liveness`),
//! and the `planner` computes this node's `plan` (which VIPs it holds, which ports it forwards
//! where) and applies it: VIPs through `announce` (netlink plus ARP/NDP), traffic through the
//! `dataplane` (`kernel` nftables or `userspace` tokio), backends kept honest by `health`, and
//! tells users on each Service which node announces its address (`report`). It
//! never talks to the operator: both read and write only the Kubernetes API, so either can
//! restart alone. This file is start-up: it wires those pieces together.
//!
//! Shutdown withdraws first: VIPs leave the interface and the heartbeat Lease is deleted (so
//! another node takes over at once), then the data plane is torn down.

pub mod announce;
pub mod balance;
pub mod config;
pub mod counters;
pub mod dataplane;
pub mod guard;
pub mod health;
pub mod heartbeat;
pub mod kernel;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod neighbour;
pub mod nft;
pub mod plan;
pub mod planner;
pub mod proxy_protocol;
pub mod refusals;
pub mod report;
pub mod rlimit;
pub mod userspace;
pub mod watches;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_crds::LoadBalancerPool;
use ferry_model::class::ClassFilter;
use ferry_model::eligibility::target_of;
use ferry_runtime::server::{self, Health, MetricsText};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::announce::Announcer;
use crate::config::{Announce, Config};
use crate::dataplane::Dataplane;
use crate::health::HealthChecker;
use crate::heartbeat::{Heartbeat, Liveness};
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::planner::{Inputs, Outputs, Planner};
use crate::rlimit::connection_limit;
pub use crate::rlimit::raise_open_files_limit;
use crate::userspace::{Limits, relay::Timeouts};
use crate::watches::watch_into;

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
            // Twice the Lease: a killed forwarder's VIPs are gone soon after its successor
            // holds them, and a live one renews them every quarter of it.
            Announcer::new(
                config.interface.as_deref(),
                &node_ips,
                config.lease_duration * 2,
            )
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
        pin_threads: config.pin_threads,
    };
    if limits.max_connections < config.max_connections as usize {
        warn!(
            configured = config.max_connections,
            effective = limits.max_connections,
            open_files,
            "the open-file limit caps relayed TCP connections below --max-connections"
        );
    }
    let dataplane = Dataplane::choose(&config, limits, &metrics, &node_ips).await?;

    // What this node cannot serve, told to its peers in heartbeats and in its Lease.
    let refused = crate::membership::Refused::default();
    // Direct heartbeats, from the node's own address (never a VIP's).
    let membership = match (config.peer_port, node_ips.first()) {
        (0, _) | (_, None) => None,
        (port, Some(ip)) => Some(
            Membership::start(
                &config.node_name,
                SocketAddr::new(*ip, port),
                config.peer_interval,
                config.peer_timeout,
                refused.clone(),
                changed.clone(),
                stop.clone(),
            )
            .await
            .with_context(|| format!("cannot listen for peers' heartbeats on {ip}:{port}"))?,
        ),
    };

    let heartbeat = Arc::new(Heartbeat::new(
        client.clone(),
        &config.lease_namespace,
        &config.node_name,
        config.lease_duration,
        refused.clone(),
    ));
    // Be live before planning: otherwise a restarted forwarder would first withdraw the VIPs
    // it is about to own again (its old Lease has expired), then take them back.
    let live_now = || {
        liveness
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_live(&config.node_name, Instant::now())
    };
    if let Err(err) = heartbeat.renew().await {
        warn!(error = %err, "cannot write the heartbeat Lease yet");
    } else {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !live_now() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let heartbeat_task = {
        let (heartbeat, interval, stop) =
            (heartbeat.clone(), config.lease_renew_interval, stop.clone());
        tokio::spawn(async move { heartbeat.run(interval, stop).await })
    };

    let checker = HealthChecker::new(health::Settings {
        interval: config.health_check_interval,
        timeout: config.health_check_timeout,
    });
    health.set_ready(true);
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "ferry-forwarder".into(),
            instance: Some(config.node_name.clone()),
        },
    );
    let mode = crate::report::Mode(match config.announce {
        Announce::Netlink => dataplane.describe().to_string(),
        Announce::None => format!(
            "{}; the address is already local here and not announced: --announce none",
            dataplane.describe()
        ),
    });
    let planner = Planner::new(
        Inputs {
            node_name: config.node_name.clone(),
            class,
            services,
            nodes,
            slices,
            pools: pool_store,
            leases: liveness.clone(),
            membership,
            peer_timeout: config.peer_timeout,
            renewal_window: crate::liveness::renewal_window(
                config.lease_renew_interval,
                config.lease_duration,
            ),
            changed,
            recorder: Some(recorder.clone()),
            reporter: Some(crate::report::Reporter::new(
                client.clone(),
                recorder,
                &config.node_name,
            )),
            mode,
        },
        Outputs {
            announcer,
            dataplane,
            checker,
            metrics,
        },
        crate::refusals::Refusals::new(refused),
    );
    let withdraw = async {
        // The planner withdraws on stop; readiness goes first so nothing new is sent here.
        let mut stop = stop.clone();
        crate::stopped(&mut stop).await;
        health.set_ready(false);
    };
    tokio::join!(planner.run(stop.clone()), withdraw);
    heartbeat_task.abort();
    heartbeat.release().await;
    info!("ferry-forwarder stopped");
    Ok(())
}
