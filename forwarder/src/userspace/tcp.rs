//! One TCP frontend: accept (within the shared connection limit), admit by source range,
//! connect to a backend (the next one on failure, three tries at most), optionally write the
//! PROXY v2 header, then relay until either side is done or the listener's watchdog finds the
//! connection quiet for too long.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

use super::Shared;
use super::relay::{End, relay};
use super::watchdog::{Watch, Watchdog};
use crate::proxy_protocol;

/// Backends tried for one connection before giving up on it.
const CONNECT_TRIES: usize = 3;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, limit: Arc<Semaphore>) {
    let mut stop = shared.stop.clone();
    let mut accept_errors = 0u32;
    // This listener's connections: they end with it (dropping the set aborts them), so a
    // connection needs no stop signal of its own to watch on every wake-up.
    let mut connections: JoinSet<()> = JoinSet::new();
    // Their timeouts, from one sweep while there are any (an idle listener stays asleep),
    // which goes on while a client waits for a place: at the connection limit idle
    // connections must give their places up.
    let mut watchdog = Watchdog::new(shared.limits.timeouts);
    let mut sweeps = tokio::time::interval(watchdog.period());
    sweeps.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = sweeps.tick(), if !watchdog.is_empty() => {
                watchdog.sweep(Instant::now());
                continue;
            }
            _ = crate::stopped(&mut stop) => return,
        };
        let (client, peer) = match accepted {
            Ok(conn) => {
                accept_errors = 0;
                conn
            }
            Err(err) => {
                // Out of file descriptors or memory: back off rather than spin.
                accept_errors += 1;
                if accept_errors == 1 {
                    warn!(error = %err, "accept failed");
                }
                let wait = Duration::from_millis(10 << accept_errors.min(6));
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let frontend = shared.frontend();
        if !frontend.admits(&peer.ip()) {
            shared.metrics.refused();
            continue;
        }
        // At the limit the client waits here for a place, and the kernel's backlog holds
        // the ones after it. Waiting with a client in hand (rather than for a place before
        // accepting) means a place freed goes to a listener that has someone to serve, not to
        // one whose backlog is empty while another's fills.
        let permit = loop {
            tokio::select! {
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => return,
                },
                _ = sweeps.tick(), if !watchdog.is_empty() => watchdog.sweep(Instant::now()),
                _ = crate::stopped(&mut stop) => return,
            }
        };
        let (shared, watch) = (shared.clone(), watchdog.watch());
        connections.spawn(async move {
            let _permit = permit;
            connection(client, peer, &shared, &watch).await;
        });
    }
}

/// A connect begun: already established, or under way.
enum Connecting {
    Done(TcpStream),
    Pending(TcpStream),
}

/// Starts a connect to a backend: a non-blocking socket made in one call, NODELAY set before
/// the handshake. A connect to this node's own NodePort has usually finished by the time
/// connect(2) returns (the handshake runs through loopback within the call), which a
/// zero-timeout poll(2) tells: such a connect costs neither a wait for readiness nor a timer.
fn start_connect(addr: SocketAddr) -> io::Result<Connecting> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok(Connecting::Done(TcpStream::from_std(socket.into())?)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives for the call, without waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    if ready < 0 {
        return Err(io::Error::last_os_error());
    }
    if ready > 0 && poll.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        return Err(refusal(socket.take_error()?));
    }
    let stream = TcpStream::from_std(socket.into())?;
    Ok(if ready > 0 {
        Connecting::Done(stream)
    } else {
        Connecting::Pending(stream)
    })
}

fn refusal(error: Option<io::Error>) -> io::Error {
    error.unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into())
}

/// Waits for a connect under way, reading the outcome from the readiness the poller reports
/// (a refused or unreachable connect ends with the socket closed for writing), so a connect
/// that works costs no SO_ERROR query.
async fn established(stream: TcpStream) -> io::Result<TcpStream> {
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_write_closed() || ready.is_error() {
        return Err(refusal(stream.take_error()?));
    }
    Ok(stream)
}

/// Connects to `addr` within `timeout`.
async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match start_connect(addr)? {
        Connecting::Done(stream) => Ok(stream),
        Connecting::Pending(stream) => tokio::time::timeout(timeout, established(stream))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
    }
}

async fn connection(client: TcpStream, peer: SocketAddr, shared: &Shared, watch: &Watch) {
    let frontend = shared.frontend();
    let limits = shared.limits;
    let mut failed = Vec::new();
    let mut backend = None;
    while failed.len() < CONNECT_TRIES {
        let Some(addr) =
            shared
                .balancer
                .pick(peer.ip(), &frontend.backends, &failed, Instant::now())
        else {
            break;
        };
        match connect(addr, limits.connect_timeout).await {
            Ok(stream) => {
                backend = Some((addr, stream));
                break;
            }
            Err(err) => debug!(%addr, error = %err, "backend could not be reached"),
        }
        shared.metrics.connect_failed();
        failed.push(addr);
    }
    let Some((addr, mut stream)) = backend else {
        debug!(client = %peer, service = %frontend.service, "no backend could be reached");
        return;
    };
    if frontend.proxy_protocol {
        let vip = SocketAddr::new(frontend.vip, frontend.port);
        if stream
            .write_all(&proxy_protocol::header(peer, vip))
            .await
            .is_err()
        {
            return;
        }
    }
    shared.metrics.opened();
    let result = relay(client, stream, watch).await;
    shared.metrics.closed();
    match result {
        Ok((up, down, End::TimedOut)) => {
            debug!(client = %peer, backend = %addr, up, down, "connection timed out");
            shared.metrics.timed_out();
        }
        Ok(_) => {}
        Err(err) => debug!(client = %peer, backend = %addr, error = %err, "connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn connect_reaches_a_listener_with_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = connect(listener.local_addr().unwrap(), SECOND)
            .await
            .unwrap();
        assert!(stream.nodelay().unwrap());
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_loopback_connect_is_established_without_waiting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The handshake runs within connect(2) unless softirq work is deferred (a loaded
        // machine), so most of these, not necessarily all, are done at once.
        let done = (0..20)
            .filter(|_| matches!(start_connect(addr), Ok(Connecting::Done(_))))
            .count();
        assert!(done > 0, "no loopback connect was established at once");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_at_once() {
        // A port just freed: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(2), connect(addr, SECOND))
            .await
            .expect("a refused connect does not hang")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
