//! Zero-copy relaying for bulk transfers: socket → pipe → socket with splice(2), so the bytes
//! of a long download never cross into userspace. A direction switches to it once a read
//! fills the whole copy buffer (a short request/response exchange never does, and costs the
//! same two system calls either way); pipes are few and bounded, past the bound a direction
//! keeps copying.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe holds (and one splice moves) at most.
const PIPE_SIZE: usize = 256 * 1024;
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

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::Relaxed);
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
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
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves what `from` has (up to a pipe's worth) into `pipe`, waiting for data first; 0 means
/// the sender has finished. A short move emptied the socket, so it also clears tokio's
/// readiness, as `read_some` does.
pub(super) async fn fill(stream: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        let mut got = 0;
        let result = stream.try_io(Interest::READABLE, || {
            got = splice(stream.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)?;
            if got > 0 && got < PIPE_SIZE {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if got > 0 {
            return Ok(got);
        }
        match result {
            Ok(()) => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Moves `n` bytes from `pipe` into `to`, waiting for room as needed, counting into `moved`
/// as it goes.
pub(super) async fn drain(
    pipe: &Pipe,
    stream: &TcpStream,
    mut n: usize,
    moved: &AtomicU64,
) -> io::Result<()> {
    while n > 0 {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), stream.as_raw_fd(), n)
        }) {
            Ok(sent) => {
                moved.fetch_add(sent as u64, Ordering::Relaxed);
                n -= sent;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
