//! A cluster for data-plane tests: three node namespaces and a client on a bridge
//! (`netns::Topology`), the shared real control plane and an operator, one `ferry-forwarder`
//! per node (as a process inside its namespace, under the forwarders' RBAC) and NodePort
//! backends that answer with their node's name and the client address they saw; with the
//! helpers that make a test read as its scenario (a Service and its address, who holds a VIP,
//! a request from the client).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_crds::LoadBalancerPool;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::control_plane::{ControlPlane, shared};
use crate::forwarder::{ForwarderProcess, NodePorts, start_backend};
use crate::netns::{Netns, Topology};
use crate::nodes::register;
use crate::operator::OperatorProcess;
use crate::process::ProcessUnderTest;
use crate::scenario::*;

pub const NODES: [&str; 3] = ["fwd-node-1", "fwd-node-2", "fwd-node-3"];
pub const POOL: &str = "10.213.0.200/29";
pub const WAIT: Duration = Duration::from_secs(30);
/// NodePorts every backend serves (TCP), and UDP ones, and the Local health-check port.
pub const TCP_PORTS: [u16; 5] = [30080, 30081, 30053, 30090, 30091];
pub const UDP_PORTS: [u16; 2] = [30053, 30054];
pub const HEALTH_PORT: u16 = 31999;

pub struct Cluster {
    pub cp: &'static ControlPlane,
    pub admin: Client,
    pub topo: Topology,
    pub _operator: OperatorProcess,
    pub forwarders: Vec<Option<ForwarderProcess>>,
    pub backends: Vec<Option<ProcessUnderTest>>,
    pub svcs: Api<Service>,
    pub namespace: String,
    nodeports: NodePorts,
    forwarder_args: Vec<String>,
}

async fn clean_cluster_state(admin: &Client) {
    // Services a failed run left behind hold the NodePorts the backends serve; no operator
    // runs to release their finalizers, so they go by hand.
    let all: Api<Service> = Api::all(admin.clone());
    if let Ok(list) = all.list(&ListParams::default()).await {
        for svc in list {
            let ports = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default();
            let ours = ports.iter().any(|p| {
                p.node_port.is_some_and(|n| {
                    TCP_PORTS.contains(&(n as u16)) || UDP_PORTS.contains(&(n as u16))
                })
            });
            if !ours {
                continue;
            }
            let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
            let api: Api<Service> = Api::namespaced(admin.clone(), &ns);
            let _ = force_delete(&api, &name, Duration::from_secs(10)).await;
        }
    }
    delete_pools(admin).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for name in NODES {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ferry-system");
    let _ = leases
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("ferry.dev/forwarder-heartbeat"),
        )
        .await;
}

impl Cluster {
    pub async fn start(test: &str, nodeports: NodePorts, forwarder_args: &[&str]) -> Cluster {
        let cp = shared();
        let admin = cp.admin_client().await.unwrap();
        clean_cluster_state(&admin).await;
        let topo = Topology::new(&NODES).expect("creating network namespaces (needs root)");
        register(&admin, &topo.simulated_nodes()).await.unwrap();
        Api::<LoadBalancerPool>::all(admin.clone())
            .create(&PostParams::default(), &pool("fwd", &[POOL]))
            .await
            .unwrap();
        let operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[]).unwrap();
        let backends = topo
            .nodes
            .iter()
            .map(|h| {
                Some(
                    start_backend(
                        &cp.dir,
                        h.ns(),
                        &h.name,
                        &TCP_PORTS,
                        &UDP_PORTS,
                        Some(HEALTH_PORT),
                        nodeports,
                    )
                    .unwrap(),
                )
            })
            .collect();
        let forwarders = topo
            .nodes
            .iter()
            .map(|h| Some(ForwarderProcess::start(cp, h.ns(), &h.name, forwarder_args).unwrap()))
            .collect();
        let namespace = namespace(&admin, test).await.unwrap();
        let svcs = Api::namespaced(admin.clone(), &namespace);
        let c = Cluster {
            cp,
            admin,
            topo,
            _operator: operator,
            forwarders,
            backends,
            svcs,
            namespace,
            nodeports,
            forwarder_args: forwarder_args.iter().map(|s| s.to_string()).collect(),
        };
        c.wait_for_live_forwarders(3).await;
        c
    }

    /// Node `i` fails whole: its forwarder and backend die and it leaves the switch.
    pub fn fail_node(&mut self, i: usize) {
        if let Some(f) = self.forwarders.get_mut(i).and_then(Option::as_mut) {
            f.kill();
        }
        if let Some(b) = self.backends.get_mut(i).and_then(Option::as_mut) {
            b.kill();
        }
        if let Some(slot) = self.forwarders.get_mut(i) {
            *slot = None;
        }
        if let Some(slot) = self.backends.get_mut(i) {
            *slot = None;
        }
        drop(self.topo.unplug(i).expect("unplugging a node"));
    }

    /// Node `i` comes back after `fail_node`: a fresh namespace on its switch port, its
    /// backend and its forwarder.
    pub fn restore_node(&mut self, i: usize) {
        self.topo.replug(i).expect("putting the node back");
        let host = &self.topo.nodes[i];
        self.backends[i] = Some(
            start_backend(
                &self.cp.dir,
                host.ns(),
                &host.name,
                &TCP_PORTS,
                &UDP_PORTS,
                Some(HEALTH_PORT),
                self.nodeports,
            )
            .expect("starting the backend"),
        );
        let args: Vec<&str> = self.forwarder_args.iter().map(String::as_str).collect();
        self.forwarders[i] = Some(
            ForwarderProcess::start(self.cp, host.ns(), &host.name, &args)
                .expect("starting the forwarder"),
        );
    }

    /// Waits until every running forwarder hears every other one directly (membership
    /// settled: losing a node then moves its VIPs in under a second, not at Lease expiry).
    pub async fn wait_for_peers_heard(&self) {
        let running: Vec<&ForwarderProcess> = self.forwarders.iter().flatten().collect();
        let others = running.len().saturating_sub(1) as f64;
        eventually(WAIT, "every forwarder hearing every other", || async {
            running
                .iter()
                .all(|f| f.peers("heard") == Some(others))
                .then_some(())
        })
        .await;
    }

    pub async fn wait_for_live_forwarders(&self, n: usize) {
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), "ferry-system");
        eventually(WAIT, &format!("{n} forwarder heartbeats"), || async {
            let list = leases
                .list(&ListParams::default().labels("ferry.dev/forwarder-heartbeat"))
                .await
                .ok()?;
            (list.items.len() >= n).then_some(())
        })
        .await;
    }

    /// Creates a Service from JSON (`spec` only) and waits for its address.
    pub async fn service(
        &self,
        name: &str,
        spec: serde_json::Value,
        annotations: serde_json::Value,
    ) -> String {
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": name, "annotations": annotations },
            "spec": spec,
        }))
        .unwrap();
        self.svcs
            .create(&PostParams::default(), &svc)
            .await
            .unwrap();
        wait_for_ingress(&self.svcs, name, WAIT).await
    }

    /// A Service with one TCP port, 80, on `node_port`; waits for its address.
    pub async fn http_service(
        &self,
        name: &str,
        node_port: u16,
        annotations: serde_json::Value,
    ) -> String {
        self.service(
            name,
            json!({ "type": "LoadBalancer", "ports": [
                { "name": "http", "port": 80, "nodePort": node_port, "protocol": "TCP" } ] }),
            annotations,
        )
        .await
    }

    pub fn holders(&self, ip: &str) -> Vec<String> {
        self.topo.holders(ip)
    }

    /// Gives every host an IPv6 address and adds the IPv6 pool `fwd6`.
    pub async fn add_ipv6_pool(&self) {
        self.topo.add_ipv6().unwrap();
        Api::<LoadBalancerPool>::all(self.admin.clone())
            .create(
                &PostParams::default(),
                &pool("fwd6", &["fd00:213::200/125"]),
            )
            .await
            .unwrap();
    }

    /// A single-stack IPv6 Service with one TCP port, 80, on `node_port`; waits for its address.
    pub async fn ipv6_http_service(&self, name: &str, node_port: u16) -> String {
        self.service(
            name,
            json!({ "type": "LoadBalancer", "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack",
                    "ports": [ { "name": "http", "port": 80, "nodePort": node_port, "protocol": "TCP" } ] }),
            json!({}),
        )
        .await
    }

    /// Waits until exactly one node holds `ip` (no ARP check: IPv6 has none); returns it.
    pub async fn wait_for_one_holder(&self, ip: &str) -> String {
        eventually(WAIT, &format!("one node holding {ip}"), || async {
            let h = self.holders(ip);
            (h.len() == 1).then(|| h[0].clone())
        })
        .await
    }

    /// Waits until exactly one node holds `ip` and it alone answers ARP for it (checked
    /// twice, so a handover in flight does not count); returns that node.
    pub async fn wait_for_single_owner(&self, ip: &str) -> String {
        eventually(
            WAIT,
            &format!("one node holding {ip} and answering ARP"),
            || async {
                let h = self.holders(ip);
                if h.len() != 1 {
                    return None;
                }
                let arp = self.topo.arp_owners(ip).ok()?;
                (arp == h && self.holders(ip) == h).then(|| h[0].clone())
            },
        )
        .await
    }

    pub fn node_index(&self, name: &str) -> usize {
        NODES.iter().position(|n| *n == name).unwrap()
    }

    /// `GET path` from the client; the body (`<node> <client address seen>`).
    pub fn get(&self, ip: &str, port: u16, path: &str) -> anyhow::Result<String> {
        get_in(self.topo.client.ns(), ip, port, path)
    }

    /// `GET /` from the client's address `source` (one it has); the body.
    pub fn get_from(&self, source: &str, ip: &str, port: u16) -> anyhow::Result<String> {
        self.topo.client.ns().exec(
            "curl",
            &[
                "-sf",
                "--max-time",
                "3",
                "--interface",
                source,
                &format!("http://{ip}:{port}/"),
            ],
        )
    }

    /// Waits until `GET /` through `ip:port` answers.
    pub async fn wait_for_traffic(&self, ip: &str, port: u16) -> String {
        eventually(WAIT, &format!("traffic through {ip}:{port}"), || async {
            self.get(ip, port, "/").ok()
        })
        .await
    }

    /// One UDP exchange from the client; the reply.
    pub fn udp(&self, ip: &str, port: u16) -> anyhow::Result<String> {
        let target: SocketAddr = format!("{ip}:{port}").parse()?;
        self.topo.client.ns().enter(move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(b"ping", target)?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
    }

    /// The nodes that answered `n` requests.
    pub fn spread(&self, ip: &str, port: u16, n: usize) -> BTreeSet<String> {
        spread_in(self.topo.client.ns(), ip, port, n)
    }

    /// The nodes that answered `n` requests sent from the node `node` itself (a process in
    /// its network namespace, as a pod on the host network is).
    pub fn spread_from_node(&self, node: &str, ip: &str, port: u16, n: usize) -> BTreeSet<String> {
        spread_in(self.topo.nodes[self.node_index(node)].ns(), ip, port, n)
    }

    pub async fn endpoints_on(&self, service: &str, node: &str) {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {
                "name": format!("{service}-1"),
                "labels": { "kubernetes.io/service-name": service },
            },
            "addressType": "IPv4",
            "endpoints": [{ "addresses": ["10.244.9.9"], "nodeName": node, "conditions": { "ready": true } }],
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        }))
        .unwrap();
        Api::<EndpointSlice>::namespaced(self.admin.clone(), &self.namespace)
            .create(&PostParams::default(), &slice)
            .await
            .unwrap();
    }

    pub fn forwarder(&self, node: &str) -> &ForwarderProcess {
        self.forwarders[self.node_index(node)].as_ref().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first (they hold the namespaces), then the namespaces with the topology.
        for f in self.forwarders.iter_mut().flatten() {
            f.kill();
        }
        for b in self.backends.iter_mut().flatten() {
            b.kill();
        }
        let _ = self.cp;
    }
}

/// `GET path` from a process in `ns`; the body.
fn get_in(ns: &Netns, ip: &str, port: u16, path: &str) -> anyhow::Result<String> {
    ns.exec(
        "curl",
        &[
            "-sf",
            "--max-time",
            "3",
            &format!("http://{ip}:{port}{path}"),
        ],
    )
}

/// The nodes that answered `n` requests sent from `ns`.
fn spread_in(ns: &Netns, ip: &str, port: u16, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| get_in(ns, ip, port, "/").ok())
        .filter_map(|body| body.split_whitespace().next().map(str::to_string))
        .collect()
}

pub fn body_node(body: &str) -> String {
    body.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

pub fn body_client(body: &str) -> String {
    body.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// One HTTP request from the calling thread (inside the client's namespace): whether an
/// answer came within two seconds.
pub fn answered(target: SocketAddr) -> bool {
    answered_within(target, Duration::from_secs(2))
}

/// One HTTP request as `answered`, connecting and answered each within `timeout`. A timeout
/// under a second probes without waiting for TCP's first SYN retransmission (one second), so
/// a series of them sees an address answer again to within the pause between them.
pub fn answered_within(target: SocketAddr, timeout: Duration) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
        // The answer's head is enough; the backend keeps the connection open.
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        Ok(got.starts_with(b"HTTP/1.1 200"))
    };
    attempt().unwrap_or(false)
}

/// Requests to each of `targets` every 100 ms from the client until `stop`; counts
/// (requests, failures).
pub struct SteadyClient {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl SteadyClient {
    pub fn start(c: &Cluster, targets: Vec<SocketAddr>) -> SteadyClient {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, n, f) = (stop.clone(), sent.clone(), failed.clone());
        let thread = c
            .topo
            .client
            .ns()
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    for t in &targets {
                        n.fetch_add(1, Ordering::Relaxed);
                        if !answered(*t) {
                            f.fetch_add(1, Ordering::Relaxed);
                            eprintln!("request to {t} failed");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            })
            .unwrap();
        SteadyClient {
            stop,
            sent,
            failed,
            thread: Some(thread),
        }
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts()
    }
}
