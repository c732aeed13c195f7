//! One UDP frontend. Each client address is a flow with its own socket connected to the
//! chosen backend, so replies find their way back; replies leave from the VIP's socket. The
//! flow table is bounded (new flows are dropped, and counted, at the limit) and a flow quiet
//! for the idle timeout is removed. A backend answering with ICMP port unreachable ends the
//! flow, so the client's next datagram picks another backend.

use std::collections::HashMap;
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
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

fn lock(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Flow>>> {
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
        let existing = lock(&flows).get(&client).cloned();
        let flow = match existing {
            Some(flow) => flow,
            None => {
                if lock(&flows).len() >= shared.limits.udp_max_flows {
                    shared.metrics.udp_flow_dropped();
                    continue;
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
    {
        let mut table = lock(&flows);
        if table.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
            table.remove(&client);
        }
    }
    shared.metrics.udp_flows_changed(-1);
}
