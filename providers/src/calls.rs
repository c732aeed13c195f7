//! What every cloud call goes through, whichever cloud: `Calls::run` waits for the provider's
//! call budget (a token bucket shared by all Services, so a node change across hundreds of
//! balancers does not trip the cloud's own throttling), retries throttling, 5xx and network
//! failures with exponential backoff and full jitter, and counts each attempt by operation
//! and outcome. The SDKs' own retries are off, so the counts are what the cloud saw. Each
//! provider says how its errors classify (`Failure`) and maps the last one to a
//! `ProviderError` itself.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant as TokioInstant;
use tracing::debug;

use crate::ProviderError;

pub type Labels = Vec<(&'static str, String)>;

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The cloud asked us to slow down (429, `Throttling`, `rateLimitExceeded`): retried.
    Throttled,
    /// A 5xx: retried.
    Server,
    /// No response (connection, timeout): retried.
    Network,
    /// The cloud refused the request; its code says why.
    Client,
}

impl Failure {
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Server => "server_error",
            Self::Network => "network_error",
            Self::Client => "client_error",
        }
    }

    fn retried(self) -> bool {
        self != Self::Client
    }
}

/// An error with its sources, `: `-separated, for a message that says everything.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A clap parser for a provider's `--…-api-rate` flag.
pub fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err("must be a positive number of calls per second".into()),
    }
}

/// The most pages one listing reads: a cloud that hands back a marker forever gets an error,
/// not a loop.
const MAX_PAGES: usize = 1000;

/// Every item of a paginated listing. `page(marker)` reads one page (the first with `None`)
/// and returns its items and the next marker; an absent or empty marker ends the listing.
pub async fn all_pages<T, F, Fut>(what: &str, mut page: F) -> Result<Vec<T>, ProviderError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<String>), ProviderError>>,
{
    let mut items = Vec::new();
    let mut marker = None;
    for _ in 0..MAX_PAGES {
        let (mut got, next) = page(marker.take()).await?;
        items.append(&mut got);
        match next {
            Some(m) if !m.is_empty() => marker = Some(m),
            _ => return Ok(items),
        }
    }
    Err(ProviderError::transient(format!(
        "{what}: still more pages after {MAX_PAGES}; giving up this pass"
    )))
}

/// Retry settings; tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 8,
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// A token bucket: `rate` calls per second on average, `burst` at once.
struct Budget {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, TokioInstant)>,
}

impl Budget {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            state: Mutex::new((burst, TokioInstant::now())),
        }
    }

    async fn take(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = TokioInstant::now();
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.burst);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A random fraction in [0, 1) for jitter; no crate needed for this.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let n = RandomState::new().hash_one(Instant::now());
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// Full jitter: a random delay up to base · 2^(attempt-1), capped at `max`.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(policy.max);
    ceiling.mul_f64(random_fraction())
}

pub struct Calls {
    /// `AWS`, `Compute Engine`: for the log.
    cloud: &'static str,
    budget: Budget,
    retry: RetryPolicy,
    pub counts: Family<Labels, Counter>,
}

impl Calls {
    pub fn new(cloud: &'static str, calls_per_second: f64, retry: RetryPolicy) -> Self {
        let rate = calls_per_second.max(0.1);
        Self {
            cloud,
            budget: Budget::new(rate, (rate * 2.0).max(1.0)),
            retry,
            counts: Family::default(),
        }
    }

    fn count(&self, operation: &'static str, outcome: &'static str) {
        self.counts
            .get_or_create(&vec![
                ("operation", operation.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Runs `call` (which sends one request) until it succeeds, fails for good, or the
    /// retries are spent; the error returned is the last attempt's.
    pub async fn run<T, E, F, Fut, C>(
        &self,
        operation: &'static str,
        classify: C,
        mut call: F,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> Failure,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.budget.take().await;
            tracing::trace!(cloud = self.cloud, operation, attempt, "cloud call");
            match call().await {
                Ok(v) => {
                    self.count(operation, "ok");
                    return Ok(v);
                }
                Err(err) => {
                    let failure = classify(&err);
                    self.count(operation, failure.outcome());
                    if failure.retried() && attempt < self.retry.attempts {
                        let wait = backoff(&self.retry, attempt);
                        debug!(cloud = self.cloud, operation, attempt, outcome = failure.outcome(), retry_in = ?wait, "call failed; retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = RetryPolicy::default();
        for attempt in 1..30 {
            let d = backoff(&p, attempt);
            assert!(d <= p.max, "{attempt}: {d:?}");
            let ceiling = p.base.saturating_mul(1 << (attempt - 1).min(20)).min(p.max);
            assert!(d <= ceiling);
        }
        let samples: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff(&p, 6)).collect();
        assert!(samples.len() > 10, "jitter spreads retries: {samples:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_spaces_calls_beyond_the_burst() {
        let b = Budget::new(10.0, 2.0);
        let start = tokio::time::Instant::now();
        for _ in 0..12 {
            b.take().await;
        }
        // Two at once, then ten at 10 per second: one second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_by_class_and_counted_per_attempt() {
        let calls = Calls::new("test", 1000.0, RetryPolicy::default());
        let mut n = 0;
        let got: Result<u32, Failure> = calls
            .run(
                "Op",
                |f: &Failure| *f,
                || {
                    n += 1;
                    let r = if n < 3 {
                        Err(Failure::Throttled)
                    } else {
                        Ok(n)
                    };
                    async move { r }
                },
            )
            .await;
        assert_eq!(got, Ok(3));
        let refused: Result<u32, Failure> = calls
            .run("Op", |f: &Failure| *f, || async { Err(Failure::Client) })
            .await;
        assert_eq!(refused, Err(Failure::Client), "a refusal is not retried");
        let count = |outcome: &str| {
            calls
                .counts
                .get_or_create(&vec![
                    ("operation", "Op".into()),
                    ("outcome", outcome.into()),
                ])
                .get()
        };
        assert_eq!(
            (count("throttled"), count("ok"), count("client_error")),
            (2, 1, 1)
        );
    }
}
