//! The TCP engine of one data-plane thread: its listeners (one per frontend, bound with
//! SO_REUSEPORT beside the other threads' own) and their connections, on one edge-triggered
//! epoll the thread waits on. A connection is an entry in a slab, not a task: no allocation,
//! waker or timer per connection, and no system call the connection does not need (`relay`).
//! The thread runs no async runtime: one `epoll_wait`, with the time until the next thing
//! due as its timeout, is the whole wait (a tokio task watching a nested epoll made two).
//!
//! Bounded everywhere: a connection limit shared by all frontends and threads, and fairly
//! between Services (`fairness`). At the limit a listener holds one client waiting for the
//! next free place and the kernel's backlog holds the rest. Waiting clients look for a place
//! every 20 ms, on every thread alike; a place goes to whichever looks first, not strictly
//! in the order the clients came.
//! Connect, idle and half-close timeouts come from one sweep over the slab, a quarter of the
//! shortest timeout apart (at most a second), only while there are connections.
//!
//! Commands from the control side (`Command`) add and remove listeners; removing one closes
//! its connections.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockAddr;
use std::sync::mpsc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use tracing::warn;

use super::Shared;
use super::affinity;
use super::epoll::Epoll;
use super::relay::{self, Conn, Place, Step, Timeouts};
use crate::metrics::DataplaneMetrics;
use crate::plan::Frontend;

/// How often a client waiting for a place looks again.
const WAITING_POLL: Duration = Duration::from_millis(20);
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;
/// Listener tokens carry this bit; a connection's token is its slot × 2 + its side.
const LISTENER: u64 = 1 << 62;
/// The token of the eventfd the control side wakes the thread with.
const WAKE: u64 = u64::MAX;

pub(super) enum Command {
    Listen {
        id: u64,
        socket: std::net::TcpListener,
        shared: Arc<Shared>,
    },
    Stop(u64),
    /// Close everything and end the thread.
    Shutdown,
}

struct Listening {
    socket: std::net::TcpListener,
    shared: Arc<Shared>,
    /// A client accepted while there was no place for it.
    waiting: Option<(OwnedFd, SocketAddr)>,
    /// After accept failed (out of descriptors or memory): when to try again.
    paused_until: Option<Instant>,
    accept_errors: u32,
}

struct Engine<'a> {
    epoll: &'a Epoll,
    listeners: HashMap<u64, Listening>,
    /// Listeners with a client waiting for a place or paused after a failed accept: the
    /// only ones a tick looks at (a node may have thousands of listeners).
    stalled: Vec<u64>,
    conns: Vec<Option<Conn>>,
    /// Connections whose last turn ended with more to move: resumed before the next wait,
    /// which then does not block.
    busy: Vec<usize>,
    /// When clients waiting for a place look again.
    next_retry: Instant,
    /// Slots free for new connections, and slots freed during the current batch of events
    /// (reused only after it, so an event still queued for a closed connection's other
    /// socket cannot reach a new one).
    free: Vec<usize>,
    freed: Vec<usize>,
    open: usize,
    scratch: Vec<u8>,
    events: Vec<libc::epoll_event>,
    limit: Arc<Semaphore>,
    connect_timeout: Duration,
    timeouts: Timeouts,
    period: Duration,
    last_sweep: Instant,
    /// Connections this engine accepted (its own series: no other thread writes it).
    accepted: Counter,
    /// How its connections move bulk transfers: copied on a pinned thread, whose
    /// connections' data is in its CPU's cache, spliced otherwise.
    bulk: relay::Bulk,
}

/// The sweep's period: a quarter of the shortest timeout, between 10 ms and a second.
fn period(connect: Duration, timeouts: Timeouts) -> Duration {
    (timeouts.idle.min(timeouts.half_close).min(connect) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// One engine's thread, as the control side holds it: commands go in through a channel,
/// and an eventfd in the engine's epoll wakes the thread to read them.
pub(super) struct Handle {
    commands: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
    /// The CPU the thread is pinned to (`affinity`).
    cpu: Option<usize>,
}

impl Handle {
    /// Starts engine `index` on a thread of its own, pinned to `cpu` when given (and the
    /// kernel lets it).
    pub(super) fn start(
        index: usize,
        cpu: Option<usize>,
        metrics: &Arc<DataplaneMetrics>,
        limit: Arc<Semaphore>,
        connect_timeout: Duration,
        timeouts: Timeouts,
    ) -> io::Result<Handle> {
        let epoll = Epoll::new()?;
        // SAFETY: eventfd has no preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let wake = Arc::new(relay::owned(fd));
        epoll.add_listener(wake.as_raw_fd(), WAKE)?;
        let (commands, received) = mpsc::channel();
        let woken = wake.clone();
        let (pinned_tx, pinned) = mpsc::channel();
        let metrics = metrics.clone();
        let name = format!("ferry-tcp-{index}");
        std::thread::Builder::new().name(name).spawn(move || {
            let cpu = cpu.filter(|cpu| match affinity::pin(*cpu) {
                Ok(()) => true,
                Err(err) => {
                    warn!(cpu, error = %err, "cannot pin a data-plane thread to its CPU");
                    false
                }
            });
            let _ = pinned_tx.send(cpu);
            let accepted = metrics.engine(index, cpu);
            let mut engine = Engine {
                epoll: &epoll,
                listeners: HashMap::new(),
                stalled: Vec::new(),
                conns: Vec::new(),
                busy: Vec::new(),
                next_retry: Instant::now(),
                free: Vec::new(),
                freed: Vec::new(),
                open: 0,
                scratch: vec![0; relay::CHUNK],
                events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
                limit,
                connect_timeout,
                timeouts,
                period: period(connect_timeout, timeouts),
                last_sweep: Instant::now(),
                accepted,
                bulk: if cpu.is_some() {
                    relay::Bulk::Copy
                } else {
                    relay::Bulk::Splice
                },
            };
            engine.run(&received, &woken);
        })?;
        // The thread says first thing where it runs.
        let cpu = pinned.recv().unwrap_or(None);
        Ok(Handle {
            commands,
            wake,
            cpu,
        })
    }

    /// The CPU the engine's thread is pinned to, whose connections its listeners ask for.
    pub(super) fn cpu(&self) -> Option<usize> {
        self.cpu
    }

    /// Hands `command` to the engine and wakes it.
    pub(super) fn send(&self, command: Command) -> io::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| io::Error::other("a data-plane thread has stopped"))?;
        let one: u64 = 1;
        // SAFETY: write(2) of eight bytes that live for the call, to an eventfd we hold.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The thread closes every listener and connection and ends.
        let _ = self.send(Command::Shutdown);
    }
}

impl Engine<'_> {
    /// Waits for events, commands and what falls due, until told to shut down.
    fn run(&mut self, commands: &mpsc::Receiver<Command>, wake: &OwnedFd) {
        loop {
            let timeout = if !self.busy.is_empty() {
                0
            } else {
                self.next_wake().map_or(-1, |at| {
                    let left = at.saturating_duration_since(Instant::now());
                    // Rounded up: waking a moment early would only wait again.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                })
            };
            match self.take_events(timeout) {
                Ok(true) => {
                    let mut count = [0u8; 8];
                    // SAFETY: read(2) of at most eight bytes into `count`, from our eventfd.
                    unsafe { libc::read(wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                    while let Ok(command) = commands.try_recv() {
                        if matches!(command, Command::Shutdown) {
                            return;
                        }
                        self.command(command);
                    }
                }
                Ok(false) => {}
                Err(err) => {
                    warn!(error = %err, "the TCP engine's epoll failed");
                    return;
                }
            }
            self.resume_busy();
            self.tick(Instant::now());
        }
    }

    /// When the loop must wake without an event: the next sweep while there are
    /// connections, the next look for a place while a client waits, the end of a pause.
    fn next_wake(&self) -> Option<Instant> {
        let sweep = (self.open > 0).then(|| self.last_sweep + self.period);
        let stalled = self.stalled.iter().filter_map(|id| self.listeners.get(id));
        let mut waiting = None;
        let mut paused: Option<Instant> = None;
        for listener in stalled {
            if listener.waiting.is_some() {
                waiting = Some(self.next_retry);
            }
            paused = match (paused, listener.paused_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        [sweep, waiting, paused].into_iter().flatten().min()
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Listen { id, socket, shared } => {
                let fd = socket.as_raw_fd();
                if let Err(err) = self.epoll.add_listener(fd, LISTENER | id) {
                    warn!(error = %err, "cannot watch a listener");
                    return;
                }
                self.listeners.insert(
                    id,
                    Listening {
                        socket,
                        shared,
                        waiting: None,
                        paused_until: None,
                        accept_errors: 0,
                    },
                );
                // Connections may have queued between the bind and now: the edge was before
                // the listener was watched.
                self.accept(id, Instant::now());
            }
            Command::Shutdown => {}
            Command::Stop(id) => {
                self.listeners.remove(&id);
                self.stalled.retain(|s| *s != id);
                for slot in 0..self.conns.len() {
                    if let Some(Some(conn)) = self.conns.get(slot)
                        && conn.listener == id
                    {
                        self.close(slot, false);
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` ms (-1: for ever) for events and handles them; true when the
    /// control side woke the thread.
    fn take_events(&mut self, timeout: i32) -> io::Result<bool> {
        let mut events = std::mem::take(&mut self.events);
        let result = self.epoll.wait(&mut events, timeout);
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                self.events = events;
                return Err(err);
            }
        };
        let now = Instant::now();
        let mut woken = false;
        for event in events.iter().take(n) {
            let (token, flags) = (event.u64, event.events);
            if token == WAKE {
                woken = true;
                continue;
            }
            if token & LISTENER != 0 {
                self.accept(token & !LISTENER, now);
                continue;
            }
            let (slot, side) = ((token / 2) as usize, (token % 2) as usize);
            let epoll = self.epoll;
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            let step = conn.event(side, flags, epoll, token & !1, &mut self.scratch, now);
            // An event still queued for this connection's other socket must not reach a
            // new connection in its slot.
            self.settle(slot, step, true);
        }
        self.events = events;
        self.free.append(&mut self.freed);
        Ok(woken)
    }

    /// Gives the connections that had more to move their next turn.
    fn resume_busy(&mut self) {
        for slot in std::mem::take(&mut self.busy) {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            let step = conn.relay(&mut self.scratch);
            self.settle(slot, step, false);
        }
    }

    /// What follows a connection's turn: closed, resumed before the next wait, or left
    /// until its next event.
    fn settle(&mut self, slot: usize, step: Step, in_batch: bool) {
        match step {
            Step::Done => self.close(slot, in_batch),
            Step::Busy => self.busy.push(slot),
            Step::Open => {}
        }
    }

    /// Closes the connection in `slot` (closing its sockets also takes them out of epoll).
    /// A slot freed during a batch of events is reused only after it (`freed`).
    fn close(&mut self, slot: usize, in_batch: bool) {
        let Some(place) = self.conns.get_mut(slot) else {
            return;
        };
        if place.take().is_none() {
            return;
        }
        self.open -= 1;
        if in_batch {
            self.freed.push(slot);
        } else {
            self.free.push(slot);
        }
    }

    /// Accepts on listener `id` until its queue is empty, a client waits for a place, or
    /// accept fails.
    fn accept(&mut self, id: u64, now: Instant) {
        loop {
            let Some(listener) = self.listeners.get_mut(&id) else {
                return;
            };
            if listener.waiting.is_some() || listener.paused_until.is_some() {
                return;
            }
            let lfd = listener.socket.as_raw_fd();
            // SAFETY: accept4 fills at most `len` bytes of the storage socket2 provides.
            let accepted = unsafe {
                SockAddr::try_init(|storage, len| {
                    let fd = libc::accept4(
                        lfd,
                        storage.cast(),
                        len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    );
                    if fd < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(fd)
                    }
                })
            };
            let (client, peer) = match accepted {
                Ok((fd, addr)) => {
                    let client = relay::owned(fd);
                    listener.accept_errors = 0;
                    let Some(peer) = addr.as_socket() else {
                        continue;
                    };
                    (client, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(err) => {
                    // Out of file descriptors or memory: back off rather than spin.
                    listener.accept_errors += 1;
                    if listener.accept_errors == 1 {
                        warn!(error = %err, "accept failed");
                    }
                    let wait = Duration::from_millis(10 << listener.accept_errors.min(6));
                    listener.paused_until = Some(now + wait);
                    self.stalled.push(id);
                    return;
                }
            };
            self.accepted.inc();
            let frontend = listener.shared.frontend();
            if !frontend.admits(&peer.ip()) {
                listener.shared.metrics.refused();
                continue;
            }
            match place(&listener.shared, &self.limit) {
                Some(place) => self.open_conn(id, frontend, client, peer, place, now),
                None => {
                    listener.waiting = Some((client, peer));
                    self.stalled.push(id);
                    return;
                }
            }
        }
    }

    fn open_conn(
        &mut self,
        id: u64,
        frontend: Arc<Frontend>,
        client: OwnedFd,
        peer: SocketAddr,
        place: Place,
        now: Instant,
    ) {
        let Some(listener) = self.listeners.get(&id) else {
            return;
        };
        let shared = listener.shared.clone();
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = (slot as u64) * 2;
        let conn = Conn::open(
            id,
            client,
            peer,
            frontend,
            shared,
            place,
            self.epoll,
            token,
            &mut self.scratch,
            now,
            self.bulk,
        );
        match (conn, self.conns.get_mut(slot)) {
            (Some(conn), Some(entry)) => {
                if self.open == 0 {
                    // The sweep's clock starts with the first connection.
                    self.last_sweep = now;
                }
                *entry = Some(conn);
                self.open += 1;
            }
            _ => self.free.push(slot),
        }
    }

    /// What is due: the sweep, places for waiting clients, listeners whose pause is over.
    fn tick(&mut self, now: Instant) {
        if self.open > 0 && now >= self.last_sweep + self.period {
            self.last_sweep = now;
            self.sweep(now);
        }
        if self.stalled.is_empty() {
            return;
        }
        // Waiting clients look again on a fixed beat, not whenever this thread has had
        // events: a busy thread would otherwise take every place freed before a quiet
        // thread's clients looked.
        let retry = now >= self.next_retry;
        if retry {
            self.next_retry = now + WAITING_POLL;
        }
        for id in std::mem::take(&mut self.stalled) {
            let Some(listener) = self.listeners.get_mut(&id) else {
                continue;
            };
            if listener.paused_until.is_some_and(|t| t > now)
                || (listener.waiting.is_some() && !retry)
            {
                self.stalled.push(id);
                continue;
            }
            listener.paused_until = None;
            if let Some((client, peer)) = listener.waiting.take() {
                match place(&listener.shared, &self.limit) {
                    // The plan as it is now: it may have changed while the client waited.
                    Some(place) => {
                        let frontend = listener.shared.frontend();
                        self.open_conn(id, frontend, client, peer, place, now);
                    }
                    None => {
                        listener.waiting = Some((client, peer));
                        self.stalled.push(id);
                        continue;
                    }
                }
            }
            // The listener's queue may have filled while it waited: no new edge reports it.
            self.accept(id, now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let epoll = self.epoll;
        for slot in 0..self.conns.len() {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            let token = (slot as u64) * 2;
            let step = conn.sweep(now, self.connect_timeout, self.timeouts, epoll, token);
            self.settle(slot, step, false);
        }
    }
}

/// A place for one more connection of `shared`'s Service, if the node's limit and the
/// Service's fair share allow one now.
fn place(shared: &Shared, limit: &Arc<Semaphore>) -> Option<Place> {
    if !shared.share.may_take() {
        return None;
    }
    let permit = limit.clone().try_acquire_owned().ok()?;
    Some((permit, shared.share.hold()))
}
