//! The processes and objects of one chaos run, and what each schedule step does to them:
//! the tested instance's two replicas behind their own fault proxies, the neighbour
//! instance, moto on cloud runs, the run's namespace, pools and Nodes. Faults with a
//! duration are undone by `tick` when due; `lift_all` undoes them all and brings every
//! replica back before the system is left to settle.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_crds::LoadBalancerPool;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::Settings;
use super::invariants::{self, Expect, SHARING, Shown, Snapshot, Wanted};
use super::schedule::{ApiFault, Owner, Step};
use crate::aws::{AwsWorld, Seed};
use crate::control_plane::ControlPlane;
use crate::fault_proxy::FaultProxy;
use crate::nodes::{SimulatedNode, register};
use crate::operator::OperatorProcess;

const NEIGHBOUR_CLASS: &str = "example.com/chaos-lan";
const UNSERVED_CLASS: &str = "example.com/nobody";
const TESTED_POOL: (&str, &str, &str) = ("chaos-tested", "127.242.0.0/27", "127.242.0.");
const NEIGHBOUR_POOL: (&str, &str, &str) = ("chaos-lan", "127.242.1.0/28", "127.242.1.");
/// Live Services at most, so the pools never run dry.
const MAX_SERVICES: usize = 14;
/// API latency injected on a replica: below the election margin (lease 4 s − renew 3 s).
const LATENCY: Duration = Duration::from_millis(700);

struct Replica {
    proxy: FaultProxy,
    process: OperatorProcess,
    running: bool,
    blackholed: bool,
}

/// One Service the run made, and what it asked for.
struct Tracked {
    name: String,
    owner: Owner,
    requested: Option<String>,
    shared: bool,
    alive: bool,
}

/// Something to undo later.
enum Undo {
    Restart(usize),
    ApiClear(usize),
    CloudThrottleOff,
    CloudErrorsOff,
}

pub struct World {
    admin: Client,
    svcs: Api<Service>,
    namespace: String,
    settings: Settings,
    tested_class: String,
    replicas: Vec<Replica>,
    neighbour: OperatorProcess,
    aws: Option<AwsWorld>,
    nodes: Vec<String>,
    next_node: usize,
    services: Vec<Tracked>,
    next_service: usize,
    pending: Vec<(Instant, Undo)>,
    faults: BTreeMap<String, u32>,
    duplicates: Arc<Mutex<Vec<String>>>,
    watcher: tokio::task::JoinHandle<()>,
    foreign_balancer: Option<String>,
}

fn upstream(cp: &ControlPlane) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], cp.port))
}

/// Watches the run's Services and records every moment one address shows on two Services
/// that may not share it.
fn watch_duplicates(
    api: Api<Service>,
    found: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shown: BTreeMap<String, Shown> = BTreeMap::new();
        let stream = watcher(api, watcher::Config::default());
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(svc) | watcher::Event::InitApply(svc)) => {
                    shown.insert(svc.name_any(), Shown::of(&svc));
                }
                Ok(watcher::Event::Delete(svc)) => {
                    shown.remove(&svc.name_any());
                    continue;
                }
                _ => continue,
            }
            let wrong = invariants::shared_wrongly(&shown);
            if !wrong.is_empty()
                && let Ok(mut f) = found.lock()
            {
                for w in wrong {
                    if !f.contains(&w) {
                        f.push(w);
                    }
                }
            }
        }
    })
}

impl World {
    pub async fn start(cp: &ControlPlane, settings: &Settings) -> anyhow::Result<World> {
        let admin = cp.admin_client().await?;
        let seed = settings.seed;
        let namespace = crate::scenario::namespace(&admin, &format!("chaos-{seed}")).await?;
        let svcs: Api<Service> = Api::namespaced(admin.clone(), &namespace);
        crate::scenario::delete_pools(&admin).await;
        let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
        pools
            .create(
                &PostParams::default(),
                &crate::scenario::pool(TESTED_POOL.0, &[TESTED_POOL.1]),
            )
            .await?;
        let mut lan = crate::scenario::pool(NEIGHBOUR_POOL.0, &[NEIGHBOUR_POOL.1]);
        lan.spec.load_balancer_classes = vec![NEIGHBOUR_CLASS.into()];
        pools.create(&PostParams::default(), &lan).await?;

        let aws = if settings.cloud {
            Some(
                AwsWorld::start(
                    &cp.dir,
                    Seed {
                        instances: 4,
                        eips: 0,
                        internal_subnets: false,
                    },
                )
                .await?,
            )
        } else {
            None
        };
        let tested_class = if settings.cloud {
            "ferry.dev/aws".to_string()
        } else {
            ferry_providers::class::DEFAULT_LOCAL_CLASS.to_string()
        };
        let mut faults = BTreeMap::new();
        if settings.throttled {
            faults.insert("api_429_max_inflight".to_string(), 1);
        }
        let duplicates = Arc::new(Mutex::new(Vec::new()));
        let watcher = watch_duplicates(svcs.clone(), duplicates.clone());
        let mut world = World {
            admin: admin.clone(),
            svcs,
            namespace,
            settings: settings.clone(),
            tested_class,
            replicas: Vec::new(),
            neighbour: OperatorProcess::start(
                &cp.operator_kubeconfig,
                &cp.dir,
                &[
                    "--load-balancer-class",
                    NEIGHBOUR_CLASS,
                    "--default-class=false",
                    "--leader-elect-lease-name",
                    &format!("chaos-{seed}-lan"),
                ],
            )?,
            aws,
            nodes: Vec::new(),
            next_node: 0,
            services: Vec::new(),
            next_service: 0,
            pending: Vec::new(),
            faults,
            duplicates,
            watcher,
            foreign_balancer: None,
        };
        for _ in 0..2 {
            world.add_node().await?;
        }
        if let Some(aws) = &world.aws {
            world.foreign_balancer = Some(seed_foreign_balancer(aws).await?);
        }
        let lease = format!("chaos-{seed}-tested");
        for i in 0..2 {
            let proxy = FaultProxy::start(upstream(cp)).await?;
            let path = cp.dir.join(format!("chaos-{seed}-{i}.kubeconfig"));
            std::fs::write(&path, cp.kubeconfig_via(&proxy.url(), &cp.operator_token))?;
            let mut args: Vec<String> = vec![
                "--leader-elect-lease-name".into(),
                lease.clone(),
                "--orphan-interval".into(),
                "5s".into(),
            ];
            let mut env = Vec::new();
            if let Some(aws) = &world.aws {
                args.extend(aws.operator_args());
                env = aws.operator_env();
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let process = OperatorProcess::start_with_env(&path, &cp.dir, &args, &env)?;
            world.replicas.push(Replica {
                proxy,
                process,
                running: true,
                blackholed: false,
            });
        }
        Ok(world)
    }

    pub fn faults(&self) -> &BTreeMap<String, u32> {
        &self.faults
    }

    fn count(&mut self, kind: &str) {
        *self.faults.entry(kind.to_string()).or_default() += 1;
    }

    /// A fault that could not be injected after all.
    fn uncount(&mut self, kind: &str) {
        if let Some(n) = self.faults.get_mut(kind) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.faults.remove(kind);
            }
        }
    }

    async fn create_tested(&mut self) -> anyhow::Result<()> {
        Box::pin(self.apply(&Step::Create {
            owner: Owner::Tested,
            ports: vec![80],
            requested: None,
            shared: false,
        }))
        .await
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.services.len())
            .filter(|i| self.services.get(*i).is_some_and(|s| s.alive))
            .collect()
    }

    fn pick(&self, pick: u64) -> Option<usize> {
        let alive = self.alive();
        let n = u64::try_from(alive.len()).ok()?;
        if n == 0 {
            return None;
        }
        alive.get(usize::try_from(pick % n).ok()?).copied()
    }

    fn class_of(&self, owner: Owner) -> Option<String> {
        match owner {
            Owner::Tested => Some(self.tested_class.clone()),
            Owner::Neighbour => Some(NEIGHBOUR_CLASS.into()),
            Owner::Unserved => Some(UNSERVED_CLASS.into()),
        }
    }

    fn service_ports(ports: &[i32]) -> Vec<ServicePort> {
        ports
            .iter()
            .map(|p| ServicePort {
                name: Some(format!("p{p}")),
                port: *p,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            })
            .collect()
    }

    /// Performs one step of the schedule.
    pub async fn apply(&mut self, step: &Step) -> anyhow::Result<()> {
        if let Some(kind) = step.fault_kind() {
            self.count(kind);
        }
        match step {
            Step::Create {
                owner,
                ports,
                requested,
                shared,
            } => {
                if self.alive().len() >= MAX_SERVICES {
                    return Ok(());
                }
                let name = format!("s{}", self.next_service);
                self.next_service += 1;
                // Requests and sharing are the local provider's business.
                let local = *owner == Owner::Neighbour || !self.settings.cloud;
                let requested = requested
                    .filter(|_| local && *owner == Owner::Tested)
                    .map(|o| format!("{}{o}", TESTED_POOL.2));
                let shared = *shared && local && *owner == Owner::Tested && requested.is_none();
                // Shared Services get ports of their own, so they may always share.
                let ports: Vec<i32> = if shared {
                    vec![9000 + i32::try_from(self.next_service).unwrap_or(0)]
                } else {
                    ports.clone()
                };
                let mut annotations = BTreeMap::new();
                if shared {
                    annotations.insert(SHARING.to_string(), "chaos".to_string());
                }
                let svc = Service {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    },
                    spec: Some(ServiceSpec {
                        type_: Some("LoadBalancer".into()),
                        load_balancer_class: self.class_of(*owner),
                        load_balancer_ip: requested.clone(),
                        ports: Some(Self::service_ports(&ports)),
                        ..ServiceSpec::default()
                    }),
                    status: None,
                };
                self.svcs.create(&PostParams::default(), &svc).await?;
                self.services.push(Tracked {
                    name,
                    owner: *owner,
                    requested,
                    shared,
                    alive: true,
                });
            }
            Step::ChangePorts { pick, ports } => {
                let Some(i) = self.pick(*pick) else {
                    return Ok(());
                };
                let Some(t) = self.services.get(i) else {
                    return Ok(());
                };
                if t.shared {
                    return Ok(());
                }
                let ports: Vec<_> = ports
                    .iter()
                    .map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP"}))
                    .collect();
                // A JSON merge patch replaces the list: the new ports, new NodePorts.
                self.svcs
                    .patch(
                        &t.name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"ports": ports}})),
                    )
                    .await?;
            }
            Step::Delete { pick } => {
                let Some(i) = self.pick(*pick) else {
                    return Ok(());
                };
                if let Some(t) = self.services.get_mut(i) {
                    t.alive = false;
                    let name = t.name.clone();
                    self.svcs.delete(&name, &DeleteParams::default()).await?;
                }
            }
            Step::MoveClass { pick } => {
                let Some(i) = self.pick(*pick) else {
                    return Ok(());
                };
                let Some(t) = self.services.get(i) else {
                    return Ok(());
                };
                let to = match t.owner {
                    Owner::Tested => Owner::Neighbour,
                    Owner::Neighbour => Owner::Tested,
                    Owner::Unserved => return Ok(()),
                };
                if t.shared || t.requested.is_some() {
                    return Ok(());
                }
                let name = t.name.clone();
                // A LoadBalancer Service's class is immutable: through another type and back.
                for spec in [
                    json!({"type": "ClusterIP", "loadBalancerClass": null}),
                    json!({"type": "LoadBalancer", "loadBalancerClass": self.class_of(to)}),
                ] {
                    self.svcs
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({ "spec": spec })),
                        )
                        .await?;
                }
                if let Some(t) = self.services.get_mut(i) {
                    t.owner = to;
                }
            }
            Step::AddNode => self.add_node().await?,
            Step::RemoveNode { pick } => {
                if self.nodes.len() <= 1 {
                    return Ok(());
                }
                let n = u64::try_from(self.nodes.len()).unwrap_or(1);
                let i = usize::try_from(pick % n).unwrap_or(0);
                let name = self.nodes.remove(i);
                let _ = Api::<Node>::all(self.admin.clone())
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
            Step::Kill {
                replica,
                restart_ms,
            } => {
                self.stop_replica(*replica, false, *restart_ms);
            }
            Step::Terminate {
                replica,
                restart_ms,
            } => {
                self.stop_replica(*replica, true, *restart_ms);
            }
            Step::KillMidCloudCall { action, restart_ms } => {
                let Some(mark) = self.aws.as_ref().map(|aws| {
                    aws.proxy.hold_next(action, Duration::from_secs(600));
                    aws.proxy.mark()
                }) else {
                    return Ok(());
                };
                // Make the operator call it: a new balancer, a deleted one, a new node.
                match *action {
                    "DeleteLoadBalancer" | "DeleteTargetGroup" => {
                        let tested = self.alive().into_iter().position(|i| {
                            self.services
                                .get(i)
                                .is_some_and(|t| t.owner == Owner::Tested)
                        });
                        match tested {
                            Some(at) => {
                                let pick = u64::try_from(at).unwrap_or(0);
                                Box::pin(self.apply(&Step::Delete { pick })).await?
                            }
                            None => self.create_tested().await?,
                        }
                    }
                    "RegisterTargets" => self.add_node().await?,
                    _ => self.create_tested().await?,
                }
                let Some(aws) = &self.aws else {
                    return Ok(());
                };
                let until = Instant::now() + Duration::from_secs(8);
                let mut made = false;
                while Instant::now() < until {
                    if aws.proxy.calls_since(mark).contains_key(*action) {
                        made = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if made {
                    // Whoever made the call is among these: the cloud acted, it never heard.
                    for r in 0..self.replicas.len() {
                        self.stop_replica(r, false, *restart_ms);
                    }
                } else {
                    aws.proxy.hold_next(action, Duration::ZERO);
                    self.uncount("sigkill_mid_cloud_call");
                }
            }
            Step::Api { replica, fault, ms } => {
                let Some(r) = self.replicas.get_mut(*replica) else {
                    return Ok(());
                };
                match fault {
                    ApiFault::Reset => r.proxy.reset_all(),
                    ApiFault::Outage => r.proxy.set_outage(true),
                    ApiFault::Latency => r.proxy.set_latency(LATENCY),
                    ApiFault::Blackhole => {
                        r.proxy.set_blackhole(true);
                        r.blackholed = true;
                    }
                }
                if *fault != ApiFault::Reset {
                    self.later(*ms, Undo::ApiClear(*replica));
                }
            }
            Step::CloudThrottle { every, ms } => {
                if let Some(aws) = &self.aws {
                    aws.proxy.throttle_every(*every);
                    self.later(*ms, Undo::CloudThrottleOff);
                }
            }
            Step::CloudErrors { every, ms } => {
                if let Some(aws) = &self.aws {
                    aws.proxy.fail_every(*every);
                    self.later(*ms, Undo::CloudErrorsOff);
                }
            }
            Step::Pause { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
        Ok(())
    }

    fn later(&mut self, ms: u64, undo: Undo) {
        self.pending
            .push((Instant::now() + Duration::from_millis(ms), undo));
    }

    fn stop_replica(&mut self, replica: usize, graceful: bool, restart_ms: u64) {
        let Some(r) = self.replicas.get_mut(replica) else {
            return;
        };
        if !r.running {
            return;
        }
        if graceful {
            r.process.terminate();
        } else {
            r.process.kill();
        }
        r.running = false;
        self.later(restart_ms, Undo::Restart(replica));
    }

    async fn add_node(&mut self) -> anyhow::Result<()> {
        let i = self.next_node;
        self.next_node += 1;
        let node = SimulatedNode {
            name: format!("chaos-{}-{i}", self.settings.seed),
            ip: std::net::Ipv4Addr::new(127, 0, 3, u8::try_from(i % 250 + 1).unwrap_or(1)),
            ipv6: None,
        };
        register(&self.admin, std::slice::from_ref(&node)).await?;
        if let Some(aws) = &self.aws
            && let Some(instance) = aws.instances.get(i % aws.instances.len().max(1))
        {
            Api::<Node>::all(self.admin.clone())
                .patch(
                    &node.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"providerID": instance.provider_id()}})),
                )
                .await?;
        }
        self.nodes.push(node.name);
        Ok(())
    }

    fn undo(&mut self, undo: Undo) -> anyhow::Result<()> {
        match undo {
            Undo::Restart(i) => {
                if let Some(r) = self.replicas.get_mut(i)
                    && !r.running
                {
                    r.process.restart()?;
                    r.running = true;
                }
            }
            Undo::ApiClear(i) => {
                if let Some(r) = self.replicas.get_mut(i) {
                    r.proxy.set_outage(false);
                    r.proxy.set_latency(Duration::ZERO);
                    if r.blackholed {
                        r.proxy.set_blackhole(false);
                        r.blackholed = false;
                        // What a black hole swallowed is lost; its connections are dead.
                        r.proxy.reset_all();
                    }
                }
            }
            Undo::CloudThrottleOff => {
                if let Some(aws) = &self.aws {
                    aws.proxy.throttle_every(0);
                }
            }
            Undo::CloudErrorsOff => {
                if let Some(aws) = &self.aws {
                    aws.proxy.fail_every(0);
                }
            }
        }
        Ok(())
    }

    /// A replica that exited by itself (it lost leadership, as it must when it cannot
    /// renew) is started again, as the kubelet would restart its container.
    fn restart_exited(&mut self) -> anyhow::Result<()> {
        let mut restarted = 0;
        for r in &mut self.replicas {
            if r.running && !r.process.is_running() {
                r.process.restart()?;
                restarted += 1;
            }
        }
        for _ in 0..restarted {
            self.count("exited_and_restarted");
        }
        Ok(())
    }

    /// Undoes what is due; a short breath between steps.
    pub async fn tick(&mut self) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_millis(120)).await;
        self.restart_exited()?;
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.pending = later;
        for (_, undo) in due {
            self.undo(undo)?;
        }
        Ok(())
    }

    /// Every fault off, every replica back.
    pub async fn lift_all(&mut self) -> anyhow::Result<()> {
        for (_, undo) in std::mem::take(&mut self.pending) {
            self.undo(undo)?;
        }
        for i in 0..self.replicas.len() {
            self.undo(Undo::ApiClear(i))?;
            self.undo(Undo::Restart(i))?;
        }
        self.undo(Undo::CloudThrottleOff)?;
        self.undo(Undo::CloudErrorsOff)?;
        Ok(())
    }

    fn wanted(&self) -> Vec<Wanted> {
        self.services
            .iter()
            .map(|t| Wanted {
                name: t.name.clone(),
                alive: t.alive,
                expect: match t.owner {
                    Owner::Tested => Expect::Tested {
                        hostnames: self.settings.cloud,
                    },
                    Owner::Neighbour => Expect::Neighbour,
                    Owner::Unserved => Expect::Untouched,
                },
                requested: t.requested.clone(),
            })
            .collect()
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let services = self.svcs.list(&ListParams::default()).await?.items;
        let pools: Api<LoadBalancerPool> = Api::all(self.admin.clone());
        let mut snapshot = Snapshot {
            services,
            ..Snapshot::default()
        };
        for (name, _, prefix) in [TESTED_POOL, NEIGHBOUR_POOL] {
            if name == TESTED_POOL.0 && self.settings.cloud {
                continue;
            }
            let allocated = pools
                .get_opt(name)
                .await?
                .and_then(|p| p.status)
                .map(|s| s.allocated);
            snapshot
                .pools
                .insert(name.to_string(), (prefix.to_string(), allocated));
        }
        if let Some(aws) = &self.aws {
            let me = crate::scenario::cluster_identity(&self.admin, &aws.cluster_id).await?;
            snapshot.cloud_owners = Some(cloud_owners(aws, &me.uid).await?);
            if let Some(arn) = &self.foreign_balancer {
                let out = aws.elb.describe_load_balancers().send().await?;
                snapshot.foreign_survives = Some(
                    out.load_balancers()
                        .iter()
                        .any(|lb| lb.load_balancer_arn() == Some(arn.as_str())),
                );
            }
        }
        Ok(snapshot)
    }

    /// Waits until every invariant holds, or `within` passes; returns what still fails.
    pub async fn settle(&mut self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let wanted = self.wanted();
        loop {
            if let Err(err) = self.restart_exited() {
                return vec![format!("restarting a replica: {err:#}")];
            }
            let violations = match self.snapshot().await {
                Ok(s) => invariants::check(&s, &wanted, &self.tested_class, NEIGHBOUR_CLASS),
                Err(err) => vec![format!("reading the cluster: {err:#}")],
            };
            if violations.is_empty() || Instant::now() > deadline {
                return violations;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Moments at which two Services showed one address, seen by the watcher.
    pub fn duplicates_seen(&self) -> Vec<String> {
        self.duplicates
            .lock()
            .map(|d| d.iter().map(|d| format!("at some moment: {d}")).collect())
            .unwrap_or_default()
    }

    /// Deletes everything the run made; what does not go away in time is a violation.
    pub async fn clean_up(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &mut self.services {
            if t.alive {
                t.alive = false;
                let _ = self.svcs.delete(&t.name, &DeleteParams::default()).await;
            }
        }
        let settled = self.settle(Duration::from_secs(90)).await;
        out.extend(
            settled
                .into_iter()
                .map(|v| format!("after deleting everything: {v}")),
        );
        out
    }

    /// Stops every process and removes what the run made in the cluster.
    pub async fn stop(&mut self) {
        self.watcher.abort();
        for r in &mut self.replicas {
            r.process.kill();
            r.running = false;
        }
        self.neighbour.kill();
        // Whatever still holds a finalizer (a failed run) is let go.
        if let Ok(list) = self.svcs.list(&ListParams::default()).await {
            for svc in list {
                let _ = self
                    .svcs
                    .patch(
                        &svc.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = self
                    .svcs
                    .delete(&svc.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        let nodes: Api<Node> = Api::all(self.admin.clone());
        for n in &self.nodes {
            let _ = nodes.delete(n, &DeleteParams::default()).await;
        }
        crate::scenario::delete_pools(&self.admin).await;
        let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(self.admin.clone())
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

/// Another cluster's balancer: the same `--cluster-id`, another identity. It must survive
/// every orphan pass of this cluster.
async fn seed_foreign_balancer(aws: &AwsWorld) -> anyhow::Result<String> {
    use aws_sdk_elasticloadbalancingv2::types::{LoadBalancerTypeEnum, Tag};
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let out = aws
        .elb
        .create_load_balancer()
        .name("ferry-0000000000000000")
        .r#type(LoadBalancerTypeEnum::Network)
        .set_subnets(Some(aws.public_subnets.clone()))
        .tags(tag("ferry.dev/cluster", &aws.cluster_id))
        .tags(tag("ferry.dev/cluster-uid", "another-cluster"))
        .tags(tag("ferry.dev/service-namespace", "elsewhere"))
        .tags(tag("ferry.dev/service-name", "theirs"))
        .tags(tag("ferry.dev/service-uid", "uid-elsewhere"))
        .send()
        .await?;
    out.load_balancers()
        .first()
        .and_then(|lb| lb.load_balancer_arn())
        .map(str::to_string)
        .context("moto returned no balancer")
}

/// Service UIDs that still have ferry resources of this cluster (both marks) in moto.
async fn cloud_owners(
    aws: &AwsWorld,
    cluster_uid: &str,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut arns = Vec::new();
    let lbs = aws.elb.describe_load_balancers().send().await?;
    arns.extend(
        lbs.load_balancers()
            .iter()
            .filter_map(|lb| lb.load_balancer_arn().map(str::to_string)),
    );
    let tgs = aws.elb.describe_target_groups().send().await?;
    arns.extend(
        tgs.target_groups()
            .iter()
            .filter_map(|t| t.target_group_arn().map(str::to_string)),
    );
    let mut owners = std::collections::BTreeSet::new();
    for chunk in arns.chunks(20) {
        let tags = aws
            .elb
            .describe_tags()
            .set_resource_arns(Some(chunk.to_vec()))
            .send()
            .await?;
        for d in tags.tag_descriptions() {
            let pairs = d.tags().iter().map(|t| (t.key(), t.value()));
            owners.extend(owner_of(pairs, cluster_uid));
        }
    }
    let sgs = aws.ec2.describe_security_groups().send().await?;
    for g in sgs.security_groups() {
        let pairs = g.tags().iter().map(|t| (t.key(), t.value()));
        owners.extend(owner_of(pairs, cluster_uid));
    }
    Ok(owners)
}

/// The Service UID tags name, when they carry `cluster_uid` as the cluster's identity.
fn owner_of<'a>(
    tags: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
    cluster_uid: &str,
) -> Option<String> {
    let tags: BTreeMap<&str, &str> = tags.filter_map(|(k, v)| Some((k?, v?))).collect();
    (tags.get("ferry.dev/cluster-uid") == Some(&cluster_uid))
        .then(|| tags.get("ferry.dev/service-uid").map(|u| u.to_string()))
        .flatten()
}
