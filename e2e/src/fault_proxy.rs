//! A TCP fault proxy between a client (the operator) and kube-apiserver: it can reset every
//! open connection (dropped watches), refuse new ones for a while (an outage), delay every
//! chunk in both directions (latency), and black-hole traffic (connections stay open and
//! everything sent into them is lost, as with a silent network partition: calls hang until
//! their client gives up). TLS passes through untouched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Faults {
    refuse: AtomicBool,
    blackhole: AtomicBool,
    latency_ms: AtomicU64,
    resets: AtomicU64,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    accept: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if faults.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        let delay = faults.latency_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if f.refuse.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let f2 = f.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Inline, not spawned: aborting this task must cut both directions.
                    tokio::join!(pipe(cr, sw, f2.clone()), pipe(sr, cw, f2));
                });
                if let Ok(mut conns) = f.connections.lock() {
                    conns.retain(|t| !t.is_finished());
                    conns.push(task);
                }
            }
        });
        Ok(FaultProxy {
            addr,
            faults,
            accept,
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Drops every open connection, as a load balancer or NAT timeout would.
    pub fn reset_all(&self) {
        self.faults.resets.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut conns) = self.faults.connections.lock() {
            for t in conns.drain(..) {
                t.abort();
            }
        }
    }

    /// While on, new connections are closed at once and open ones are dropped.
    pub fn set_outage(&self, on: bool) {
        self.faults.refuse.store(on, Ordering::Relaxed);
        if on {
            self.reset_all();
        }
    }

    /// While on, whatever either side sends is dropped without a word; connections opened
    /// meanwhile are accepted and hang the same way. Lifting it does not revive the calls
    /// that were lost (their clients time out), as after a real partition.
    pub fn set_blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::Relaxed);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.faults
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// How many times connections were reset.
    pub fn resets(&self) -> u64 {
        self.faults.resets.load(Ordering::Relaxed)
    }
}
