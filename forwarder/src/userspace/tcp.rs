//! One TCP frontend: accept (within the node's connection limit, shared fairly between
//! Services), admit by source range,
//! connect to a backend (the next one on failure, three tries at most), send what must go
//! first (the PROXY v2 header, and whatever the client has sent already), then relay until
//! either side is done or the listener's watchdog finds the connection quiet for too long.
//!
//! Data in hand at connect time saves a packet: the connect asks for the handshake's last
//! ACK to be held (TCP_QUICKACK off) and it leaves with that data's first segment, which also
//! hands the backend its connection and its first bytes in one go (HAProxy's
//! `tcp-smart-connect`). A client that has not spoken yet (a protocol where the server speaks
//! first) gets the usual connect: there is nothing to hold the ACK for.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
use crate::plan::Frontend;
use crate::proxy_protocol;

/// How often a Service over its fair share looks again for a place.
const FAIRNESS_POLL: Duration = Duration::from_millis(20);

/// Backends tried for one connection before giving up on it.
const CONNECT_TRIES: usize = 3;

/// At most this much of what a client sent before its backend connect is read ahead; the
/// rest is relayed as usual.
const EARLY: usize = 4096;

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
        // Past three quarters of the node's places, a Service over its fair share waits too
        // (`fairness`), polling briefly while it does.
        // Below the limit (the usual case) a place is taken at once, without the wait's
        // timers and futures.
        let free = shared
            .share
            .may_take()
            .then(|| limit.clone().try_acquire_owned().ok())
            .flatten();
        let (permit, frontend) = match free {
            Some(permit) => (permit, frontend),
            None => {
                let permit = loop {
                    let fair = shared.share.may_take();
                    tokio::select! {
                        p = limit.clone().acquire_owned(), if fair => match p {
                            Ok(p) => break p,
                            Err(_) => return,
                        },
                        _ = tokio::time::sleep(FAIRNESS_POLL), if !fair => {}
                        _ = sweeps.tick(), if !watchdog.is_empty() => watchdog.sweep(Instant::now()),
                        _ = crate::stopped(&mut stop) => return,
                    }
                };
                // The plan may have changed while the client waited.
                (permit, shared.frontend())
            }
        };
        let held = shared.share.hold();
        let (shared, watch) = (shared.clone(), watchdog.watch());
        connections.spawn(async move {
            let _permit = (permit, held);
            connection(client, peer, &frontend, &shared, &watch).await;
        });
    }
}

/// A connect begun: already established, or under way.
enum Connecting {
    Done(TcpStream),
    Pending(TcpStream),
}

/// Starts a connect to a backend: a non-blocking socket made in one call, NODELAY set before
/// the handshake, and with `hold_ack` the handshake's last ACK held for the first data. A
/// connect to this node's own NodePort has usually finished by the time connect(2) returns
/// (the handshake runs through loopback within the call), which a zero-timeout poll(2) tells:
/// such a connect costs neither a wait for readiness nor a timer.
fn start_connect(addr: SocketAddr, hold_ack: bool) -> io::Result<Connecting> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_tcp_nodelay(true)?;
    if hold_ack {
        socket.set_tcp_quickack(false)?;
    }
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

/// Connects to `addr` within `timeout`; `hold_ack` when data is in hand to send at once.
async fn connect(addr: SocketAddr, timeout: Duration, hold_ack: bool) -> io::Result<TcpStream> {
    match start_connect(addr, hold_ack)? {
        Connecting::Done(stream) => Ok(stream),
        Connecting::Pending(stream) => tokio::time::timeout(timeout, established(stream))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
    }
}

/// What the client has sent so far, up to `EARLY` bytes, appended to `into` without waiting
/// (nothing when it has not spoken yet, has finished, or failed: the relay finds those out).
fn read_early(client: &TcpStream, into: &mut Vec<u8>) -> usize {
    let mut buf = [0u8; EARLY];
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    let n = usize::try_from(n).unwrap_or(0);
    into.extend_from_slice(&buf[..n]);
    n
}

/// Sends `first` on a connection just established: straight to the socket (its send buffer
/// is empty, so it takes it all at once), waiting for room only for what it did not take.
async fn send_first(stream: &mut TcpStream, first: &[u8]) -> io::Result<()> {
    // SAFETY: send reads at most `first.len()` bytes from memory `first` borrows.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            first.as_ptr().cast(),
            first.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    let sent = match usize::try_from(n) {
        Ok(sent) => sent,
        Err(_) => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => 0,
            e => return Err(e),
        },
    };
    stream.write_all(&first[sent..]).await
}

/// Relays one accepted connection of `frontend` (as the plan was when it was accepted).
async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    frontend: &Frontend,
    shared: &Shared,
    watch: &Watch,
) {
    let limits = shared.limits;
    // What goes to the backend before the relay starts.
    let mut first = Vec::new();
    if frontend.proxy_protocol {
        let vip = SocketAddr::new(frontend.vip, frontend.port);
        first.extend_from_slice(&proxy_protocol::header(peer, vip));
    }
    let early = read_early(&client, &mut first);
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
        match connect(addr, limits.connect_timeout, !first.is_empty()).await {
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
    if !first.is_empty() {
        if let Err(err) = send_first(&mut stream, &first).await {
            debug!(client = %peer, backend = %addr, error = %err, "connection ended");
            return;
        }
        watch.up.fetch_add(early as u64, Ordering::Relaxed);
    }
    // Not held for the connection's life: ten thousand idle connections hold no buffers.
    drop(first);
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
        let stream = connect(listener.local_addr().unwrap(), SECOND, false)
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
            .filter(|_| matches!(start_connect(addr, false), Ok(Connecting::Done(_))))
            .count();
        assert!(done > 0, "no loopback connect was established at once");
    }

    #[tokio::test]
    async fn what_a_client_sent_before_the_connect_reaches_the_backend_first_and_whole() {
        use tokio::io::AsyncReadExt;
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = front.accept().await.unwrap();

        // Nothing sent yet: nothing read, and the connect would not hold its ACK.
        let mut first = Vec::new();
        assert_eq!(read_early(&accepted, &mut first), 0);
        assert!(first.is_empty());

        // More than is read ahead: the rest stays for the relay, in order.
        let request: Vec<u8> = (0..EARLY + 100).map(|i| (i % 251) as u8).collect();
        client.write_all(&request).await.unwrap();
        let early = eventually_read(&accepted, &mut first).await;
        assert_eq!(early, EARLY);
        assert_eq!(first, request[..EARLY]);

        let mut upstream = connect(back.local_addr().unwrap(), SECOND, true)
            .await
            .unwrap();
        send_first(&mut upstream, &first).await.unwrap();
        // The held ACK rides on the data, so the backend's accept completes with it.
        let (mut server, _) = tokio::time::timeout(SECOND, back.accept())
            .await
            .expect("the backend sees the connection with its first data")
            .unwrap();
        let mut got = vec![0u8; EARLY];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request[..EARLY]);
        let mut rest = vec![0u8; 100];
        let mut accepted = accepted;
        accepted.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, request[EARLY..]);
    }

    /// `read_early` once the client's bytes have arrived (loopback delivers them within the
    /// client's write, but the test does not rely on it).
    async fn eventually_read(client: &TcpStream, into: &mut Vec<u8>) -> usize {
        for _ in 0..100 {
            let n = read_early(client, into);
            if n > 0 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("nothing arrived");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_at_once() {
        // A port just freed: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(2), connect(addr, SECOND, false))
            .await
            .expect("a refused connect does not hang")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
