//! One TCP frontend: accept (within the shared connection limit), admit by source range,
//! connect to a backend (the next one on failure, three tries at most), optionally write the
//! PROXY v2 header, then relay until either side is done or a timeout fires.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::Shared;
use super::relay::{End, relay};
use crate::proxy_protocol;

/// Backends tried for one connection before giving up on it.
const CONNECT_TRIES: usize = 3;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, limit: Arc<Semaphore>) {
    let mut stop = shared.stop.clone();
    let mut accept_errors = 0u32;
    // This listener's connections: they end with it (dropping the set aborts them), so a
    // connection needs no stop signal of its own to watch on every wake-up.
    let mut connections: JoinSet<()> = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // At the limit, stop accepting: the kernel's backlog holds new clients meanwhile.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = crate::stopped(&mut stop) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
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
        let shared = shared.clone();
        connections.spawn(async move {
            let _permit = permit;
            connection(client, peer, &shared).await;
        });
    }
}

/// Connects to a backend: a non-blocking socket made in one call, NODELAY set before the
/// handshake, and the outcome read from the readiness the poller reports (a refused or
/// unreachable connect ends with the socket closed for writing), so a connect that works
/// costs no SO_ERROR query.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_write_closed() || ready.is_error() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

async fn connection(client: TcpStream, peer: SocketAddr, shared: &Shared) {
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
        match tokio::time::timeout(limits.connect_timeout, connect(addr)).await {
            Ok(Ok(stream)) => {
                backend = Some((addr, stream));
                break;
            }
            Ok(Err(err)) => debug!(%addr, error = %err, "backend refused a connection"),
            Err(_) => debug!(%addr, "backend connect timed out"),
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
    let result = relay(client, stream, limits.timeouts).await;
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

    #[tokio::test]
    async fn connect_reaches_a_listener_with_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = connect(listener.local_addr().unwrap()).await.unwrap();
        assert!(stream.nodelay().unwrap());
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_at_once() {
        // A port just freed: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(2), connect(addr))
            .await
            .expect("a refused connect does not hang")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
