//! Copies bytes both ways between a client and a backend connection, bounded in time and
//! memory. A direction holds a buffer only while data is in flight (it waits for readiness
//! first), so ten thousand idle connections cost sockets and small tasks, not buffers. Each
//! direction's end is passed on as a half-close; a connection idle in both directions for the
//! idle timeout, or half-closed and quiet for the half-close timeout, is closed (a write the
//! peer never drains counts as quiet too).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::os::fd::AsRawFd;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{Activity, quiet_for};

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

/// Relays until both directions end, an error occurs, or a timeout fires; returns the bytes
/// moved (client → backend, backend → client) and how it ended. The timeouts are one watchdog
/// per connection that sleeps until the connection could first have been quiet for long
/// enough, rather than a timer per read or write.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    timeouts: Timeouts,
) -> io::Result<(u64, u64, End)> {
    let activity = Activity::new();
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let (client_read, client_write) = client.into_split();
    let (backend_read, backend_write) = backend.into_split();
    let one_done = AtomicBool::new(false);
    let up = pump(client_read, backend_write, &activity, &up_bytes, &one_done);
    let down = pump(
        backend_read,
        client_write,
        &activity,
        &down_bytes,
        &one_done,
    );
    tokio::pin!(up, down);
    let moved = || {
        (
            up_bytes.load(Ordering::Relaxed),
            down_bytes.load(Ordering::Relaxed),
        )
    };
    // Both directions until one finishes; the other is then on the half-close timeout.
    let up_finished = tokio::select! {
        r = &mut up => { r?; true }
        r = &mut down => { r?; false }
        _ = quiet_for(&activity, timeouts.idle) => {
            let (u, d) = moved();
            return Ok((u, d, End::TimedOut));
        }
    };
    let rest = if up_finished { &mut down } else { &mut up };
    let end = tokio::select! {
        r = rest => { r?; End::Closed }
        _ = quiet_for(&activity, timeouts.half_close.min(timeouts.idle)) => End::TimedOut,
    };
    let (u, d) = moved();
    Ok((u, d, end))
}

/// Reads what `from` has into `buf`'s spare capacity. A read that does not fill the buffer
/// emptied the socket, so it also clears tokio's readiness for it (through `try_io`): the
/// next wait goes straight to the poller instead of costing a `recv` that says EAGAIN, one
/// system call saved per message in each direction.
fn read_some(from: &OwnedReadHalf, buf: &mut Vec<u8>) -> io::Result<usize> {
    let stream: &TcpStream = from.as_ref();
    let fd = stream.as_raw_fd();
    let mut got = 0;
    let result = stream.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        // SAFETY: recv writes at most `spare.len()` bytes into memory `buf` owns.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = n as usize;
        if got > 0 && got < spare.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    if got > 0 {
        // SAFETY: recv initialised `got` bytes past the current length.
        unsafe { buf.set_len(buf.len() + got) };
        return Ok(got);
    }
    result.map(|()| 0)
}

/// Sends all of `buf` with MSG_MORE: the kernel holds the last segment back for the FIN that
/// follows, so a response and its end leave in one packet (one packet and one ACK less per
/// short-lived connection, as HAProxy does).
async fn send_all_corked(to: &OwnedWriteHalf, mut buf: &[u8]) -> io::Result<()> {
    let stream: &TcpStream = to.as_ref();
    let fd = stream.as_raw_fd();
    while !buf.is_empty() {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            // SAFETY: send reads at most `buf.len()` bytes from memory `buf` borrows.
            let n = unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes the end of one direction on: a half-close, or nothing when the other direction has
/// already finished (closing both sockets right after sends the same FIN, without a system
/// call).
async fn finish(mut to: OwnedWriteHalf, one_done: &AtomicBool) {
    if one_done.swap(true, Ordering::Relaxed) {
        // Dropping the write half would shut it down; closing does that.
        to.forget();
    } else {
        let _ = to.shutdown().await;
    }
}

/// Copies one direction until its sender finishes (passing the half-close on) or fails.
async fn pump(
    from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    activity: &Activity,
    moved: &AtomicU64,
    one_done: &AtomicBool,
) -> io::Result<()> {
    loop {
        // Wait for data without holding a buffer. The readiness also tells whether the
        // sender has finished (EPOLLRDHUP), so the last data can go out with the FIN.
        let ready = from.ready(Interest::READABLE).await?;
        let mut buf = Vec::with_capacity(CHUNK);
        loop {
            match read_some(&from, &mut buf) {
                Ok(0) => {
                    finish(to, one_done).await;
                    return Ok(());
                }
                Ok(n) => {
                    activity.touch();
                    // A short read after the sender's FIN drained the socket: this is the
                    // direction's last data.
                    let last = n < CHUNK && ready.is_read_closed();
                    if last {
                        send_all_corked(&to, &buf).await?;
                    } else {
                        to.write_all(&buf).await?;
                    }
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    activity.touch();
                    if last {
                        finish(to, one_done).await;
                        return Ok(());
                    }
                    buf.clear();
                    if n < CHUNK {
                        // Drained: wait for more rather than asking again.
                        break;
                    }
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
    use std::time::Instant;
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
    async fn a_backend_that_answers_and_closes_at_once_still_hears_the_client() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        // The answer and its FIN are both waiting before the relay looks: they leave together.
        backend.write_all(b"answer").await.unwrap();
        backend.shutdown().await.unwrap();
        let relay = tokio::spawn(relay(proxy_client, proxy_backend, timeouts(5000, 5000)));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer", "the answer, then the end");
        // The other direction is still open.
        client.write_all(b"late").await.unwrap();
        client.shutdown().await.unwrap();
        let mut late = Vec::new();
        backend.read_to_end(&mut late).await.unwrap();
        assert_eq!(late, b"late");
        let (up, down, end) = relay.await.unwrap().unwrap();
        assert_eq!((up, down, end), (4, 6, End::Closed));
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
