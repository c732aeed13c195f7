//! The few epoll(7) calls the TCP engine makes, on the epoll its thread waits on. Sockets are added edge-triggered for reading and writing at once and never
//! modified or deleted: closing a socket takes it out (nothing else holds its descriptor),
//! so a connection costs one `epoll_ctl` per socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub(super) const IN: u32 = libc::EPOLLIN as u32;
pub(super) const OUT: u32 = libc::EPOLLOUT as u32;
pub(super) const RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub(super) const HUP: u32 = libc::EPOLLHUP as u32;
pub(super) const ERR: u32 = libc::EPOLLERR as u32;
const ET: u32 = libc::EPOLLET as u32;

pub(super) struct Epoll(OwnedFd);

impl Epoll {
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A connection's socket, reported under `token` whenever it becomes readable, writable
    /// or closed.
    pub(super) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(fd, token, IN | OUT | RDHUP | ET)
    }

    /// A listener, reported under `token` when connections arrive.
    pub(super) fn add_listener(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(fd, token, IN | ET)
    }

    fn ctl(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl reads one event that lives for the call.
        let r = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` ms (-1: for ever, 0: not at all) for events, into `events`;
    /// how many (none when a signal interrupted the wait).
    pub(super) fn wait(&self, events: &mut [libc::epoll_event], timeout: i32) -> io::Result<usize> {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: epoll_wait writes at most `max` events into `events`.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, timeout) };
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                e => Err(e),
            },
        }
    }
}
