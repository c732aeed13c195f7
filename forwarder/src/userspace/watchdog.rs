//! Idle and half-close timeouts for a listener's TCP connections, from one periodic sweep
//! instead of timers per connection. A connection's `Watch` counts the bytes it has moved and
//! says when one direction has finished; the sweep (a quarter of the shortest timeout apart,
//! at most a second) notes when each count last changed and expires the connections quiet
//! for longer than their limit, waking them. A connection thus costs no timer (whose arming
//! would also wake its thread's event loop whenever it fell due before the loop's next
//! wake-up) and no clock read per message; a timeout fires up to one sweep late.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use super::relay::Timeouts;

/// What one connection shares with the sweep.
#[derive(Debug, Default)]
pub struct Watch {
    /// Bytes sent on, client → backend and backend → client.
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
    half_closed: AtomicBool,
    expired: AtomicBool,
    waker: AtomicWaker,
}

impl Watch {
    /// Marks one direction finished; returns whether the other one already had.
    pub(super) fn finish_direction(&self) -> bool {
        self.half_closed.swap(true, Ordering::Relaxed)
    }

    /// Resolves once the sweep has found this connection quiet for too long.
    pub(super) async fn expired(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.expired.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    fn moved(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }

    fn expire(&self) {
        self.expired.store(true, Ordering::Release);
        self.waker.wake();
    }
}

struct Watched {
    watch: Arc<Watch>,
    /// The count at the last sweep, and the first sweep that saw it (`None` until a sweep
    /// has seen the connection).
    moved: u64,
    since: Option<Instant>,
}

/// The connections of one listener, and their sweep.
pub struct Watchdog {
    timeouts: Timeouts,
    watched: Vec<Watched>,
}

impl Watchdog {
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            watched: Vec::new(),
        }
    }

    /// How often `sweep` should run.
    pub fn period(&self) -> Duration {
        (self.timeouts.idle.min(self.timeouts.half_close) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// A watch for a new connection.
    pub fn watch(&mut self) -> Arc<Watch> {
        let watch = Arc::new(Watch::default());
        self.watched.push(Watched {
            watch: watch.clone(),
            moved: 0,
            since: None,
        });
        watch
    }

    /// Connections watched (ended ones leave at the next sweep).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.watched.len()
    }

    /// Whether nothing is watched (so nothing needs sweeping).
    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// Forgets connections that have ended and expires those quiet past their limit.
    pub fn sweep(&mut self, now: Instant) {
        let Timeouts { idle, half_close } = self.timeouts;
        self.watched.retain_mut(|w| {
            // The connection dropped its end: it is over.
            if Arc::strong_count(&w.watch) == 1 || w.watch.expired.load(Ordering::Relaxed) {
                return false;
            }
            let moved = w.watch.moved();
            let since = match w.since {
                Some(since) if moved == w.moved => since,
                _ => {
                    (w.moved, w.since) = (moved, Some(now));
                    return true;
                }
            };
            let limit = if w.watch.half_closed.load(Ordering::Relaxed) {
                half_close.min(idle)
            } else {
                idle
            };
            if now.saturating_duration_since(since) >= limit {
                w.watch.expire();
                return false;
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watchdog(idle_ms: u64, half_ms: u64) -> Watchdog {
        Watchdog::new(Timeouts {
            idle: Duration::from_millis(idle_ms),
            half_close: Duration::from_millis(half_ms),
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_quiet_connection_expires_after_the_idle_timeout_and_a_busy_one_does_not() {
        let mut dog = watchdog(1000, 5000);
        let (quiet, busy) = (dog.watch(), dog.watch());
        let t0 = Instant::now();
        dog.sweep(t0);
        for step in 1..=4 {
            busy.up.fetch_add(10, Ordering::Relaxed);
            dog.sweep(t0 + ms(300 * step));
        }
        assert!(quiet.expired.load(Ordering::Relaxed), "quiet for 1.2 s");
        assert!(!busy.expired.load(Ordering::Relaxed));
        assert_eq!(dog.len(), 1, "the expired one is no longer watched");
    }

    #[test]
    fn a_half_closed_connection_gets_the_shorter_limit() {
        let mut dog = watchdog(10_000, 500);
        let open = dog.watch();
        let half = dog.watch();
        assert!(!half.finish_direction(), "the first direction to finish");
        assert!(half.finish_direction(), "the second sees the first");
        let t0 = Instant::now();
        dog.sweep(t0);
        dog.sweep(t0 + ms(600));
        assert!(half.expired.load(Ordering::Relaxed));
        assert!(!open.expired.load(Ordering::Relaxed));
    }

    #[test]
    fn quiet_time_counts_from_the_last_change_seen() {
        let mut dog = watchdog(1000, 1000);
        let w = dog.watch();
        let t0 = Instant::now();
        dog.sweep(t0);
        w.down.fetch_add(1, Ordering::Relaxed);
        dog.sweep(t0 + ms(900));
        dog.sweep(t0 + ms(1500));
        assert!(!w.expired.load(Ordering::Relaxed), "moved at 0.9 s");
        dog.sweep(t0 + ms(1900));
        assert!(w.expired.load(Ordering::Relaxed));
    }

    #[test]
    fn ended_connections_are_forgotten() {
        let mut dog = watchdog(1000, 1000);
        let w = dog.watch();
        let _kept = dog.watch();
        drop(w);
        dog.sweep(Instant::now());
        assert_eq!(dog.len(), 1);
    }

    #[test]
    fn the_sweep_runs_often_enough_for_the_shortest_timeout() {
        assert_eq!(watchdog(600_000, 60_000).period(), Duration::from_secs(1));
        assert_eq!(watchdog(300, 300).period(), ms(75));
        assert_eq!(watchdog(1, 1).period(), ms(10));
    }

    #[tokio::test]
    async fn expiry_wakes_the_connection() {
        let mut dog = watchdog(100, 100);
        let w = dog.watch();
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.expired().await }
        });
        tokio::task::yield_now().await;
        let t0 = Instant::now();
        dog.sweep(t0);
        dog.sweep(t0 + ms(200));
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("woken")
            .unwrap();
    }
}
