//! Copies bytes both ways between a client and a backend connection, bounded in time and
//! memory. A direction holds a buffer only while data is in flight (it waits for readiness
//! first), so ten thousand idle connections cost sockets and small tasks, not buffers. Each
//! direction's end is passed on as a half-close; a connection idle in both directions for the
//! idle timeout, or half-closed and quiet for the half-close timeout, is closed.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Bytes read per wake-up at most.
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Neither side sent anything for this long.
    pub idle: Duration,
    /// One side has finished and the other sent nothing for this long.
    pub half_close: Duration,
}

/// How a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides finished.
    Closed,
    /// Idle or half-closed for too long.
    TimedOut,
}

/// Milliseconds since `epoch` of the last byte moved in either direction.
struct Activity {
    epoch: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Relays until both directions end, an error occurs, or a timeout fires; returns the bytes
/// moved (client → backend, backend → client) and how it ended.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    timeouts: Timeouts,
) -> io::Result<(u64, u64, End)> {
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        last: AtomicU64::new(0),
    });
    let (client_read, client_write) = client.into_split();
    let (backend_read, backend_write) = backend.into_split();
    let up = pump(client_read, backend_write, &activity, timeouts.idle);
    let down = pump(backend_read, client_write, &activity, timeouts.idle);
    tokio::pin!(up, down);
    // The first direction to finish leaves the other on the half-close timeout.
    let (first_up, first) = tokio::select! {
        r = &mut up => (true, r?),
        r = &mut down => (false, r?),
    };
    if first.1 == End::TimedOut {
        return Ok(if first_up {
            (first.0, 0, End::TimedOut)
        } else {
            (0, first.0, End::TimedOut)
        });
    }
    let half = timeouts.half_close.min(timeouts.idle);
    let second = if first_up {
        pump_rest(&mut down, &activity, half).await?
    } else {
        pump_rest(&mut up, &activity, half).await?
    };
    let end = if second.1 == End::TimedOut {
        End::TimedOut
    } else {
        End::Closed
    };
    Ok(if first_up {
        (first.0, second.0, end)
    } else {
        (second.0, first.0, end)
    })
}

/// Drives the remaining direction, ending it when quiet for `half`.
async fn pump_rest(
    rest: &mut (impl Future<Output = io::Result<(u64, End)>> + Unpin),
    activity: &Activity,
    half: Duration,
) -> io::Result<(u64, End)> {
    loop {
        let wait = half.saturating_sub(activity.quiet_for());
        if wait.is_zero() {
            return Ok((0, End::TimedOut));
        }
        match tokio::time::timeout(wait, &mut *rest).await {
            Ok(r) => return r,
            Err(_) => continue,
        }
    }
}

async fn pump(
    from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    activity: &Activity,
    idle: Duration,
) -> io::Result<(u64, End)> {
    let mut total = 0u64;
    loop {
        // Wait for data without holding a buffer.
        loop {
            let wait = idle.saturating_sub(activity.quiet_for());
            if wait.is_zero() {
                return Ok((total, End::TimedOut));
            }
            match tokio::time::timeout(wait, from.readable()).await {
                Ok(r) => {
                    r?;
                    break;
                }
                // The other direction may have been busy meanwhile; look again.
                Err(_) => continue,
            }
        }
        let mut buf = Vec::with_capacity(CHUNK);
        loop {
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // The sender finished: pass the half-close on.
                    let _ = to.shutdown().await;
                    return Ok((total, End::Closed));
                }
                Ok(n) => {
                    activity.touch();
                    match tokio::time::timeout(idle, to.write_all(&buf)).await {
                        Ok(r) => r?,
                        Err(_) => return Ok((total, End::TimedOut)),
                    }
                    total += n as u64;
                    activity.touch();
                    buf.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair of streams over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn timeouts(idle_ms: u64, half_ms: u64) -> Timeouts {
        Timeouts {
            idle: Duration::from_millis(idle_ms),
            half_close: Duration::from_millis(half_ms),
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_closes_pass_through() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_backend, timeouts(5000, 5000)));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The backend answers after the client's half-close, then closes.
        let big = vec![7u8; 1 << 20];
        backend.write_all(&big).await.unwrap();
        backend.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.len(), big.len());
        let (up, down, end) = relay.await.unwrap().unwrap();
        assert_eq!((up, down, end), (7, 1 << 20, End::Closed));
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, _backend) = pair().await;
        let started = Instant::now();
        let (_, _, end) = relay(proxy_client, proxy_backend, timeouts(300, 300))
            .await
            .unwrap();
        assert_eq!(end, End::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "the client sees the close"
        );
    }

    #[tokio::test]
    async fn traffic_in_one_direction_keeps_the_connection_open() {
        let (client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_backend, timeouts(400, 400)));
        // The backend streams for 1.2 s while the client says nothing.
        for _ in 0..12 {
            backend.write_all(b"tick").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !relay.is_finished(),
            "closed while the backend was still sending"
        );
        drop((client, backend));
        let _ = relay.await;
    }

    #[tokio::test]
    async fn a_half_closed_quiet_connection_times_out() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, _backend) = pair().await;
        let started = Instant::now();
        let relay = tokio::spawn(relay(proxy_client, proxy_backend, timeouts(10_000, 300)));
        client.shutdown().await.unwrap();
        let (_, _, end) = relay.await.unwrap().unwrap();
        assert_eq!(end, End::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
