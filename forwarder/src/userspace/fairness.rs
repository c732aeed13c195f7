//! Sharing the node's connection limit fairly between Services, so that one Service's
//! clients (a slowloris holding connections open) cannot take every place on the node.
//! While fewer than three quarters of the places are taken, any Service takes one; past
//! that, only a Service holding less than its fair share (the limit over the number of
//! Services served here) may, so the last quarter is kept for the Services that are not
//! flooding. Work-conserving below that mark: one busy Service alone can still use three
//! quarters of the node, and its connections, once held, are never taken away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// The node-wide view: the limit, and how many places each Service holds.
#[derive(Debug)]
pub struct Fairness {
    max: usize,
    limit: Arc<Semaphore>,
    services: Mutex<HashMap<String, (Arc<AtomicUsize>, usize)>>,
}

/// One Service's share: how many places it holds.
#[derive(Debug, Clone)]
pub struct Share {
    service: String,
    held: Arc<AtomicUsize>,
    fairness: Arc<Fairness>,
}

impl Fairness {
    pub fn new(max: usize, limit: Arc<Semaphore>) -> Arc<Self> {
        Arc::new(Self {
            max,
            limit,
            services: Mutex::default(),
        })
    }

    /// The share of `service`, for one of its listeners (released with `Share::leave`).
    pub fn join(self: &Arc<Self>, service: &str) -> Share {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let entry = services
            .entry(service.to_string())
            .or_insert_with(|| (Arc::default(), 0));
        entry.1 += 1;
        Share {
            service: service.to_string(),
            held: entry.0.clone(),
            fairness: self.clone(),
        }
    }

    fn services(&self) -> usize {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
            .max(1)
    }
}

impl Share {
    /// Whether this Service may take a place now.
    pub fn may_take(&self) -> bool {
        let f = &self.fairness;
        let taken = f.max.saturating_sub(f.limit.available_permits());
        taken * 4 < f.max * 3 || self.held.load(Ordering::Relaxed) < (f.max / f.services()).max(1)
    }

    /// Counts a place taken; the guard gives it back.
    pub fn hold(&self) -> Held {
        self.held.fetch_add(1, Ordering::Relaxed);
        Held(self.held.clone())
    }

    /// One listener of the Service is gone.
    pub fn leave(&self) {
        let mut services = self
            .fairness
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = services.get_mut(&self.service) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                services.remove(&self.service);
            }
        }
    }
}

/// A place counted to a Service while it lives.
#[derive(Debug)]
pub struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_three_quarters_only_services_under_their_share_take_places() {
        let limit = Arc::new(Semaphore::new(8));
        let fairness = Fairness::new(8, limit.clone());
        let flood = fairness.join("default/flooded");
        let quiet = fairness.join("default/quiet");
        let mut held = Vec::new();
        while flood.may_take() {
            held.push((limit.clone().try_acquire_owned().unwrap(), flood.hold()));
        }
        assert_eq!(held.len(), 6, "three quarters of the node");
        assert!(quiet.may_take(), "the other Service still gets in");
        // Alone, a Service may use three quarters, then its fair share (all of it).
        quiet.leave();
        assert!(flood.may_take());
        drop(held);
    }
}
