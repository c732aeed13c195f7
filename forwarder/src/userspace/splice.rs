//! Zero-copy relaying for bulk transfers: socket → pipe → socket with splice(2), so the bytes
//! of a long download never cross into userspace. A direction switches to it once a read
//! fills the whole copy buffer (a short request/response exchange never does, and costs the
//! same two system calls either way); pipes are few and bounded, past the bound a direction
//! keeps copying. Both ends are non-blocking: the relay (`relay`) calls when epoll says so.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes a pipe holds (and one splice moves) at most.
pub(super) const PIPE_SIZE: usize = 256 * 1024;
/// Pipes open at once over the whole process (two descriptors each, within the descriptors
/// the connection limit leaves free).
const MAX_PIPES: usize = 256;
static PIPES: AtomicUsize = AtomicUsize::new(0);

/// A pipe between two sockets; counted against `MAX_PIPES` while it lives.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new pipe, or `None` when the budget is spent or the system refuses one.
    pub(super) fn new() -> Option<Self> {
        if PIPES.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            PIPES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills the two-element array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            PIPES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per call; the default (64 KiB) still works when refused.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Some(Self { read, write })
    }
}

impl Pipe {
    pub(super) fn read(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub(super) fn write(&self) -> RawFd {
        self.write.as_raw_fd()
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Moves up to `len` bytes from `from` to `to` (one of them a pipe end) without waiting:
/// the bytes moved, 0 at the sender's end, WouldBlock when nothing could move.
pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors we hold, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
