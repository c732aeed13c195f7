//! How many sockets the process may hold, and the connection limit that follows: every
//! relayed TCP connection costs two.

/// Lets the process hold as many sockets as it may (as root with CAP_SYS_RESOURCE, past the
/// hard limit up to `fs.nr_open`, at most 2^20; else up to the hard limit). Returns the
/// open-file limit in force afterwards.
pub fn raise_open_files_limit() -> u64 {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    // SAFETY: getrlimit/setrlimit on stack values.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let up = ceiling.max(lim.rlim_max);
        let want = libc::rlimit {
            rlim_cur: up,
            rlim_max: up,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return up;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// The connection limit the open-file limit allows: two sockets per connection, with room
/// kept for watches, listeners, health checks and UDP flows.
pub fn connection_limit(configured: u32, open_files: u64) -> usize {
    let affordable = open_files.saturating_sub(1024) / 2;
    (configured as u64).min(affordable).max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_fits_the_open_file_limit() {
        assert_eq!(connection_limit(65_536, 1 << 20), 65_536);
        assert_eq!(connection_limit(65_536, 20_000), 9_488);
        assert_eq!(connection_limit(100, 20_000), 100);
        assert_eq!(connection_limit(100, 512), 1);
    }
}
