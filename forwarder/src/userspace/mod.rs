//! The userspace data plane: a tokio listener per VIP port, relaying TCP connections and UDP
//! flows to the backends the plan names. Used where the node cannot be programmed with
//! nftables, and in the sandbox (where announcing a loopback VIP is binding it).
//!
//! Threads: per core a TCP `engine` with a thread of its own, and a current-thread tokio
//! runtime for UDP (`Workers`). Every TCP frontend has a listener per engine, bound with
//! SO_REUSEPORT, so the kernel spreads new connections over the engines and each connection
//! lives its whole life on one thread — no work stealing and no cross-thread wake-ups on the hot path, the way
//! HAProxy and nginx run their threads. Where there is an engine per CPU, each is pinned to
//! its CPU and takes the connections that CPU received (`affinity`). A TCP connection is a state machine in its engine's
//! slab (`relay`), driven by edge-triggered epoll, not a task: on 2026-12-04 a task per
//! connection cost 12.8 µs of user time per new connection that a bare epoll loop does not
//! spend (docs/results.md, "The floor proxy").
//!
//! Bounded everywhere: a connection limit shared by all frontends (at the limit each listener
//! holds one client waiting for the next free place and the kernel's backlog the rest),
//! connect, idle and half-close timeouts (from each engine's sweep), and a UDP flow table per
//! frontend with idle expiry. Changing a frontend's backends keeps its listener and its
//! connections; removing a frontend closes its listener and its connections.

pub mod affinity;
mod engine;
mod epoll;
mod fairness;
pub mod relay;
mod splice;
mod udp;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_model::Protocol;
use socket2::{Domain, Socket, Type};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::balance::Balancer;
use crate::metrics::{DataplaneMetrics, ServiceMetrics};
use crate::plan::Frontend;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub timeouts: relay::Timeouts,
    /// TCP connections relayed at once, over all frontends.
    pub max_connections: usize,
    /// UDP flows per frontend.
    pub udp_max_flows: usize,
    pub udp_idle_timeout: Duration,
    /// Pin each TCP engine to a CPU of its own when there is one per CPU (`affinity`).
    pub pin_threads: bool,
}

/// What a frontend's tasks read; replaced as a whole when the plan changes.
pub(crate) struct Shared {
    frontend: RwLock<Arc<Frontend>>,
    balancer: Balancer,
    stop: watch::Receiver<bool>,
    metrics: ServiceMetrics,
    limits: Limits,
    /// The Service's share of the node's connection limit.
    share: fairness::Share,
}

impl Shared {
    fn frontend(&self) -> Arc<Frontend> {
        self.frontend
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct Listener {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// A UDP frontend's task.
    tasks: Vec<JoinHandle<()>>,
    /// A TCP frontend's listeners: their id in each engine.
    engines: Vec<(u64, Arc<engine::Handle>)>,
    /// Gives the Service's share back when the listener goes.
    _share: ShareGuard,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
        for (id, engine) in &self.engines {
            let _ = engine.send(engine::Command::Stop(*id));
        }
    }
}

/// The data plane's threads, per core a current-thread runtime (for UDP) and a TCP engine,
/// until dropped.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    engines: Vec<Arc<engine::Handle>>,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    fn start(
        limit: &Arc<Semaphore>,
        limits: Limits,
        metrics: &Arc<DataplaneMetrics>,
    ) -> io::Result<Self> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpus = affinity::placement(&affinity::allowed_cpus(), n, limits.pin_threads);
        let (mut handles, mut engines, mut stops) = (Vec::new(), Vec::new(), Vec::new());
        for (i, cpu) in cpus.into_iter().enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            engines.push(Arc::new(engine::Handle::start(
                i,
                cpu,
                metrics,
                limit.clone(),
                limits.connect_timeout,
                limits.timeouts,
            )?));
            handles.push(rt.handle().clone());
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop_tx);
            std::thread::Builder::new()
                .name(format!("ferry-dataplane-{i}"))
                .spawn(move || {
                    let _ = rt.block_on(stop_rx);
                })?;
        }
        Ok(Self {
            handles,
            engines,
            _stop: stops,
        })
    }
}

/// Leaves the Service's share when its listener is dropped.
struct ShareGuard(fairness::Share);

impl Drop for ShareGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

pub struct Userspace {
    limits: Limits,
    connections: Arc<Semaphore>,
    fairness: Arc<fairness::Fairness>,
    metrics: Arc<DataplaneMetrics>,
    listeners: HashMap<(IpAddr, u16, Protocol), Listener>,
    /// Started with the first frontend: a kernel-mode node may never need them.
    workers: Option<Workers>,
    /// The last id given to a TCP listener in the engines.
    listener_ids: u64,
}

/// A socket bound to `addr` even before the address is on an interface (IP_FREEBIND), so a
/// listener can be ready the moment the VIP arrives.
fn bind_socket(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Whether `frontend`'s listener could bind now (checked with a socket that is closed at
/// once): how a node that could not serve a VIP finds out it can again.
pub fn probe(frontend: &Frontend) -> io::Result<()> {
    let addr = SocketAddr::new(frontend.vip, frontend.port);
    let ty = match frontend.protocol {
        Protocol::Udp => Type::DGRAM,
        _ => Type::STREAM,
    };
    let socket = bind_socket(addr, ty)?;
    if frontend.protocol != Protocol::Udp {
        // A listening socket is what collides with another listener on the port.
        socket.listen(1)?;
    }
    Ok(())
}

/// Bytes a UDP frontend's socket may queue: one socket takes every client's datagrams, and a
/// burst of new flows must not be dropped by the kernel while flows are being opened.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Asks for `UDP_RECEIVE_BUFFER`, past `net.core.rmem_max` where the process may
/// (SO_RCVBUFFORCE needs CAP_NET_ADMIN, which a forwarder announcing VIPs has).
fn enlarge_receive_buffer(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let size = UDP_RECEIVE_BUFFER as libc::c_int;
    // SAFETY: setsockopt with a c_int that lives for the call.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    }
}

impl Userspace {
    pub fn new(limits: Limits, metrics: Arc<DataplaneMetrics>) -> Self {
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        Self {
            limits,
            connections: connections.clone(),
            fairness: fairness::Fairness::new(limits.max_connections, connections),
            metrics,
            listeners: HashMap::new(),
            workers: None,
            listener_ids: 0,
        }
    }

    /// Makes the listeners match `frontends`; returns the frontends that could not be bound.
    pub fn apply(&mut self, frontends: &[Frontend]) -> Vec<(Frontend, io::Error)> {
        let wanted: HashMap<_, _> = frontends.iter().map(|f| (f.key(), f)).collect();
        self.listeners.retain(|key, _| {
            let keep = wanted.contains_key(key);
            if !keep {
                info!(vip = %key.0, port = key.1, protocol = %key.2, "stopped forwarding");
            }
            keep
        });
        let mut failed = Vec::new();
        for (key, frontend) in wanted {
            if let Some(listener) = self.listeners.get(&key) {
                let current = listener.shared.frontend();
                // Affinity lives in the balancer and metrics are per Service: a changed
                // timeout or a port handed to another Service needs a new listener.
                if current.affinity == frontend.affinity && current.service == frontend.service {
                    if *current != *frontend {
                        *listener
                            .shared
                            .frontend
                            .write()
                            .unwrap_or_else(|e| e.into_inner()) = Arc::new(frontend.clone());
                    }
                    continue;
                }
                self.listeners.remove(&key);
            }
            match self.start(frontend) {
                Ok(listener) => {
                    info!(service = %frontend.service, vip = %frontend.vip, port = frontend.port,
                          protocol = %frontend.protocol, backends = frontend.backends.len(),
                          "forwarding");
                    self.listeners.insert(key, listener);
                }
                Err(err) => failed.push((frontend.clone(), err)),
            }
        }
        failed
    }

    fn start(&mut self, frontend: &Frontend) -> io::Result<Listener> {
        if self.workers.is_none() {
            self.workers = Some(Workers::start(
                &self.connections,
                self.limits,
                &self.metrics,
            )?);
        }
        let (workers, engines) = match &self.workers {
            Some(w) => (w.handles.clone(), w.engines.clone()),
            None => return Err(io::Error::other("no data-plane workers")),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let share = self.fairness.join(&frontend.service);
        let shared = Arc::new(Shared {
            frontend: RwLock::new(Arc::new(frontend.clone())),
            balancer: Balancer::new(frontend.affinity),
            stop: stop_rx,
            metrics: self.metrics.service(&frontend.service),
            limits: self.limits,
            share: share.clone(),
        });
        let share = ShareGuard(share);
        let addr = SocketAddr::new(frontend.vip, frontend.port);
        let (tasks, engines) = match frontend.protocol {
            Protocol::Tcp => {
                // Bind them all first, so a taken port fails the whole frontend now.
                let mut sockets = Vec::new();
                for engine in &engines {
                    let socket = bind_socket(addr, Type::STREAM)?;
                    // Accepted connections inherit it: no setsockopt per client.
                    socket.set_tcp_nodelay(true)?;
                    if let Some(cpu) = engine.cpu()
                        && let Err(err) = affinity::prefer_cpu(&socket, cpu)
                    {
                        warn!(cpu, error = %err, "cannot steer a CPU's connections to its thread");
                    }
                    socket.listen(4096)?;
                    sockets.push(std::net::TcpListener::from(socket));
                }
                let mut started: Vec<(u64, Arc<engine::Handle>)> = Vec::new();
                for (socket, engine) in sockets.into_iter().zip(engines) {
                    self.listener_ids += 1;
                    let id = self.listener_ids;
                    let shared = shared.clone();
                    if let Err(err) = engine.send(engine::Command::Listen { id, socket, shared }) {
                        // None or all: the engines that took theirs let them go.
                        for (id, engine) in &started {
                            let _ = engine.send(engine::Command::Stop(*id));
                        }
                        return Err(err);
                    }
                    started.push((id, engine));
                }
                (Vec::new(), started)
            }
            Protocol::Udp => {
                let socket = bind_socket(addr, Type::DGRAM)?;
                enlarge_receive_buffer(&socket);
                let socket: std::net::UdpSocket = socket.into();
                // One socket: a flow's replies must leave from where it arrived.
                let worker = &workers[usize::from(frontend.port) % workers.len()];
                let shared = shared.clone();
                let task = worker.spawn(async move {
                    match tokio::net::UdpSocket::from_std(socket) {
                        Ok(socket) => udp::serve(socket, shared).await,
                        Err(err) => warn!(error = %err, "cannot register a UDP socket"),
                    }
                });
                (vec![task], Vec::new())
            }
            Protocol::Sctp => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "SCTP is not forwarded",
                ));
            }
        };
        Ok(Listener {
            shared,
            stop: stop_tx,
            tasks,
            engines,
            _share: share,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::HealthCheck;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(2),
            timeouts: relay::Timeouts {
                idle: Duration::from_secs(60),
                half_close: Duration::from_secs(60),
            },
            max_connections: 100,
            udp_max_flows: 100,
            udp_idle_timeout: Duration::from_secs(30),
            pin_threads: true,
        }
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn frontend(port: u16, backend: SocketAddr) -> Frontend {
        Frontend {
            service: "default/web".into(),
            vip: "127.0.0.1".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            backends: vec![backend],
            health: HealthCheck::Connect,
            affinity: None,
            proxy_protocol: false,
            source_ranges: vec![],
            local: false,
        }
    }

    /// Opens `n` connections to `port` from a thread pinned to `cpu` and waits until the
    /// backend has them all.
    fn connect_from(cpu: usize, port: u16, n: usize, backend: &std::net::TcpListener) {
        let clients = std::thread::spawn(move || {
            affinity::pin(cpu).unwrap();
            (0..n)
                .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        // Relayed, each reaches the backend; if relaying broke, fail rather than hang.
        backend.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut accepted = 0;
        while accepted < clients.len() {
            match backend.accept() {
                Ok(_) => accepted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the backend got {accepted} of {} connections",
                        clients.len()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accepting a relayed connection: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn each_cpu_hands_its_connections_to_the_thread_pinned_on_it() {
        let allowed = affinity::allowed_cpus();
        let engines = std::thread::available_parallelism().map_or(1, |n| n.get());
        if allowed.len() != engines {
            eprintln!("a CPU quota here: {engines} threads for {allowed:?}, none pinned");
            return;
        }
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let metrics = Arc::new(DataplaneMetrics::default());
        let mut userspace = Userspace::new(limits(), metrics.clone());
        let port = free_port();
        let f = frontend(port, backend.local_addr().unwrap());
        assert!(userspace.apply(std::slice::from_ref(&f)).is_empty());
        for (i, cpu) in allowed.iter().enumerate() {
            connect_from(*cpu, port, 10 + i, &backend);
        }
        // Each thread runs on its CPU and took that CPU's connections, and only those.
        for (i, cpu) in allowed.iter().enumerate() {
            assert_eq!(
                metrics.engine(i, Some(*cpu)).get(),
                10 + i as u64,
                "CPU {cpu}"
            );
        }
        let threads = std::fs::read_dir("/proc/self/task").unwrap();
        let pinned: Vec<String> = threads
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let name = std::fs::read_to_string(dir.join("comm")).ok()?;
                let status = std::fs::read_to_string(dir.join("status")).ok()?;
                let cpus = status
                    .lines()
                    .find(|l| l.starts_with("Cpus_allowed_list"))?;
                let cpus = cpus.split_whitespace().last()?;
                name.starts_with("ferry-tcp-")
                    .then(|| format!("{} {cpus}", name.trim()))
            })
            .collect();
        for (i, cpu) in allowed.iter().enumerate() {
            assert!(
                pinned.contains(&format!("ferry-tcp-{i} {cpu}")),
                "{pinned:?}"
            );
        }
    }

    #[tokio::test]
    async fn unpinned_threads_share_the_connections_as_the_kernel_spreads_them() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let metrics = Arc::new(DataplaneMetrics::default());
        let mut limits = limits();
        limits.pin_threads = false;
        let mut userspace = Userspace::new(limits, metrics.clone());
        let port = free_port();
        let f = frontend(port, backend.local_addr().unwrap());
        assert!(userspace.apply(std::slice::from_ref(&f)).is_empty());
        let cpu = affinity::allowed_cpus().first().copied().unwrap_or(0);
        connect_from(cpu, port, 20, &backend);
        let engines = std::thread::available_parallelism().map_or(1, |n| n.get());
        let accepted: u64 = (0..engines).map(|i| metrics.engine(i, None).get()).sum();
        assert_eq!(accepted, 20);
    }

    #[tokio::test]
    async fn at_the_connection_limit_an_idle_connection_gives_its_place_up() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free_port();
        let mut limits = limits();
        limits.max_connections = 1;
        limits.timeouts.idle = Duration::from_millis(400);
        let mut userspace = Userspace::new(limits, Arc::new(DataplaneMetrics::default()));
        let f = frontend(port, backend.local_addr().unwrap());
        assert!(userspace.apply(std::slice::from_ref(&f)).is_empty());

        let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _first = backend.accept().await.unwrap();
        // The second client waits in the backlog: the only place is taken.
        let _waiting = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), backend.accept())
                .await
                .is_err(),
            "relayed past the limit"
        );
        // Once the first has been quiet for the idle timeout it is closed, and the second
        // gets its place.
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf))
            .await
            .expect("the idle connection is closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        tokio::time::timeout(Duration::from_secs(3), backend.accept())
            .await
            .expect("the waiting client is relayed")
            .unwrap();
    }

    #[tokio::test]
    async fn a_flood_on_one_service_leaves_places_for_another() {
        let flooded_backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let quiet_backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut limits = limits();
        limits.max_connections = 8;
        let mut userspace = Userspace::new(limits, Arc::new(DataplaneMetrics::default()));
        let (flooded_port, quiet_port) = (free_port(), free_port());
        let mut flooded = frontend(flooded_port, flooded_backend.local_addr().unwrap());
        flooded.service = "default/flooded".into();
        let mut quiet = frontend(quiet_port, quiet_backend.local_addr().unwrap());
        quiet.service = "default/quiet".into();
        assert!(userspace.apply(&[flooded, quiet]).is_empty());
        // A slowloris: twenty connections held open, never a byte.
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(
                tokio::net::TcpStream::connect(("127.0.0.1", flooded_port))
                    .await
                    .unwrap(),
            );
        }
        let mut relayed = Vec::new();
        while let Ok(Ok((s, _))) =
            tokio::time::timeout(Duration::from_millis(300), flooded_backend.accept()).await
        {
            relayed.push(s);
        }
        assert_eq!(
            relayed.len(),
            6,
            "the flooded Service stops at three quarters"
        );
        // The other Service is still served.
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", quiet_port))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(3), quiet_backend.accept())
            .await
            .expect("the quiet Service gets a place")
            .unwrap();
    }

    #[tokio::test]
    async fn removing_a_frontend_closes_its_open_connections() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free_port();
        let frontend = Frontend {
            service: "default/web".into(),
            vip: "127.0.0.1".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            backends: vec![backend.local_addr().unwrap()],
            health: HealthCheck::Connect,
            affinity: None,
            proxy_protocol: false,
            source_ranges: vec![],
            local: false,
        };
        let mut userspace = Userspace::new(limits(), Arc::new(DataplaneMetrics::default()));
        assert!(userspace.apply(std::slice::from_ref(&frontend)).is_empty());
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut served, _) = backend.accept().await.unwrap();
        client.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        served.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");

        assert!(userspace.apply(&[]).is_empty());
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
            .await
            .expect("the relayed connection is closed with its frontend");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The listener's tasks end on their workers' runtimes, a moment after the apply.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "the listener is gone"
        );
    }

    /// A data plane forwarding `port` on loopback to `backends`.
    fn serving(
        port: u16,
        backends: Vec<SocketAddr>,
        limits: Limits,
    ) -> (Userspace, crate::metrics::Metrics) {
        let metrics = crate::metrics::Metrics::new();
        let mut userspace = Userspace::new(limits, metrics.dataplane.clone());
        let mut f = frontend(port, backends[0]);
        f.backends = backends;
        assert!(userspace.apply(std::slice::from_ref(&f)).is_empty());
        (userspace, metrics)
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// Asserts that `metrics` expose `series` for the test Service at `value`.
    fn assert_counted(metrics: &crate::metrics::Metrics, series: &str, value: u64, why: &str) {
        let text = metrics.encode();
        let line = format!("{series}{{namespace=\"default\",service=\"web\"}} {value}");
        assert!(text.contains(&line), "{why}: {text}");
    }

    /// The backend answers in three parts with pauses between, then closes; the client must
    /// get the whole answer and the end.
    async fn answer_in_parts(
        mut server: tokio::net::TcpStream,
        client: &mut tokio::net::TcpStream,
    ) {
        for part in [&b"one "[..], b"two ", b"three"] {
            server.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(server);
        let mut answer = Vec::new();
        tokio::time::timeout(SECOND, client.read_to_end(&mut answer))
            .await
            .expect("the answer ends with the backend's end")
            .unwrap();
        assert_eq!(answer, b"one two three");
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_each_end_passes_through() {
        // Pinned threads copy bulk transfers through their buffer.
        relays_both_ways(limits()).await;
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_through_splice_on_unpinned_threads() {
        let mut limits = limits();
        limits.pin_threads = false;
        relays_both_ways(limits).await;
    }

    async fn relays_both_ways(limits: Limits) {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free_port();
        let (_userspace, metrics) = serving(port, vec![backend.local_addr().unwrap()], limits);
        for _ in 0..3 {
            let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let (mut server, _) = tokio::time::timeout(SECOND, backend.accept())
                .await
                .unwrap()
                .unwrap();
            // More than one read's worth each way: the bulk path as well.
            let request: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
            client.write_all(&request).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert!(got == request, "the request arrives whole and in order");
            // The backend answers after the client's half-close, then closes.
            let answer: Vec<u8> = (0..(3 << 20)).map(|i| (i % 253) as u8).collect();
            let sent = answer.clone();
            let answering = tokio::spawn(async move {
                server.write_all(&sent).await.unwrap();
            });
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back))
                .await
                .expect("the backend's end reaches the client")
                .unwrap();
            assert!(back == answer, "the answer arrives whole and in order");
            answering.await.unwrap();
        }
        assert_counted(
            &metrics,
            "ferry_forwarder_connections_total",
            3,
            "every connection",
        );
    }

    #[tokio::test]
    async fn what_a_client_sent_before_the_connect_reaches_the_backend_first_and_whole() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free_port();
        let (_userspace, _) = serving(port, vec![backend.local_addr().unwrap()], limits());
        // Sent before the forwarder can have accepted: in its hands at connect time, more
        // than it reads ahead.
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request: Vec<u8> = (0..10_000).map(|i| (i % 251) as u8).collect();
        client.write_all(&request).await.unwrap();
        let (mut server, _) = tokio::time::timeout(SECOND, backend.accept())
            .await
            .unwrap()
            .unwrap();
        let mut got = vec![0u8; request.len()];
        tokio::time::timeout(SECOND, server.read_exact(&mut got))
            .await
            .expect("the request reaches the backend")
            .unwrap();
        assert!(got == request);
        // And the answer comes back on the same connection.
        server.write_all(b"answer").await.unwrap();
        let mut answer = [0u8; 6];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
    }

    #[tokio::test]
    async fn a_refused_backend_is_skipped_and_counted() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A port just freed: nothing listens there.
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let port = free_port();
        let (_userspace, metrics) =
            serving(port, vec![refused, backend.local_addr().unwrap()], limits());
        for i in 0..4u8 {
            let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            client.write_all(&[i]).await.unwrap();
            let (mut server, _) = tokio::time::timeout(SECOND, backend.accept())
                .await
                .expect("every connection reaches the backend that answers")
                .unwrap();
            let mut got = [0u8; 1];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i]);
            // The answer, in parts, reaches the client whole: the refused try's end (its
            // socket was closed both ways) does not stick to the backend that answered.
            answer_in_parts(server, &mut client).await;
        }
        assert_counted(
            &metrics,
            "ferry_forwarder_backend_connect_failures_total",
            4,
            "round robin turns on every pick, so each connection tried the refused one first",
        );
    }

    #[tokio::test]
    async fn a_backend_that_does_not_answer_is_left_after_the_connect_timeout() {
        // A listener whose queue is full and never accepted from: SYNs to it go unanswered.
        let silent = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        silent
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        silent.listen(0).unwrap();
        let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(s) =
                std::net::TcpStream::connect_timeout(&silent_addr, Duration::from_millis(100))
            {
                fillers.push(s);
            }
        }
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free_port();
        let mut limits = limits();
        limits.connect_timeout = Duration::from_millis(300);
        let (_userspace, metrics) = serving(
            port,
            vec![silent_addr, backend.local_addr().unwrap()],
            limits,
        );
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        client.write_all(b"ping").await.unwrap();
        let started = std::time::Instant::now();
        let (mut server, _) = tokio::time::timeout(Duration::from_secs(3), backend.accept())
            .await
            .expect("the next backend gets the connection")
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // The whole answer, in parts, reaches the client: nothing of the first try sticks.
        answer_in_parts(server, &mut client).await;
        assert_counted(
            &metrics,
            "ferry_forwarder_backend_connect_failures_total",
            1,
            "the silent backend",
        );
    }

    #[tokio::test]
    async fn with_no_backend_reachable_the_client_is_closed() {
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let port = free_port();
        let (_userspace, _) = serving(port, vec![refused], limits());
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(SECOND, client.read(&mut buf))
            .await
            .expect("the client is not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn quiet_connections_time_out_and_busy_ones_do_not() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free_port();
        let mut limits = limits();
        limits.timeouts = relay::Timeouts {
            idle: Duration::from_millis(600),
            half_close: Duration::from_millis(300),
        };
        let (_userspace, metrics) = serving(port, vec![backend.local_addr().unwrap()], limits);
        let connect = || async {
            let client = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let (server, _) = backend.accept().await.unwrap();
            (client, server)
        };
        let (mut idle, _idle_server) = connect().await;
        let (mut half, _half_server) = connect().await;
        let (mut busy, mut busy_server) = connect().await;
        half.shutdown().await.unwrap();
        let started = std::time::Instant::now();
        // The busy one talks every 100 ms for 1.2 s, twice the idle timeout.
        let mut buf = [0u8; 1];
        while started.elapsed() < Duration::from_millis(1200) {
            busy.write_all(b"x").await.unwrap();
            busy_server.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (what, stream) in [("idle", &mut idle), ("half-closed", &mut half)] {
            let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("the {what} connection is closed"));
            assert!(matches!(read, Ok(0) | Err(_)), "{what}: {read:?}");
        }
        busy.write_all(b"y").await.unwrap();
        busy_server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"y", "the busy connection is still relayed");
        assert_counted(
            &metrics,
            "ferry_forwarder_timeouts_total",
            2,
            "idle and half-closed",
        );
    }

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let socket = bind_socket("127.0.0.1:0".parse().unwrap(), Type::STREAM).unwrap();
        socket.set_tcp_nodelay(true).unwrap();
        socket.listen(16).unwrap();
        let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
