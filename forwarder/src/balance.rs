//! Choosing a backend for a new connection or flow: round robin over the healthy backends,
//! or, with `sessionAffinity: ClientIP`, the backend this client used last while that was
//! within the timeout. The affinity table is bounded; when full, the least recently seen
//! client goes, in O(1): a queue in the order clients were last seen (a refresh appends, and
//! the stale older position is skipped when it reaches the front; the queue is compacted when
//! it grows past twice the table), so a flood of new source addresses costs each of them a
//! constant amount of work under the lock, never a scan of the table.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Entries kept per frontend at most; a client beyond that loses its stickiness, not service.
pub const AFFINITY_LIMIT: usize = 65_536;

#[derive(Debug)]
pub struct Balancer {
    next: AtomicUsize,
    affinity: Option<Mutex<Affinity>>,
}

#[derive(Debug)]
struct Affinity {
    timeout: Duration,
    limit: usize,
    entries: HashMap<IpAddr, (SocketAddr, Instant)>,
    /// Clients in the order they were last seen; an element is current while its time is
    /// the entry's.
    order: VecDeque<(IpAddr, Instant)>,
}

impl Affinity {
    fn is_current(&self, ip: &IpAddr, at: Instant) -> bool {
        self.entries.get(ip).is_some_and(|(_, seen)| *seen == at)
    }

    /// Notes `client` on `backend` at `now`.
    fn touch(&mut self, client: IpAddr, backend: SocketAddr, now: Instant) {
        self.entries.insert(client, (backend, now));
        self.order.push_back((client, now));
        if self.order.len() > 2 * self.limit.max(8) {
            let entries = &self.entries;
            self.order
                .retain(|(ip, at)| entries.get(ip).is_some_and(|(_, seen)| seen == at));
        }
    }

    /// Removes the least recently seen client.
    fn evict_one(&mut self) {
        while let Some((ip, at)) = self.order.pop_front() {
            if self.is_current(&ip, at) {
                self.entries.remove(&ip);
                return;
            }
        }
    }
}

impl Balancer {
    pub fn new(affinity: Option<Duration>) -> Self {
        Self::with_limit(affinity, AFFINITY_LIMIT)
    }

    pub fn with_limit(affinity: Option<Duration>, limit: usize) -> Self {
        Self {
            next: AtomicUsize::new(0),
            affinity: affinity.map(|timeout| {
                Mutex::new(Affinity {
                    timeout,
                    limit: limit.max(1),
                    entries: HashMap::new(),
                    order: VecDeque::new(),
                })
            }),
        }
    }

    /// The backend for `client` among `backends`, skipping those in `failed` (backends a
    /// connect to has just failed for this client). `None` when nothing is left.
    pub fn pick(
        &self,
        client: IpAddr,
        backends: &[SocketAddr],
        failed: &[SocketAddr],
        now: Instant,
    ) -> Option<SocketAddr> {
        let usable = |b: &SocketAddr| !failed.contains(b);
        let Some(affinity) = &self.affinity else {
            return self.round_robin(backends, usable);
        };
        let mut table = affinity.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = table.timeout;
        if let Some((backend, seen)) = table.entries.get(&client).copied()
            && now.saturating_duration_since(seen) < timeout
            && backends.contains(&backend)
            && usable(&backend)
        {
            table.touch(client, backend, now);
            return Some(backend);
        }
        let chosen = self.round_robin(backends, usable)?;
        if !table.entries.contains_key(&client) && table.entries.len() >= table.limit {
            table.evict_one();
        }
        table.touch(client, chosen, now);
        Some(chosen)
    }

    fn round_robin(
        &self,
        backends: &[SocketAddr],
        usable: impl Fn(&SocketAddr) -> bool,
    ) -> Option<SocketAddr> {
        if backends.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..backends.len())
            .map(|i| backends[(start + i) % backends.len()])
            .find(|b| usable(b))
    }

    /// Affinity entries held now (for tests and metrics).
    pub fn affinity_entries(&self) -> usize {
        self.affinity.as_ref().map_or(0, |a| {
            a.lock().unwrap_or_else(|e| e.into_inner()).entries.len()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 30080)))
            .collect()
    }

    fn client(i: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, i])
    }

    #[test]
    fn round_robin_visits_every_backend_in_turn() {
        let b = Balancer::new(None);
        let backends = addrs(3);
        let now = Instant::now();
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick(client(1), &backends, &[], now).unwrap())
            .collect();
        assert_eq!(&picks[..3], &picks[3..]);
        let mut distinct = picks[..3].to_vec();
        distinct.sort();
        assert_eq!(distinct, backends);
    }

    #[test]
    fn failed_backends_are_skipped_and_none_left_is_none() {
        let b = Balancer::new(None);
        let backends = addrs(2);
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(
                b.pick(client(1), &backends, &backends[..1], now),
                Some(backends[1])
            );
        }
        assert_eq!(b.pick(client(1), &backends, &backends, now), None);
        assert_eq!(b.pick(client(1), &[], &[], now), None);
    }

    #[test]
    fn client_ip_affinity_sticks_until_the_timeout() {
        let b = Balancer::new(Some(Duration::from_secs(10)));
        let backends = addrs(3);
        let t0 = Instant::now();
        let first = b.pick(client(1), &backends, &[], t0).unwrap();
        for s in 1..5 {
            let t = t0 + Duration::from_secs(s * 5);
            assert_eq!(b.pick(client(1), &backends, &[], t), Some(first));
        }
        // Another client moves the round robin on; after the timeout client 1 may move too.
        let other = b.pick(client(2), &backends, &[], t0).unwrap();
        assert_ne!(other, first);
    }

    #[test]
    fn affinity_to_a_backend_that_left_or_failed_is_replaced() {
        let b = Balancer::new(Some(Duration::from_secs(10)));
        let backends = addrs(3);
        let now = Instant::now();
        let first = b.pick(client(1), &backends, &[], now).unwrap();
        let rest: Vec<_> = backends.iter().copied().filter(|x| *x != first).collect();
        let second = b.pick(client(1), &rest, &[], now).unwrap();
        assert_ne!(second, first);
        assert_eq!(b.pick(client(1), &backends, &[], now), Some(second));
        let third = b.pick(client(1), &backends, &[second], now).unwrap();
        assert_ne!(third, second);
    }

    #[test]
    fn the_affinity_table_is_bounded() {
        let b = Balancer::with_limit(Some(Duration::from_secs(3600)), 100);
        let backends = addrs(3);
        let now = Instant::now();
        for i in 0..=255u8 {
            b.pick(
                client(i),
                &backends,
                &[],
                now + Duration::from_millis(u64::from(i)),
            );
        }
        assert!(b.affinity_entries() <= 100, "{}", b.affinity_entries());
    }

    #[test]
    fn a_flood_of_new_clients_evicts_the_least_recently_seen_and_keeps_the_regulars() {
        let b = Balancer::with_limit(Some(Duration::from_secs(3600)), 1000);
        let backends = addrs(3);
        let t0 = Instant::now();
        let regular = IpAddr::from([203, 0, 113, 1]);
        let home = b.pick(regular, &backends, &[], t0).unwrap();
        // 100,000 distinct IPv6 sources, none of them expired; the regular client comes back
        // every 100 of them.
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) + 1);
            let src = IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | u128::from(i),
            ));
            b.pick(src, &backends, &[], now);
            if i % 100 == 0 {
                assert_eq!(b.pick(regular, &backends, &[], now), Some(home), "at {i}");
            }
            assert!(b.affinity_entries() <= 1000);
        }
        let table = b.affinity.as_ref().unwrap().lock().unwrap();
        assert!(
            table.order.len() <= 2 * 1000 + 1,
            "the order queue stays bounded: {}",
            table.order.len()
        );
    }
}
