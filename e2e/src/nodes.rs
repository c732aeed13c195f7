//! Simulated nodes: Node objects registered with the control plane (Ready, InternalIP on a
//! loopback address 127.0.1.x) and, for each, a NodePort responder standing in for
//! kube-proxy. For every Service NodePort the responder listens on the node's address; a
//! connection is forwarded to the Service's EndpointSlice endpoints if it has any (the upstream
//! "Services without selectors" pattern), else answered with an identifying echo of node and
//! Service, so a test or a person can see which node served them. A user's own program is
//! reached through an endpoint in 192.0.2.0/24 (which the API accepts, unlike 127.0.0.0/8, and
//! which stands for 127.0.2.x) or through the Service annotation `ferry.dev/sandbox-backend`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The Service annotation naming a local `address:port` its traffic goes to, in place of
/// endpoints: a user's program behind a Service with a selector, with no pods in the sandbox.
pub const BACKEND_ANNOTATION: &str = "ferry.dev/sandbox-backend";

/// How long a proxied or echoed connection may sit idle.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedNode {
    pub name: String,
    pub ip: Ipv4Addr,
    /// A second InternalIP, for a dual-stack node.
    pub ipv6: Option<Ipv6Addr>,
}

/// The i-th simulated node (0-based): `sandbox-node-1` at 127.0.1.1, and so on.
pub fn simulated_node(prefix: &str, i: usize) -> SimulatedNode {
    let n = u8::try_from(i + 1).unwrap_or(u8::MAX);
    SimulatedNode {
        name: format!("{prefix}-{n}"),
        ip: Ipv4Addr::new(127, 0, 1, n),
        ipv6: None,
    }
}

/// Registers `count` Ready nodes (idempotent: server-side apply).
pub async fn register_nodes(
    client: &Client,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<SimulatedNode>> {
    let nodes: Vec<SimulatedNode> = (0..count).map(|i| simulated_node(prefix, i)).collect();
    register(client, &nodes).await?;
    Ok(nodes)
}

/// Registers `nodes` as Ready Node objects with their InternalIP (idempotent).
pub async fn register(client: &Client, nodes: &[SimulatedNode]) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let params = PatchParams::apply("ferry-sandbox").force();
    for node in nodes {
        let obj = Node {
            metadata: ObjectMeta {
                name: Some(node.name.clone()),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_string(), node.name.clone()),
                    ("ferry.dev/simulated".to_string(), "true".to_string()),
                ])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        let mut value = serde_json::to_value(&obj)?;
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("Node");
        api.patch(&node.name, &params, &Patch::Apply(&value))
            .await?;
        let status = NodeStatus {
            addresses: Some(
                std::iter::once(IpAddr::V4(node.ip))
                    .chain(node.ipv6.map(IpAddr::V6))
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    })
                    .chain([NodeAddress {
                        type_: "Hostname".into(),
                        address: node.name.clone(),
                    }])
                    .collect(),
            ),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("SimulatedNodeReady".into()),
                message: Some("simulated by ferry's test substrate".into()),
                last_heartbeat_time: Some(Time(jiff::Timestamp::now())),
                last_transition_time: Some(Time(jiff::Timestamp::now())),
            }]),
            ..NodeStatus::default()
        };
        // A merge patch, not an apply: the API server's apply schema keys addresses by type,
        // so a dual-stack node's two InternalIPs cannot be applied (kubelet patches too).
        api.patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Proto {
    Tcp,
    Udp,
}

/// One NodePort of one Service on one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Binding {
    node: usize,
    proto: Proto,
    node_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    namespace: String,
    service: String,
    port_name: Option<String>,
    port: u16,
    /// From [`BACKEND_ANNOTATION`]: where this Service's traffic goes, endpoints or not.
    backend: Option<SocketAddr>,
}

/// Where a connection for `target` goes: the annotated backend, else a ready endpoint, with
/// a documentation address (192.0.2.N) standing for the local 127.0.2.N.
fn destination(slices: &Store<EndpointSlice>, target: &Target, proto: Proto) -> Option<SocketAddr> {
    target
        .backend
        .or_else(|| endpoint_for(slices, target, proto))
        .map(local_of)
}

/// 192.0.2.N:port (TEST-NET-1, valid in an EndpointSlice) is 127.0.2.N:port on this host;
/// any other address is used as it is.
fn local_of(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => match ip.octets() {
            [192, 0, 2, n] => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 2, n)), addr.port()),
            _ => addr,
        },
        IpAddr::V6(_) => addr,
    }
}

/// The Service's [`BACKEND_ANNOTATION`], if it names an `address:port` (else one warning
/// line, and the Service is served as if it had none).
fn backend_of(svc: &Service) -> Option<SocketAddr> {
    let raw = svc.annotations().get(BACKEND_ANNOTATION)?;
    match raw.trim().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(err) => {
            warn!(service = %svc.name_any(), value = %raw, error = %err, "{BACKEND_ANNOTATION} is not an address:port; ignored");
            None
        }
    }
}

/// Where a connection for `target` goes: a ready endpoint from the Service's EndpointSlices.
fn endpoint_for(
    slices: &Store<EndpointSlice>,
    target: &Target,
    proto: Proto,
) -> Option<SocketAddr> {
    let wanted = match proto {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    };
    for slice in slices.state() {
        if slice.namespace().as_deref() != Some(target.namespace.as_str())
            || slice.labels().get("kubernetes.io/service-name") != Some(&target.service)
        {
            continue;
        }
        let port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == target.port_name.as_deref().unwrap_or_default()
                && p.protocol.as_deref().unwrap_or("TCP") == wanted
        })?;
        let port = u16::try_from(port.port?).ok()?;
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if let (true, Some(addr)) = (ready, endpoint.addresses.first())
                && let Ok(ip) = addr.parse::<IpAddr>()
            {
                return Some(SocketAddr::new(ip, port));
            }
        }
    }
    None
}

fn echo_line(node: &SimulatedNode, target: &Target) -> String {
    format!(
        "node={} service={}/{} port={}\n",
        node.name, target.namespace, target.service, target.port
    )
}

async fn serve_tcp(
    listener: TcpListener,
    node: SimulatedNode,
    target: watch::Receiver<Target>,
    slices: Store<EndpointSlice>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let target = target.borrow().clone();
        let (node, slices) = (node.clone(), slices.clone());
        tokio::spawn(async move {
            if let Some(endpoint) = destination(&slices, &target, Proto::Tcp) {
                match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(endpoint))
                    .await
                {
                    Ok(Ok(mut upstream)) => {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(3600),
                            tokio::io::copy_bidirectional(&mut conn, &mut upstream),
                        )
                        .await;
                    }
                    _ => debug!(%endpoint, "endpoint unreachable"),
                }
                return;
            }
            // No endpoints: answer with who we are. HTTP clients get an HTTP response.
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let body = echo_line(&node, &target);
            let head = &buf[..n];
            let is_http = [
                b"GET ".as_slice(),
                b"POST",
                b"HEAD",
                b"PUT ",
                b"DELE",
                b"OPTI",
                b"PATC",
            ]
            .iter()
            .any(|m| head.starts_with(m));
            let reply = if is_http {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-ferry-node: {}\r\n\r\n{body}",
                    body.len(),
                    node.name
                )
            } else {
                body
            };
            let _ = tokio::time::timeout(IDLE, conn.write_all(reply.as_bytes())).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn serve_udp(
    socket: UdpSocket,
    node: SimulatedNode,
    target: watch::Receiver<Target>,
    slices: Store<EndpointSlice>,
) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let target = target.borrow().clone();
        if let Some(endpoint) = destination(&slices, &target, Proto::Udp) {
            // One request, one reply: enough for DNS-like tests.
            let payload = buf[..n].to_vec();
            let socket = socket.clone();
            tokio::spawn(async move {
                let any = match endpoint {
                    SocketAddr::V4(_) => "127.0.0.1:0",
                    SocketAddr::V6(_) => "[::1]:0",
                };
                let Ok(upstream) = UdpSocket::bind(any).await else {
                    return;
                };
                if upstream.send_to(&payload, endpoint).await.is_err() {
                    return;
                }
                let mut reply = vec![0u8; 65536];
                if let Ok(Ok((m, _))) =
                    tokio::time::timeout(Duration::from_secs(2), upstream.recv_from(&mut reply))
                        .await
                {
                    let _ = socket.send_to(&reply[..m], peer).await;
                }
            });
        } else {
            let _ = socket
                .send_to(echo_line(&node, &target).as_bytes(), peer)
                .await;
        }
    }
}

fn bindings_of(svc: &Service, nodes: &[SimulatedNode]) -> Vec<(Binding, Target)> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let backend = backend_of(svc);
    for port in spec.ports.iter().flatten() {
        let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            _ => continue,
        };
        let target = Target {
            namespace: svc.namespace().unwrap_or_default(),
            service: svc.name_any(),
            port_name: port.name.clone(),
            port: u16::try_from(port.port).unwrap_or_default(),
            backend,
        };
        for node in 0..nodes.len() {
            out.push((
                Binding {
                    node,
                    proto,
                    node_port,
                },
                target.clone(),
            ));
        }
    }
    out
}

/// Serves every Service NodePort on every simulated node until dropped.
pub struct Responders {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Responders {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A NodePort being served, and what it serves (changed in place when only the Service's
/// port or name changes, so the listener is never closed and opened again).
struct Serving {
    target: watch::Sender<Target>,
    task: JoinHandle<()>,
}

/// Listens for `binding` and serves `target` there.
async fn serve(
    binding: &Binding,
    node: SimulatedNode,
    target: watch::Receiver<Target>,
    slices: &Store<EndpointSlice>,
) -> std::io::Result<JoinHandle<()>> {
    let addr = SocketAddr::new(IpAddr::V4(node.ip), binding.node_port);
    Ok(match binding.proto {
        Proto::Tcp => {
            let l = TcpListener::bind(addr).await?;
            tokio::spawn(serve_tcp(l, node, target, slices.clone()))
        }
        Proto::Udp => {
            let s = UdpSocket::bind(addr).await?;
            tokio::spawn(serve_udp(s, node, target, slices.clone()))
        }
    })
}

/// How soon a NodePort that could not be bound is tried again (the listener of a Service
/// just deleted may still be closing; a host process may hold the port for a while).
const REBIND: Duration = Duration::from_millis(250);

/// Serves every Service NodePort on every simulated node, following each Service change as
/// kube-proxy does (port, nodePort, protocol, type, deletion), until dropped.
pub fn start_responders(client: Client, nodes: Vec<SimulatedNode>) -> Responders {
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let slice_watch = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(slice_writer)
    .for_each(|_| async {});
    let (services, svc_writer) = reflector::store::<Service>();
    // Every event, deletions included, is a reason to look again.
    let svc_events = watcher(Api::<Service>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(svc_writer);
    let main = tokio::spawn(async move {
        let mut live: HashMap<Binding, Serving> = HashMap::new();
        let mut unbound = false;
        // Failed binds per NodePort: a passing failure (a listener still closing) is a debug
        // line, a lasting one (about 2 s) one warning.
        let mut failures: HashMap<Binding, u32> = HashMap::new();
        futures::pin_mut!(svc_events);
        loop {
            tokio::select! {
                event = svc_events.next() => match event {
                    Some(Err(err)) => {
                        warn!(error = %err, "watching Services");
                        continue;
                    }
                    Some(Ok(_)) => {}
                    None => return,
                },
                _ = tokio::time::sleep(REBIND), if unbound => {}
            }
            let wanted: HashMap<Binding, Target> = services
                .state()
                .iter()
                .flat_map(|s| bindings_of(s, &nodes))
                .collect();
            failures.retain(|binding, _| wanted.contains_key(binding));
            live.retain(|binding, serving| {
                let keep = wanted.contains_key(binding);
                if !keep {
                    serving.task.abort();
                }
                keep
            });
            unbound = false;
            for (binding, target) in wanted {
                if let Some(serving) = live.get(&binding) {
                    serving.target.send_if_modified(|t| {
                        let changed = *t != target;
                        *t = target.clone();
                        changed
                    });
                    continue;
                }
                let Some(node) = nodes.get(binding.node).cloned() else {
                    continue;
                };
                let addr = SocketAddr::new(IpAddr::V4(node.ip), binding.node_port);
                let (tx, rx) = watch::channel(target.clone());
                match serve(&binding, node, rx, &slices).await {
                    Ok(task) => {
                        info!(%addr, proto = ?binding.proto, service = %format!("{}/{}", target.namespace, target.service), "serving NodePort");
                        failures.remove(&binding);
                        live.insert(binding, Serving { target: tx, task });
                    }
                    Err(err) => {
                        let n = failures.entry(binding).or_default();
                        *n += 1;
                        if *n == 8 {
                            warn!(%addr, error = %err, "cannot listen for a NodePort; still trying");
                        } else {
                            debug!(%addr, error = %err, attempt = *n, "cannot listen for a NodePort yet");
                        }
                        unbound = true;
                    }
                }
            }
        }
    });
    Responders {
        tasks: vec![tokio::spawn(slice_watch), main],
    }
}
