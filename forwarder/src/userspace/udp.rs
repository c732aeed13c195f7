//! One UDP frontend. Each client address is a flow with its own socket connected to the
//! chosen backend, so replies find their way back; replies leave from the VIP's socket. The
//! flow table is bounded: at the limit a new flow takes the place of the most idle of the
//! oldest few (a flood of new sources cannot lock real clients out, and each eviction costs a
//! constant amount of work: up to eight flows looked at from the front of a queue in creation
//! order, the others sent to the back), counted as evicted. A flow quiet for the idle timeout
//! is removed. A backend answering with ICMP port unreachable ends the flow, so the client's
//! next datagram picks another backend.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tracing::debug;

use super::Shared;

const MAX_DATAGRAM: usize = 65_535;

/// When a flow last moved a datagram, for its idle timeout.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Resolves once nothing has moved for `limit`: one timer per idle period, not per read.
async fn quiet_for(activity: &Activity, limit: Duration) {
    loop {
        let wait = limit.saturating_sub(activity.quiet_for());
        if wait.is_zero() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

struct Flow {
    upstream: UdpSocket,
    activity: Activity,
    /// Told when the flow is evicted: its reply task ends and its socket closes.
    evicted: tokio::sync::Notify,
}

/// Flows looked at per eviction.
const EVICTION_SAMPLE: usize = 8;

#[derive(Default)]
struct Table {
    flows: HashMap<SocketAddr, Arc<Flow>>,
    /// Clients in creation order (with flows that are gone skipped when met).
    order: VecDeque<SocketAddr>,
}

impl Table {
    fn get(&self, client: &SocketAddr) -> Option<Arc<Flow>> {
        self.flows.get(client).cloned()
    }

    fn len(&self) -> usize {
        self.flows.len()
    }

    fn insert(&mut self, client: SocketAddr, flow: Arc<Flow>) {
        self.flows.insert(client, flow);
        self.order.push_back(client);
        if self.order.len() > 2 * self.flows.len().max(EVICTION_SAMPLE) {
            let flows = &self.flows;
            self.order.retain(|c| flows.contains_key(c));
        }
    }

    fn remove(&mut self, client: &SocketAddr, flow: &Arc<Flow>) {
        if self.flows.get(client).is_some_and(|f| Arc::ptr_eq(f, flow)) {
            self.flows.remove(client);
        }
    }

    /// Removes the most idle of the oldest few flows, to make room.
    fn evict(&mut self) -> Option<Arc<Flow>> {
        let mut sample = Vec::with_capacity(EVICTION_SAMPLE);
        while sample.len() < EVICTION_SAMPLE {
            let Some(client) = self.order.pop_front() else {
                break;
            };
            if self.flows.contains_key(&client) {
                sample.push(client);
            }
        }
        let victim = sample
            .iter()
            .copied()
            .max_by_key(|c| self.flows.get(c).map(|f| f.activity.quiet_for()))?;
        // The others get another round at the back.
        self.order
            .extend(sample.into_iter().filter(|c| *c != victim));
        self.flows.remove(&victim)
    }
}

type Flows = Arc<Mutex<Table>>;

fn lock(flows: &Flows) -> std::sync::MutexGuard<'_, Table> {
    flows.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) async fn serve(socket: UdpSocket, shared: Arc<Shared>) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    let mut stop = shared.stop.clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = crate::stopped(&mut stop) => return,
        };
        let (n, client) = match received {
            Ok(r) => r,
            Err(err) => {
                debug!(error = %err, "receiving on a UDP frontend");
                continue;
            }
        };
        let frontend = shared.frontend();
        if !frontend.admits(&client.ip()) {
            shared.metrics.refused();
            continue;
        }
        let existing = lock(&flows).get(&client);
        let flow = match existing {
            Some(flow) => flow,
            None => {
                if lock(&flows).len() >= shared.limits.udp_max_flows {
                    let evicted = lock(&flows).evict();
                    if let Some(old) = evicted {
                        old.evicted.notify_one();
                        shared.metrics.udp_flow_evicted();
                    }
                }
                let Some(backend) =
                    shared
                        .balancer
                        .pick(client.ip(), &frontend.backends, &[], Instant::now())
                else {
                    continue;
                };
                let flow = match open_flow(backend).await {
                    Ok(flow) => Arc::new(flow),
                    Err(err) => {
                        debug!(%backend, error = %err, "cannot open a UDP flow");
                        continue;
                    }
                };
                lock(&flows).insert(client, flow.clone());
                shared.metrics.udp_flows_changed(1);
                tokio::spawn(replies(
                    flow.clone(),
                    socket.clone(),
                    client,
                    flows.clone(),
                    shared.clone(),
                ));
                flow
            }
        };
        flow.activity.touch();
        if let Err(err) = flow.upstream.send(&buf[..n]).await {
            debug!(%client, error = %err, "forwarding a datagram");
        }
    }
}

async fn open_flow(backend: SocketAddr) -> io::Result<Flow> {
    let local: IpAddr = match backend {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let upstream = UdpSocket::bind(SocketAddr::new(local, 0)).await?;
    upstream.connect(backend).await?;
    Ok(Flow {
        upstream,
        activity: Activity::new(),
        evicted: tokio::sync::Notify::new(),
    })
}

/// Carries the backend's replies to `client` until the flow is idle or fails, then removes it.
async fn replies(
    flow: Arc<Flow>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Flows,
    shared: Arc<Shared>,
) {
    let idle = shared.limits.udp_idle_timeout;
    let mut stop = shared.stop.clone();
    loop {
        let ready = tokio::select! {
            r = flow.upstream.readable() => r,
            _ = quiet_for(&flow.activity, idle) => break,
            _ = flow.evicted.notified() => break,
            _ = crate::stopped(&mut stop) => break,
        };
        if ready.is_err() {
            break;
        }
        // A buffer only while a reply is in hand: idle flows hold none.
        let mut buf = Vec::with_capacity(MAX_DATAGRAM);
        match flow.upstream.try_recv_buf(&mut buf) {
            Ok(_) => {
                flow.activity.touch();
                let _ = socket.send_to(&buf, client).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // ICMP unreachable from the backend: end the flow.
            Err(_) => break,
        }
    }
    lock(&flows).remove(&client, &flow);
    shared.metrics.udp_flows_changed(-1);
}
