//! Where the TCP engines run. When the forwarder has an engine for every CPU it may use,
//! each engine is pinned to a CPU of its own, and its listeners ask the kernel for the
//! connections whose handshake that CPU handled (`SO_INCOMING_CPU`, which SO_REUSEPORT
//! groups honour since Linux 6.1). A connection is then accepted, read and relayed on the
//! CPU that already holds its socket in cache, and no wake-up crosses to another CPU. On
//! 2026-12-04 (five runs, 2 cores) the floor proxy placed this way made 1.21 × the new
//! connections/s of the same proxy unpinned, at 44.6 against 54.2 µs of CPU per connection
//! (docs/results.md, "Engines on the CPU of their connections").
//!
//! Not pinned when there are fewer engines than CPUs the process may use (a CPU quota: an
//! engine pinned to one CPU of many would get only that CPU's connections and could not
//! leave it when it is busy), when pinning fails, or when turned off (`--pin-threads=false`).
//! On a kernel whose SO_REUSEPORT groups ignore `SO_INCOMING_CPU` the kernel spreads
//! connections by hash, as without pinning.

use std::io;
use std::os::fd::AsFd;

/// The CPUs this process may run on, in ascending order (empty if the kernel does not say).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads bit `cpu` of `set`, below its size.
    (0..max)
        .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
        .collect()
}

/// The CPU each of `engines` engines is pinned to: one each when there are as many engines
/// as `allowed` CPUs and pinning is wanted, none otherwise.
pub fn placement(allowed: &[usize], engines: usize, pin: bool) -> Vec<Option<usize>> {
    if pin && engines == allowed.len() {
        allowed.iter().map(|cpu| Some(*cpu)).collect()
    } else {
        vec![None; engines]
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> io::Result<()> {
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: cpu_set_t is plain bits; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` of `set`, checked to be below its size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the set, which lives for the call; 0 is this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to hand `listener` the connections whose handshake `cpu` handled.
pub fn prefer_cpu(listener: &impl AsFd, cpu: usize) -> io::Result<()> {
    socket2::SockRef::from(listener).set_cpu_affinity(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cpu_each_only_when_every_allowed_cpu_has_an_engine() {
        assert_eq!(
            placement(&[2, 3, 6], 3, true),
            vec![Some(2), Some(3), Some(6)]
        );
        // A CPU quota left fewer engines than CPUs: none pinned.
        assert_eq!(placement(&[0, 1, 2, 3], 2, true), vec![None, None]);
        assert_eq!(placement(&[0, 1], 2, false), vec![None, None]);
        assert_eq!(placement(&[], 1, true), vec![None]);
    }

    #[test]
    fn the_process_may_run_somewhere_and_a_thread_is_pinned_where_asked() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        let cpu = *allowed.last().unwrap();
        let thread = std::thread::spawn(move || {
            pin(cpu).unwrap();
            allowed_cpus()
        });
        assert_eq!(thread.join().unwrap(), vec![cpu]);
        assert_eq!(allowed_cpus(), allowed, "only that thread");
    }

    #[test]
    fn a_listener_takes_a_preferred_cpu() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        prefer_cpu(&l, 0).unwrap();
        assert_eq!(socket2::SockRef::from(&l).cpu_affinity().unwrap(), 0);
    }
}
