//! One TCP frontend: accept (within the shared connection limit), admit by source range,
//! connect to a backend (the next one on failure, three tries at most), optionally write the
//! PROXY v2 header, then relay until either side is done or a timeout fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::Shared;
use super::relay::{End, relay};
use crate::proxy_protocol;

/// Backends tried for one connection before giving up on it.
const CONNECT_TRIES: usize = 3;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, limit: Arc<Semaphore>) {
    let mut stop = shared.stop.clone();
    let mut accept_errors = 0u32;
    loop {
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
        tokio::spawn(async move {
            let _permit = permit;
            let mut stop = shared.stop.clone();
            tokio::select! {
                _ = connection(client, peer, &shared) => {}
                _ = crate::stopped(&mut stop) => {}
            }
        });
    }
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
        match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
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
    let _ = stream.set_nodelay(true);
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
