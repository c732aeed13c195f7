//! ferry's operator: watches Services, Nodes and its provider, and keeps one balancer per
//! LoadBalancer Service it owns. Wiring lives here; each concern has its own module:
//! `class` (ownership), `desired` and `eligibility` (pure inputs, shared with the forwarder
//! from `ferry-providers`), `reconcile` (one Service),
//! `nodes` (the batched node pass), `status`, `leader`, `orphans`, `metrics`, `server`.

pub mod config;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod orphans;
pub mod reconcile;
pub mod status;

#[cfg(test)]
pub use ferry_providers::fixtures;
pub use ferry_providers::{class, desired, eligibility};

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ferry_providers::registry::{self, ProviderContext};
use ferry_providers::{ClusterIdentity, LoadBalancerProvider, ProviderSignal};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::class::ClassFilter;
use crate::config::Config;
use crate::leader::{LeaderConfig, LeaderElector};
use crate::metrics::Metrics;
use crate::reconcile::{Context, error_policy, reconcile};
use ferry_runtime::server::{self, Health, MetricsText};

/// The namespace whose UID is this cluster's identity.
const CLUSTER_IDENTITY_NAMESPACE: &str = "kube-system";

/// How long in-flight work may run after SIGTERM before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Sets up logging as configured; JSON for log pipelines, text for people.
pub fn init_logging(config: &Config) -> anyhow::Result<()> {
    ferry_runtime::init_logging(&config.log_filter, config.log_format)
}

/// The Service hash that matters for reconciling: spec, annotations, labels and deletion.
/// Status writes and finalizer changes, including ferry's own, do not trigger a reconcile:
/// each would otherwise cost a second pass per Service, often on a stale copy that repeats
/// the status write. (A finalizer removed by hand is restored at the periodic resync.)
/// This instance's own record is left out for the same reason; whether *another* instance's
/// record is there is kept in, so its release wakes the Service up.
/// Services do not maintain `metadata.generation`, so the spec itself is hashed.
fn service_fingerprint(svc: &Service, class: &str) -> Option<u64> {
    let mut h = DefaultHasher::new();
    serde_json::to_string(&svc.spec)
        .unwrap_or_default()
        .hash(&mut h);
    let recorded = class::provisioned_by(svc);
    svc.metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != class::PROVISIONED_BY)
        .for_each(|kv| kv.hash(&mut h));
    recorded.is_some_and(|c| c != class).hash(&mut h);
    svc.metadata.labels.hash(&mut h);
    svc.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .hash(&mut h);
    Some(h.finish())
}

/// This cluster's identity: the free-text id and the `kube-system` namespace's UID, which
/// only this cluster's API can give (see `ClusterIdentity`).
async fn cluster_identity(client: &Client, id: String) -> anyhow::Result<ClusterIdentity> {
    let namespace = Api::<Namespace>::all(client.clone())
        .get(CLUSTER_IDENTITY_NAMESPACE)
        .await
        .context(
            "reading the kube-system namespace, whose UID marks this cluster's cloud resources",
        )?;
    let uid = namespace
        .uid()
        .filter(|u| !u.is_empty())
        .context("the kube-system namespace has no UID")?;
    Ok(ClusterIdentity { id, uid })
}

fn identity(config: &Config) -> String {
    config
        .leader_elect_identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("ferry-operator-{}", std::process::id()))
}

/// Signals from the provider as Services to reconcile, coalesced over 500 ms.
fn provider_triggers(
    signals: Option<tokio::sync::mpsc::Receiver<ProviderSignal>>,
    services: Store<Service>,
    class: ClassFilter,
) -> impl Stream<Item = ObjectRef<Service>> + Send + 'static {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    if let Some(mut signals) = signals {
        tokio::spawn(async move {
            let mut signals = futures::stream::poll_fn(move |cx| signals.poll_recv(cx));
            while let Some(first) = signals.next().await {
                let batch =
                    nodes::collect_window(first, &mut signals, Duration::from_millis(500)).await;
                let all = batch.contains(&ProviderSignal::ConfigurationChanged);
                let not_ready = batch.contains(&ProviderSignal::CapacityFreed);
                let uids: std::collections::HashSet<String> = batch
                    .iter()
                    .filter_map(|s| match s {
                        ProviderSignal::Resync(ids) => Some(ids.iter().map(|i| i.uid.clone())),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                for svc in services.state() {
                    let wanted = class.owns(&svc)
                        && (all
                            || (not_ready && !reconcile::is_ready(&svc))
                            || svc.uid().is_some_and(|u| uids.contains(&u)));
                    if wanted
                        && tx
                            .unbounded_send(ObjectRef::from_obj(svc.as_ref()))
                            .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
    rx
}

#[cfg(test)]
pub(crate) fn provider_triggers_for_test(
    signals: tokio::sync::mpsc::Receiver<ProviderSignal>,
    services: Store<Service>,
    class: ClassFilter,
) -> impl Stream<Item = ObjectRef<Service>> + Send + 'static {
    provider_triggers(Some(signals), services, class)
}

/// Runs the operator with the ambient Kubernetes configuration (KUBECONFIG, ~/.kube/config
/// or in-cluster) until SIGTERM/Ctrl-C or lost leadership.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = ferry_runtime::kube_client().await?;
    run_with_client(config, client).await
}

/// Whether a failed call is worth repeating: the server is throttling (429), failing (5xx) or
/// not answering. Anything else (no permission, a certificate it refuses) will not change by
/// itself.
fn transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Waits until the API server answers, retrying with backoff (1 s to 30 s) while it throttles,
/// fails or cannot be reached; any other error ends the operator with its cause.
async fn reach_api_server(client: &Client) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    loop {
        match client.apiserver_version().await {
            Ok(_) => return Ok(()),
            Err(err) if transient(&err) => {
                attempt = attempt.saturating_add(1);
                let wait = reconcile::backoff(attempt, "api-server").min(Duration::from_secs(30));
                warn!(error = %err, retry_in = ?wait, "the Kubernetes API server is not answering yet");
                tokio::time::sleep(wait).await;
            }
            Err(err) => return Err(err).context("cannot use the Kubernetes API server"),
        }
    }
}

/// Runs the operator with `client` until SIGTERM/Ctrl-C or lost leadership.
pub async fn run_with_client(config: Config, client: Client) -> anyhow::Result<()> {
    let class = ClassFilter {
        class: config.class(),
        default_class: config.default_class,
    };
    let mut metrics = Metrics::new();
    let health = Arc::new(Health::default());
    // The endpoints answer from the start (liveness while the API server is away); metrics
    // appear once the provider has registered its own.
    let published: Arc<std::sync::OnceLock<Arc<Metrics>>> = Arc::default();
    let metrics_text: MetricsText = {
        let published = published.clone();
        Arc::new(move || published.get().map(|m| m.encode()).unwrap_or_default())
    };
    let (metrics_addr, health_addr) = server::serve_endpoints(
        config.metrics_addr,
        config.health_addr,
        metrics_text,
        health.clone(),
    )
    .await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        ferry_runtime::shutdown_signal().await;
        let _ = shutdown_tx.send(true);
    });
    let shutdown = {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
        .shared()
    };

    tokio::select! {
        reached = reach_api_server(&client) => reached?,
        _ = shutdown.clone() => return Ok(()),
    }
    let cluster = cluster_identity(&client, config.cluster_id()).await?;
    let provider = registry::build(
        &config.provider,
        ProviderContext {
            client: client.clone(),
            class: class.clone(),
            cluster: cluster.clone(),
        },
    )
    .await?;
    provider.register_metrics(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let _ = published.set(metrics.clone());
    info!(provider = provider.name(), class = %class.class, default_class = class.default_class,
          cluster_id = %cluster.id, cluster_uid = %cluster.uid,
          %metrics_addr, %health_addr, "ferry-operator starting");
    // A standby replica is healthy and ready: it is only waiting.
    health.set_ready(true);

    let identity = identity(&config);
    let elector = config.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            LeaderConfig {
                lease_name: config.leader_elect_lease_name.clone(),
                namespace: config
                    .leader_elect_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "ferry-system".to_string()),
                identity: identity.clone(),
                class: class.class.clone(),
                lease_duration: config.leader_elect_lease_duration,
                renew_deadline: config.leader_elect_renew_deadline,
                retry_period: config.leader_elect_retry_period,
            },
        )
    });
    let term_began = match &elector {
        Some(elector) => tokio::select! {
            at = elector.acquire() => Some(at),
            _ = shutdown.clone() => return Ok(()),
        },
        None => None,
    };
    metrics.leader.set(1);

    // Renewal runs from the moment leadership is won, through the provider's start-up.
    let leadership_lost = async {
        match (&elector, term_began) {
            (Some(e), Some(at)) => e.hold(at).await,
            _ => futures::future::pending().await,
        }
    };
    let work = async {
        // The provider rebuilds its state before the first reconcile.
        let mut attempt = 0;
        loop {
            match provider.start().await {
                Ok(()) => break,
                Err(err) => {
                    attempt += 1;
                    let wait = reconcile::backoff(attempt, "provider-start");
                    warn!(error = %err, retry_in = ?wait, "provider could not start");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.clone() => return,
                    }
                }
            }
        }
        run_controllers(
            &config,
            client.clone(),
            provider.clone(),
            class,
            metrics.clone(),
            identity,
            shutdown.clone(),
        )
        .await;
    };
    // After a shutdown signal, in-flight reconciles get a grace period, not forever.
    let grace = async {
        shutdown.clone().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace period over; exiting with work in flight");
    };
    // Losing leadership drops every reconcile in flight at once: nothing more is allocated
    // or written by this process.
    let lost = tokio::select! {
        _ = work => false,
        _ = leadership_lost => true,
        _ = grace => false,
    };
    metrics.leader.set(0);
    provider.stop().await;
    if let Some(elector) = &elector {
        // Best effort (and only if it is still ours): an unreachable API server must not keep the process alive.
        if tokio::time::timeout(Duration::from_secs(3), elector.release())
            .await
            .is_err()
        {
            warn!("could not release the leader lease in time; it will expire");
        }
    }
    if lost {
        anyhow::bail!("lost leadership; exiting so that a fresh process campaigns again");
    }
    info!("ferry-operator stopped");
    Ok(())
}

/// Waits until `store` holds its first full list. `Store::wait_until_ready` wakes only its most
/// recent waiter (the controller waits on the same stores), so it is polled again each second.
async fn wait_until_ready<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    while tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready())
        .await
        .is_err()
    {}
}

async fn run_controllers(
    config: &Config,
    client: Client,
    provider: Arc<dyn LoadBalancerProvider>,
    class: ClassFilter,
    metrics: Arc<Metrics>,
    identity: String,
    shutdown: futures::future::Shared<impl std::future::Future<Output = ()> + Send + 'static>,
) {
    let (node_store, node_writer) = reflector::store::<Node>();
    let node_changes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(node_writer)
        .touched_objects()
        .filter_map(|r| async move {
            if let Err(err) = &r {
                warn!(error = %err, "watching Nodes");
            }
            r.ok().map(|_| ())
        });

    let (svc_store, svc_writer) = reflector::store::<Service>();
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(svc_writer)
    .applied_objects()
    .predicate_filter(
        {
            let class = class.class.clone();
            move |svc: &Service| service_fingerprint(svc, &class)
        },
        Default::default(),
    );

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferry-operator".into(),
            instance: Some(identity),
        },
    );
    let ctx = Arc::new(Context::new(
        client,
        provider.clone(),
        class.clone(),
        node_store.clone(),
        recorder,
        metrics,
        config.resync_period,
    ));

    let node_triggers = nodes::node_pass_triggers(
        node_changes,
        ctx.clone(),
        svc_store.clone(),
        config.node_debounce,
    );
    let signal_triggers = provider_triggers(provider.take_signals(), svc_store.clone(), class);

    // Orphan collection once the caches are warm, then periodically.
    let orphan_ctx = ctx.clone();
    let orphan_interval = config.orphan_interval;
    let orphan_store = svc_store.clone();
    let orphans = tokio::spawn(async move {
        wait_until_ready(&orphan_store).await;
        tracing::debug!(every = ?orphan_interval, "orphan collection starts");
        let mut tick = tokio::time::interval(orphan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match orphans::collect_orphans(&orphan_ctx).await {
                Ok(0) => {}
                Ok(n) => info!(deleted = n, "orphan collection"),
                Err(err) => warn!(error = %err, "orphan collection failed; will retry"),
            }
        }
    });

    // A reconcile before the Node cache is filled would see no eligible nodes and take every
    // target out of the balancer; the node pass would then not notice (nothing changed since
    // its own first look).
    tokio::select! {
        _ = wait_until_ready(&node_store) => {}
        _ = shutdown.clone() => { orphans.abort(); return; }
    }
    Controller::for_stream(services, svc_store)
        .with_config(controller::Config::default().concurrency(config.concurrency))
        .reconcile_on(node_triggers)
        .reconcile_on(signal_triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                Err(controller::Error::ReconcilerFailed(err, obj)) => {
                    tracing::debug!(object = %obj, error = %err, "reconcile failed");
                }
                Err(controller::Error::ObjectNotFound(_)) => {}
                // Watch errors (a 410 after compaction, a dropped connection) are retried by
                // the watcher with backoff and a relist; worth a warning, not an alarm.
                Err(controller::Error::QueueError(err)) => warn!(error = %err, "watching Services"),
                Err(err) => error!(error = %err, "controller"),
            }
        })
        .await;
    orphans.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::service;

    #[test]
    fn throttling_server_errors_and_silence_are_waited_out_and_refusals_are_not() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(transient(&api(429)));
        assert!(transient(&api(503)));
        assert!(transient(&kube::Error::Service(
            "connection refused".into()
        )));
        assert!(!transient(&api(403)));
        assert!(!transient(&api(401)));
    }

    #[test]
    fn a_spec_change_is_noticed_even_though_services_keep_their_generation() {
        let lb = service("web").lb().port(80, 30080).build();
        let mut cluster_ip = lb.clone();
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert_eq!(lb.metadata.generation, cluster_ip.metadata.generation);
        let fp = |svc: &Service| service_fingerprint(svc, "ferry.dev/local");
        assert_ne!(fp(&lb), fp(&cluster_ip));
        // Status is not part of it: ferry's own writes do not wake it up.
        let mut with_status = lb.clone();
        with_status.status = Some(Default::default());
        assert_eq!(fp(&lb), fp(&with_status));
    }

    #[test]
    fn only_another_instances_record_and_its_release_wake_a_service_up() {
        let lb = service("web").lb().port(80, 30080).build();
        let fp = |svc: &Service| service_fingerprint(svc, "ferry.dev/local");
        let ours = service("web")
            .lb()
            .port(80, 30080)
            .finalized_by("ferry.dev/local")
            .build();
        assert_eq!(fp(&lb), fp(&ours), "claiming it ourselves wakes nothing");
        let theirs = service("web")
            .lb()
            .port(80, 30080)
            .finalized_by("ferry.dev/aws")
            .build();
        assert_ne!(fp(&lb), fp(&theirs), "the other's release is noticed");
    }
}
