//! One relayed TCP connection, a state machine its thread's event loop (`engine`) drives with
//! the readiness epoll reports: connect to a backend (the next one on failure, three tries at
//! most, each within the connect timeout), send what must go first (the PROXY v2 header, and
//! whatever the client has sent already), then move bytes both ways until both sides are
//! done, passing each direction's end on as a half-close.
//!
//! Data in hand at connect time saves a packet: the connect asks for the handshake's last
//! ACK to be held (TCP_QUICKACK off) and it leaves with that data's first segment, which also
//! hands the backend its connection and its first bytes in one go (HAProxy's
//! `tcp-smart-connect`).
//!
//! Bytes are read into the thread's one scratch buffer and sent on at once; a direction holds
//! a buffer of its own only for what the receiver could not take yet, so ten thousand idle
//! connections cost sockets, not buffers. A read that fills the scratch buffer is a bulk
//! transfer, which on a thread left to the scheduler then moves through a pipe with splice(2),
//! never crossing into user space. A thread pinned to the CPU of its connections (`affinity`)
//! keeps copying: the bytes it reads are still in that CPU's cache, and one 64 KiB send makes
//! fewer, larger packets towards the receiver than the pages splice passes on.
//! A read that does not fill it emptied the socket, and epoll (edge-triggered) reports the
//! next data: no call is made only to hear EAGAIN. The last data before a FIN is corked
//! (MSG_MORE) so that it and the FIN leave in one packet, as HAProxy does.
//!
//! Timeouts come from the loop's sweep (`sweep`), not from a timer per connection: a
//! connection quiet in both directions for the idle timeout, or with one direction finished
//! and nothing moving for the half-close timeout, is closed (a write the peer does not drain
//! moves nothing, so it counts as quiet too).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::Shared;
use super::epoll::{self, Epoll};
use super::fairness::Held;
use super::splice::{self, PIPE_SIZE, Pipe};
use crate::plan::Frontend;
use crate::proxy_protocol;

/// Bytes read per call at most; a read this long switches its direction to splice.
pub(super) const CHUNK: usize = 64 * 1024;

/// At most this much of what a client sent before its backend connect is read ahead; the
/// rest is relayed as usual.
const EARLY: usize = 4096;

/// Backends tried for one connection before giving up on it.
const CONNECT_TRIES: usize = 3;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Neither side sent anything for this long.
    pub idle: Duration,
    /// One side has finished and the other sent nothing for this long.
    pub half_close: Duration,
}

/// The sides of a connection, as indexes of its per-side arrays and low bit of its tokens.
pub(super) const CLIENT: usize = 0;
pub(super) const BACKEND: usize = 1;

/// What a connection holds while it lives: its place in the node's limit and its Service's
/// count of places.
pub(super) type Place = (OwnedSemaphorePermit, Held);

/// How a direction moves a bulk transfer (one whose reads fill the scratch buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bulk {
    /// Through a pipe with splice(2): no copy, for a thread on any CPU, where the data read
    /// is rarely in its cache.
    Splice,
    /// Through the scratch buffer, as any data: for a thread on the CPU that received the
    /// connection's packets, where the data is still in cache and copying it costs less than
    /// splice's smaller packets towards the receiver.
    Copy,
}

/// Whether a connection goes on after an event or a sweep.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Open,
    /// Open, with more to move than one turn takes: to be resumed without a new event.
    Busy,
    Done,
}

/// Reads (or splices) one direction makes per turn at most, so one fast transfer cannot keep
/// its thread's other connections, accepts and sweeps waiting (up to 16 × 256 KiB).
const TURN: usize = 16;

/// One direction: bytes read from one side and sent to the other.
#[derive(Default)]
struct Direction {
    /// What the receiver has not taken yet.
    pending: Vec<u8>,
    /// Once the direction moves bulk data: the pipe and the bytes in it.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// The sender has finished.
    ended: bool,
    /// Its end has been passed on.
    passed: bool,
    /// Bytes sent on.
    moved: u64,
}

/// A connect under way.
struct Connecting {
    started: Instant,
    /// Backends that failed for this connection.
    failed: Vec<SocketAddr>,
}

pub(super) struct Conn {
    /// The engine's listener it came from (its connections close with it).
    pub(super) listener: u64,
    shared: Arc<Shared>,
    /// The plan as it was when the connection was accepted.
    frontend: Arc<Frontend>,
    peer: SocketAddr,
    fds: [OwnedFd; 2],
    backend: SocketAddr,
    connecting: Option<Connecting>,
    /// Readiness as epoll last reported it, until a call finds it gone.
    readable: [bool; 2],
    writable: [bool; 2],
    /// The side has finished sending (EPOLLRDHUP): its next short read is its last data.
    closing: [bool; 2],
    /// Client → backend, backend → client.
    dirs: [Direction; 2],
    /// Counted as open in the metrics (once connected).
    opened: bool,
    /// Bytes moved at the last sweep that saw a change, and when.
    quiet: (u64, Instant),
    /// A bulk transfer may move to splice(2) (`Bulk`).
    splice: bool,
    _place: Place,
}

/// A connect begun: the socket, and whether it is already established.
fn start_connect(addr: SocketAddr, hold_ack: bool) -> io::Result<(OwnedFd, bool)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_tcp_nodelay(true)?;
    if hold_ack {
        socket.set_tcp_quickack(false)?;
    }
    let done = match socket.connect(&addr.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    Ok((socket.into(), done))
}

/// What `fd` has now, up to `buf.len()`, without waiting: `None` when nothing is there.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    match usize::try_from(n) {
        Ok(n) => Ok(Some(n)),
        Err(_) => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            e => Err(e),
        },
    }
}

/// What `fd` takes of `buf` now (0 when its buffer is full). With `corked`, MSG_MORE holds
/// the last segment back for the FIN that follows.
fn send(fd: RawFd, buf: &[u8], corked: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | if corked { libc::MSG_MORE } else { 0 };
    // SAFETY: send reads at most `buf.len()` bytes from memory `buf` borrows.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
    match usize::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            e => Err(e),
        },
    }
}

impl Conn {
    /// Starts relaying an accepted client: reads what it has sent already, connects to a
    /// backend and registers both sockets under `token` (the side is its low bit). `None`
    /// when no backend could be reached at once (the client is closed).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        listener: u64,
        client: OwnedFd,
        peer: SocketAddr,
        frontend: Arc<Frontend>,
        shared: Arc<Shared>,
        place: Place,
        epoll: &Epoll,
        token: u64,
        scratch: &mut [u8],
        now: Instant,
        bulk: Bulk,
    ) -> Option<Conn> {
        let mut first = Vec::new();
        if frontend.proxy_protocol {
            let vip = SocketAddr::new(frontend.vip, frontend.port);
            first.extend_from_slice(&proxy_protocol::header(peer, vip));
        }
        // What the client has sent already (usually the whole request) leaves with the
        // backend handshake's last ACK; the rest is relayed as usual.
        let early = scratch.get_mut(..EARLY).unwrap_or_default();
        if let Ok(Some(n)) = recv(client.as_raw_fd(), early) {
            first.extend_from_slice(early.get(..n).unwrap_or_default());
        }
        let mut connecting = Connecting {
            started: now,
            failed: Vec::new(),
        };
        let (backend, fd, done) = connect_next(&frontend, &shared, peer, &mut connecting, &first)?;
        let conn = Conn {
            listener,
            shared,
            frontend,
            peer,
            fds: [client, fd],
            backend,
            connecting: (!done).then_some(connecting),
            readable: [false; 2],
            writable: [true, done],
            closing: [false; 2],
            dirs: [
                Direction {
                    pending: first,
                    ..Direction::default()
                },
                Direction::default(),
            ],
            opened: false,
            quiet: (0, now),
            splice: bulk == Bulk::Splice,
            _place: place,
        };
        for side in [CLIENT, BACKEND] {
            if let Err(err) = epoll.add(conn.fd(side), token | side as u64) {
                debug!(error = %err, "cannot watch a connection");
                return None;
            }
        }
        Some(conn)
    }

    fn fd(&self, side: usize) -> RawFd {
        self.fds.get(side).map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Handles what epoll reported for `side`, then moves what can be moved.
    pub(super) fn event(
        &mut self,
        side: usize,
        flags: u32,
        epoll: &Epoll,
        token: u64,
        scratch: &mut [u8],
        now: Instant,
    ) -> Step {
        // A connect under way: what its socket reports says only how the connect went (a
        // refused one reports closed both ways, which must not stick to the next backend).
        if side == BACKEND && self.connecting.is_some() {
            if flags & (epoll::ERR | epoll::HUP) != 0 {
                return self.retry(epoll, token, now);
            }
            if flags & epoll::OUT == 0 {
                return Step::Open;
            }
            self.connecting = None;
        }
        let (Some(readable), Some(writable), Some(closing)) = (
            self.readable.get_mut(side),
            self.writable.get_mut(side),
            self.closing.get_mut(side),
        ) else {
            return Step::Done;
        };
        *readable |= flags & (epoll::IN | epoll::RDHUP | epoll::HUP | epoll::ERR) != 0;
        *writable |= flags & (epoll::OUT | epoll::HUP | epoll::ERR) != 0;
        *closing |= flags & epoll::RDHUP != 0;
        self.relay(scratch)
    }

    /// The connect failed: on to the next backend, if any is left to try.
    fn retry(&mut self, epoll: &Epoll, token: u64, now: Instant) -> Step {
        self.shared.metrics.connect_failed();
        debug!(backend = %self.backend, "backend could not be reached");
        let Some(connecting) = self.connecting.as_mut() else {
            return Step::Done;
        };
        connecting.failed.push(self.backend);
        connecting.started = now;
        let first = &self.dirs[CLIENT].pending;
        let Some((backend, fd, done)) =
            connect_next(&self.frontend, &self.shared, self.peer, connecting, first)
        else {
            return Step::Done;
        };
        if let Err(err) = epoll.add(fd.as_raw_fd(), token | BACKEND as u64) {
            debug!(error = %err, "cannot watch a connection");
            return Step::Done;
        }
        // The failed socket closes here, which also takes it out of epoll.
        self.fds[BACKEND] = fd;
        self.backend = backend;
        (self.readable[BACKEND], self.writable[BACKEND]) = (false, done);
        self.closing[BACKEND] = false;
        if done {
            self.connecting = None;
        }
        Step::Open
    }

    /// Moves what can be moved in both directions (also what a turn left: `Step::Busy`).
    pub(super) fn relay(&mut self, scratch: &mut [u8]) -> Step {
        if self.connecting.is_some() {
            return Step::Open;
        }
        if !self.opened {
            self.opened = true;
            self.shared.metrics.opened();
        }
        let mut busy = false;
        for d in [CLIENT, BACKEND] {
            match self.pump(d, scratch) {
                Ok(more) => busy |= more,
                Err(err) => {
                    debug!(client = %self.peer, backend = %self.backend, error = %err, "connection ended");
                    return Step::Done;
                }
            }
        }
        if self.dirs.iter().all(|d| d.passed) {
            Step::Done
        } else if busy {
            Step::Busy
        } else {
            Step::Open
        }
    }

    /// Direction `d`: from side `d` to the other, for one turn at most; true when the turn
    /// ended with more to read.
    fn pump(&mut self, d: usize, scratch: &mut [u8]) -> io::Result<bool> {
        let (from, to) = (d, 1 - d);
        let (from_fd, to_fd) = (self.fd(from), self.fd(to));
        let other_passed = self.dirs.get(to).is_some_and(|o| o.passed);
        let (Some(dir), Some(readable), Some(writable), Some(closing)) = (
            self.dirs.get_mut(d),
            self.readable.get_mut(from),
            self.writable.get_mut(to),
            self.closing.get(from),
        ) else {
            return Ok(false);
        };
        for _ in 0..TURN {
            // What the receiver has not taken yet goes first.
            if dir.in_pipe > 0 {
                if !*writable {
                    return Ok(false);
                }
                let Some(pipe) = &dir.pipe else {
                    return Ok(false);
                };
                let sent = match splice::splice(pipe.read(), to_fd, dir.in_pipe) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                };
                dir.moved += sent as u64;
                dir.in_pipe -= sent;
                if dir.in_pipe > 0 {
                    *writable = false;
                    return Ok(false);
                }
            }
            if !dir.pending.is_empty() {
                if !*writable {
                    return Ok(false);
                }
                let sent = send(to_fd, &dir.pending, false)?;
                dir.moved += sent as u64;
                dir.pending.drain(..sent);
                if !dir.pending.is_empty() {
                    *writable = false;
                    return Ok(false);
                }
            }
            if dir.ended {
                if !dir.passed {
                    dir.passed = true;
                    // When the other direction is done too, closing both sockets sends the
                    // same FIN without a call. A socket its peer has reset has nothing left
                    // to be told.
                    if !other_passed {
                        // SAFETY: shutdown on a socket this connection owns.
                        unsafe { libc::shutdown(to_fd, libc::SHUT_WR) };
                    }
                }
                return Ok(false);
            }
            if !*readable {
                return Ok(false);
            }
            if let Some(pipe) = &dir.pipe {
                match splice::splice(from_fd, pipe.write(), PIPE_SIZE) {
                    Ok(0) => dir.ended = true,
                    // A short move does not say the socket is empty: the pipe may have run
                    // out of slots first. Only EAGAIN does.
                    Ok(n) => dir.in_pipe = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        *readable = false;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            let Some(n) = recv(from_fd, scratch)? else {
                *readable = false;
                return Ok(false);
            };
            if n == 0 {
                dir.ended = true;
                continue;
            }
            let data = scratch.get(..n).unwrap_or_default();
            // A short read after the sender's FIN emptied the socket: this is the
            // direction's last data.
            let last = n < CHUNK && *closing;
            if n < CHUNK {
                *readable = false;
            }
            let sent = if *writable {
                send(to_fd, data, last)?
            } else {
                0
            };
            dir.moved += sent as u64;
            if sent < n {
                *writable = false;
                dir.pending
                    .extend_from_slice(data.get(sent..).unwrap_or_default());
            }
            if last {
                dir.ended = true;
            } else if n == CHUNK && dir.pipe.is_none() && self.splice {
                // A full buffer: a bulk transfer, which splice moves without copying.
                dir.pipe = Pipe::new();
            }
        }
        // The turn is over with the direction still moving: more may be waiting.
        Ok(true)
    }

    /// The sweep's look at this connection: its connect or its quiet time past their limits.
    pub(super) fn sweep(
        &mut self,
        now: Instant,
        connect_timeout: Duration,
        timeouts: Timeouts,
        epoll: &Epoll,
        token: u64,
    ) -> Step {
        if let Some(connecting) = &self.connecting {
            if now.saturating_duration_since(connecting.started) >= connect_timeout {
                return self.retry(epoll, token, now);
            }
            return Step::Open;
        }
        let moved = self.dirs.iter().map(|d| d.moved).sum::<u64>();
        if moved != self.quiet.0 {
            self.quiet = (moved, now);
            return Step::Open;
        }
        let limit = if self.dirs.iter().any(|d| d.passed) {
            timeouts.half_close.min(timeouts.idle)
        } else {
            timeouts.idle
        };
        if now.saturating_duration_since(self.quiet.1) >= limit {
            debug!(client = %self.peer, backend = %self.backend, "connection timed out");
            self.shared.metrics.timed_out();
            return Step::Done;
        }
        Step::Open
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.opened {
            self.shared.metrics.closed();
        }
    }
}

/// Connects to the next backend the balancer picks for `peer` (skipping those that failed),
/// until one connect starts or the tries are spent; counts each failure.
fn connect_next(
    frontend: &Frontend,
    shared: &Shared,
    peer: SocketAddr,
    connecting: &mut Connecting,
    first: &[u8],
) -> Option<(SocketAddr, OwnedFd, bool)> {
    while connecting.failed.len() < CONNECT_TRIES {
        let addr = shared.balancer.pick(
            peer.ip(),
            &frontend.backends,
            &connecting.failed,
            Instant::now(),
        )?;
        match start_connect(addr, !first.is_empty()) {
            Ok((fd, done)) => return Some((addr, fd, done)),
            Err(err) => debug!(%addr, error = %err, "backend could not be reached"),
        }
        shared.metrics.connect_failed();
        connecting.failed.push(addr);
    }
    debug!(client = %peer, service = %frontend.service, "no backend could be reached");
    None
}

/// Takes ownership of a descriptor accept4 returned.
pub(super) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor it just got and nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
