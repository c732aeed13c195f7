//! `ferry-bench-floor-proxy`: the least a TCP proxy can do per connection on this kernel, as
//! a yardstick for the forwarder benchmark. Not a product: no timeouts, no limits, no
//! balancing, no metrics, nothing a user would run.
//!
//! What it keeps is what every proxy of this kind must do: accept, connect, move bytes both
//! ways, pass each direction's end on as a half-close. What it drops is everything else a
//! proxy spends on a connection: one thread per core with its own `SO_REUSEPORT` listener and
//! edge-triggered epoll, no runtime, no task, no timer and no allocation per connection, one
//! read buffer per thread, reads that stop at a short read instead of asking again for
//! EAGAIN, the last data corked with its FIN, the backend's handshake ACK held for the
//! client's first bytes, and sockets closed without being taken out of epoll first. Its
//! threads sit on the CPUs as the forwarder's do (pinned, each taking its CPU's connections;
//! `--pin-threads false` to leave them to the scheduler). Its figures against HAProxy's are
//! how far ahead of HAProxy any proxy could be here.
//!
//! `ferry-bench-floor-proxy --route 10.0.0.1:80,127.0.0.1:30280 [--route …]`

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

use anyhow::Context as _;
use clap::Parser;
use ferry_forwarder::userspace::affinity;
use socket2::{Domain, Socket, Type};

#[derive(Debug, Parser)]
struct Args {
    /// `LISTEN,BACKEND`: connections to LISTEN are relayed to BACKEND.
    #[arg(long = "route", value_parser = route, required = true)]
    routes: Vec<(SocketAddr, SocketAddr)>,
    /// Pin each thread to a CPU of its own and have the kernel hand it that CPU's
    /// connections, as the forwarder does (`ferry_forwarder::userspace::affinity`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pin_threads: bool,
}

fn route(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, to) = s.split_once(',').ok_or("expected LISTEN,BACKEND")?;
    Ok((
        listen.parse().map_err(|e| format!("{listen}: {e}"))?,
        to.parse().map_err(|e| format!("{to}: {e}"))?,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = affinity::placement(&affinity::allowed_cpus(), threads, args.pin_threads);
    let mut handles = Vec::new();
    for (i, cpu) in cpus.into_iter().enumerate() {
        let listeners = args
            .routes
            .iter()
            .map(|(listen, to)| Ok((listener(*listen)?, *to)))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("binding the listeners")?;
        if let Some(cpu) = cpu {
            for (l, _) in &listeners {
                affinity::prefer_cpu(l, cpu).context("SO_INCOMING_CPU")?;
            }
        }
        handles.push(
            std::thread::Builder::new()
                .name(format!("floor-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        affinity::pin(cpu)?;
                    }
                    run(listeners)
                })?,
        );
    }
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("a thread panicked"))?
            .context("a thread failed")?;
    }
    Ok(())
}

fn listener(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket)
}

/// Read at most this much per call.
const CHUNK: usize = 64 * 1024;
/// Listeners' tokens start here; below it a token is a connection's slot × 2 + its side.
const LISTENERS: u64 = 1 << 62;

/// One direction of a connection: bytes read from one side, sent to the other.
#[derive(Default)]
struct Direction {
    /// What the receiver has not taken yet.
    pending: Vec<u8>,
    /// The sender has finished (EOF read).
    ended: bool,
    /// Its end has been passed on.
    passed: bool,
}

struct Conn {
    /// Client, backend.
    fds: [RawFd; 2],
    /// Readiness as epoll last reported it and the calls since left it.
    readable: [bool; 2],
    writable: [bool; 2],
    /// The peer has finished sending (EPOLLRDHUP): the next short read is the last data.
    closing: [bool; 2],
    connected: bool,
    /// Client → backend, backend → client.
    dirs: [Direction; 2],
}

fn sys(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn epoll_add(epoll: RawFd, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl reads one event that lives for the call.
    let r = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
    sys(r as isize).map(drop)
}

fn run(listeners: Vec<(Socket, SocketAddr)>) -> io::Result<()> {
    // SAFETY: epoll_create1 has no preconditions.
    let epoll = sys(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize)? as RawFd;
    for (i, (l, _)) in listeners.iter().enumerate() {
        epoll_add(
            epoll,
            l.as_raw_fd(),
            LISTENERS + i as u64,
            libc::EPOLLIN as u32,
        )?;
    }
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut scratch = vec![0u8; CHUNK];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: epoll_wait writes at most `events.len()` events into `events`.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        let n = match sys(n as isize) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in events.iter().take(n) {
            let (token, flags) = (event.u64, event.events);
            if token >= LISTENERS {
                let Some((listener, to)) = listeners.get((token - LISTENERS) as usize) else {
                    continue;
                };
                accept_all(epoll, listener, *to, &mut conns, &mut free, &mut scratch);
                continue;
            }
            let (slot, side) = ((token / 2) as usize, (token % 2) as usize);
            let Some(Some(conn)) = conns.get_mut(slot) else {
                continue;
            };
            if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                != 0
            {
                conn.readable[side] = true;
            }
            if flags & libc::EPOLLRDHUP as u32 != 0 {
                conn.closing[side] = true;
            }
            if flags & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                conn.writable[side] = true;
            }
            if side == 1 && !conn.connected {
                if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    close(&mut conns, &mut free, slot);
                    continue;
                }
                conn.connected = flags & libc::EPOLLOUT as u32 != 0;
            }
            if step(conn, &mut scratch).unwrap_or(true) {
                close(&mut conns, &mut free, slot);
            }
        }
    }
}

fn accept_all(
    epoll: RawFd,
    listener: &Socket,
    to: SocketAddr,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
    scratch: &mut [u8],
) {
    loop {
        // SAFETY: accept4 without an address to fill in.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        let Ok(fd) = sys(fd as isize) else { return };
        // SAFETY: accept4 returned a descriptor nothing else owns.
        let client = unsafe { Socket::from_raw_fd(fd as RawFd) };
        // The client's first bytes, when they are already here, leave with the handshake's
        // last ACK to the backend.
        // SAFETY: recv writes at most `scratch.len()` bytes into `scratch`.
        let got = unsafe {
            libc::recv(
                client.as_raw_fd(),
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let early = usize::try_from(got).unwrap_or(0);
        let Ok(backend) = Socket::new(Domain::for_address(to), Type::STREAM.nonblocking(), None)
        else {
            continue;
        };
        if backend.set_tcp_nodelay(true).is_err()
            || (early > 0 && backend.set_tcp_quickack(false).is_err())
        {
            continue;
        }
        let connected = match backend.connect(&to.into()) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(_) => continue,
        };
        let slot = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        let fds = [client.into_raw_fd(), backend.into_raw_fd()];
        let mut conn = Conn {
            fds,
            readable: [false; 2],
            writable: [true, connected],
            closing: [false; 2],
            connected,
            dirs: Default::default(),
        };
        conn.dirs[0].pending = scratch.get(..early).unwrap_or_default().to_vec();
        let edge = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        let added = fds
            .iter()
            .enumerate()
            .all(|(side, fd)| epoll_add(epoll, *fd, (slot * 2 + side) as u64, edge).is_ok());
        if let Some(place) = conns.get_mut(slot) {
            *place = Some(conn);
        }
        if !added {
            close(conns, free, slot);
        }
    }
}

/// Moves what can be moved now in both directions; true when the connection is done.
fn step(conn: &mut Conn, scratch: &mut [u8]) -> io::Result<bool> {
    if !conn.connected {
        return Ok(false);
    }
    for d in 0..2 {
        pump(conn, d, scratch)?;
    }
    Ok(conn.dirs.iter().all(|d| d.passed))
}

/// Direction `d`: from side `d` to side `1 - d`.
fn pump(conn: &mut Conn, d: usize, scratch: &mut [u8]) -> io::Result<()> {
    let (from, to) = (d, 1 - d);
    loop {
        let dir = &mut conn.dirs[d];
        if !dir.pending.is_empty() {
            if !conn.writable[to] {
                return Ok(());
            }
            let sent = send(conn.fds[to], &dir.pending, false)?;
            dir.pending.drain(..sent);
            if !dir.pending.is_empty() {
                conn.writable[to] = false;
                return Ok(());
            }
        }
        if dir.ended {
            if !dir.passed {
                dir.passed = true;
                // When the other direction is done too, closing sends the FIN.
                if !conn.dirs[1 - d].passed {
                    // SAFETY: shutdown on a socket this connection owns.
                    unsafe { libc::shutdown(conn.fds[to], libc::SHUT_WR) };
                }
            }
            return Ok(());
        }
        if !conn.readable[from] {
            return Ok(());
        }
        // SAFETY: recv writes at most `scratch.len()` bytes into `scratch`.
        let got = unsafe { libc::recv(conn.fds[from], scratch.as_mut_ptr().cast(), CHUNK, 0) };
        let n = match sys(got) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.readable[from] = false;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            dir.ended = true;
            continue;
        }
        let last = n < CHUNK && conn.closing[from];
        if n < CHUNK {
            conn.readable[from] = false;
        }
        let data = scratch.get(..n).unwrap_or_default();
        let sent = if conn.writable[to] {
            send(conn.fds[to], data, last)?
        } else {
            0
        };
        if sent < n {
            conn.writable[to] = false;
            dir.pending
                .extend_from_slice(data.get(sent..).unwrap_or_default());
        }
        if last {
            dir.ended = true;
        }
    }
}

/// What `fd` takes of `buf` now (0 when its buffer is full).
fn send(fd: RawFd, buf: &[u8], corked: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | if corked { libc::MSG_MORE } else { 0 };
    // SAFETY: send reads at most `buf.len()` bytes from memory `buf` borrows.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
    match sys(n) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

fn close(conns: &mut [Option<Conn>], free: &mut Vec<usize>, slot: usize) {
    if let Some(conn) = conns.get_mut(slot).and_then(Option::take) {
        for fd in conn.fds {
            // SAFETY: the connection owned these descriptors; close also takes them out of
            // epoll, as nothing else holds them.
            unsafe { libc::close(fd) };
        }
        free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

    #[test]
    fn relays_both_ways_and_passes_each_end_on() {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let front = listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let front_addr = front.local_addr().unwrap().as_socket().unwrap();
        let to = backend.local_addr().unwrap();
        std::thread::spawn(move || run(vec![(front, to)]));

        for _ in 0..3 {
            let mut client = TcpStream::connect(front_addr).unwrap();
            let (mut server, _) = backend.accept().unwrap();
            let request: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
            client.write_all(&request).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            assert_eq!(got, request);
            // The backend answers after the client's half-close, then closes.
            server.write_all(b"answer").unwrap();
            drop(server);
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).unwrap();
            assert_eq!(answer, b"answer");
        }
    }
}
