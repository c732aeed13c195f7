//! Copies bytes both ways between a client and a backend connection, bounded in time and
//! memory. Data is read into one scratch buffer per data-plane thread and sent on at once; a
//! direction holds a buffer of its own only for what the receiver could not take yet, so ten
//! thousand connections cost sockets and small tasks, not buffers, and the usual message costs
//! no allocation at all. Each direction's end is passed on as a half-close. Bytes sent are
//! counted on the connection's `Watch`, from which the listener's watchdog closes connections
//! idle in both directions, or half-closed and quiet, for too long (a write the peer does not
//! drain moves nothing, so it counts as quiet too).

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::splice;
use super::watchdog::Watch;

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

/// Relays until both directions end, an error occurs, or `watch` expires; returns the bytes
/// moved (client → backend, backend → client) and how it ended.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    watch: &Watch,
) -> io::Result<(u64, u64, End)> {
    // Both directions borrow the two sockets (tokio waits for reading and for writing one
    // socket independently), so a connection costs no split halves.
    let up = pump(&client, &backend, &watch.up, watch);
    let down = pump(&backend, &client, &watch.down, watch);
    tokio::pin!(up, down);
    let moved = || {
        (
            watch.up.load(Ordering::Relaxed),
            watch.down.load(Ordering::Relaxed),
        )
    };
    // Both directions until one finishes (it marks the watch half-closed); then the other.
    let up_finished = tokio::select! {
        r = &mut up => { r?; true }
        r = &mut down => { r?; false }
        _ = watch.expired() => {
            let (u, d) = moved();
            return Ok((u, d, End::TimedOut));
        }
    };
    let rest = if up_finished { &mut down } else { &mut up };
    let end = tokio::select! {
        r = rest => { r?; End::Closed }
        _ = watch.expired() => End::TimedOut,
    };
    let (u, d) = moved();
    Ok((u, d, end))
}

/// Reads what `from` has into `buf`'s spare capacity. A read that does not fill the buffer
/// emptied the socket, so it also clears tokio's readiness for it (through `try_io`): the
/// next wait goes straight to the poller instead of costing a `recv` that says EAGAIN, one
/// system call saved per message in each direction.
fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
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

thread_local! {
    /// Where every connection on this thread reads into. Each data-plane thread runs one
    /// current-thread runtime and a borrow never spans an await, so one buffer serves all.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(CHUNK));
}

/// Sends what `to` takes of `buf` now, without waiting: the bytes sent (0 when its buffer is
/// full). With `corked`, MSG_MORE holds the last segment back for the FIN that follows, so a
/// response and its end leave in one packet (one packet and one ACK less per short-lived
/// connection, as HAProxy does).
fn try_send(stream: &TcpStream, buf: &[u8], corked: bool) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let flags = libc::MSG_NOSIGNAL | if corked { libc::MSG_MORE } else { 0 };
    let sent = stream.try_io(Interest::WRITABLE, || {
        // SAFETY: send reads at most `buf.len()` bytes from memory `buf` borrows.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    });
    match sent {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Sends all of `buf`, waiting for room as needed, counting into `moved` as it goes.
async fn send_all(
    to: &TcpStream,
    mut buf: &[u8],
    corked: bool,
    moved: &AtomicU64,
) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        let n = try_send(to, buf, corked)?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        buf = &buf[n..];
    }
    Ok(())
}

/// Passes the end of one direction on: a half-close, or nothing when the other direction has
/// already finished (closing both sockets right after sends the same FIN, without a system
/// call).
fn finish(to: &TcpStream, watch: &Watch) {
    if !watch.finish_direction() {
        // A socket the peer has already reset has nothing left to tell it.
        let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
    }
}

/// One read and the send that follows it.
enum Step {
    /// The sender has finished.
    End,
    /// Nothing more to read for now.
    Drained,
    /// `n` bytes read, `sent` of them sent on; `rest` is what the receiver did not take yet.
    Moved {
        n: usize,
        sent: usize,
        last: bool,
        rest: Option<Vec<u8>>,
    },
}

/// Relays the rest of one direction through `pipe` until its sender finishes.
async fn spliced(
    from: &TcpStream,
    to: &TcpStream,
    pipe: splice::Pipe,
    moved: &AtomicU64,
    watch: &Watch,
) -> io::Result<()> {
    loop {
        let n = splice::fill(from, &pipe).await?;
        if n == 0 {
            finish(to, watch);
            return Ok(());
        }
        splice::drain(&pipe, to, n, moved).await?;
    }
}

/// Copies one direction until its sender finishes (passing the half-close on) or fails.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
    watch: &Watch,
) -> io::Result<()> {
    loop {
        // Wait for data. The readiness also tells whether the sender has finished
        // (EPOLLRDHUP), so the last data can go out with the FIN.
        let ready = from.ready(Interest::READABLE).await?;
        let closing = ready.is_read_closed();
        loop {
            let step = SCRATCH.with_borrow_mut(|buf| -> io::Result<Step> {
                buf.clear();
                let n = match read_some(from, buf) {
                    Ok(0) => return Ok(Step::End),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Drained),
                    Err(e) => return Err(e),
                };
                // A short read after the sender's FIN drained the socket: this is the
                // direction's last data.
                let last = n < CHUNK && closing;
                let sent = try_send(to, buf, last)?;
                Ok(Step::Moved {
                    n,
                    sent,
                    last,
                    rest: (sent < n).then(|| buf[sent..].to_vec()),
                })
            })?;
            match step {
                Step::End => {
                    finish(to, watch);
                    return Ok(());
                }
                Step::Drained => break,
                Step::Moved {
                    n,
                    sent,
                    last,
                    rest,
                } => {
                    moved.fetch_add(sent as u64, Ordering::Relaxed);
                    if let Some(rest) = rest {
                        send_all(to, &rest, last, moved).await?;
                    }
                    if last {
                        finish(to, watch);
                        return Ok(());
                    }
                    if n < CHUNK {
                        // Drained: wait for more rather than asking again.
                        break;
                    }
                    // A full buffer: a bulk transfer, which splice moves without copying.
                    if let Some(pipe) = splice::Pipe::new() {
                        return spliced(from, to, pipe, moved, watch).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userspace::watchdog::Watchdog;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of streams over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Relays under a watchdog swept as a listener sweeps it.
    async fn watched_relay(
        client: TcpStream,
        backend: TcpStream,
        timeouts: Timeouts,
    ) -> io::Result<(u64, u64, End)> {
        let mut dog = Watchdog::new(timeouts);
        let watch = dog.watch();
        let period = dog.period();
        let sweeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                dog.sweep(Instant::now());
            }
        });
        let result = relay(client, backend, &watch).await;
        sweeper.abort();
        result
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
        let relay = tokio::spawn(watched_relay(
            proxy_client,
            proxy_backend,
            timeouts(5000, 5000),
        ));
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
        let relay = tokio::spawn(watched_relay(
            proxy_client,
            proxy_backend,
            timeouts(5000, 5000),
        ));
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
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let relay = tokio::spawn(watched_relay(
            proxy_client,
            proxy_backend,
            timeouts(10_000, 10_000),
        ));
        // Far more than the sockets buffer: the relay must hold what the client cannot take
        // yet and send it on later, in order.
        let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            backend.write_all(&sent).await.unwrap();
            backend.shutdown().await.unwrap();
            backend
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::with_capacity(data.len());
        client.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "{} bytes arrived, {} sent",
            got.len(),
            data.len()
        );
        drop(client);
        drop(writer.await.unwrap());
        let (_, down, _) = relay.await.unwrap().unwrap();
        assert_eq!(down, data.len() as u64);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, _backend) = pair().await;
        let started = Instant::now();
        let (_, _, end) = watched_relay(proxy_client, proxy_backend, timeouts(300, 300))
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
        let relay = tokio::spawn(watched_relay(
            proxy_client,
            proxy_backend,
            timeouts(400, 400),
        ));
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
        let relay = tokio::spawn(watched_relay(
            proxy_client,
            proxy_backend,
            timeouts(10_000, 300),
        ));
        client.shutdown().await.unwrap();
        let (_, _, end) = relay.await.unwrap().unwrap();
        assert_eq!(end, End::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
