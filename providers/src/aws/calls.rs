//! Every AWS API call goes through `Calls::run`: it waits for the provider's call budget (a
//! token bucket shared by all Services, so a node change across hundreds of balancers does
//! not trip AWS's own throttling), retries throttling, 5xx and network failures with
//! exponential backoff and full jitter, and counts each attempt by operation and outcome.
//! The SDK's own retries are off, so the counts are what AWS saw.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::debug;

use crate::ProviderError;

type Labels = Vec<(&'static str, String)>;

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `Throttling`, `RequestLimitExceeded` and kin: retried.
    Throttled,
    /// A 5xx: retried.
    Server,
    /// No response (connection, timeout): retried.
    Network,
    /// AWS refused the request; the code says why.
    Client,
}

impl Failure {
    fn outcome(self) -> &'static str {
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

/// A failed AWS call, after retries.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{operation}: {}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct ApiError {
    pub operation: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub failure: Failure,
}

impl ApiError {
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "PriorRequestNotComplete",
];

const SERVER: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];

const ACCESS: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
];

const QUOTA: &[&str] = &[
    "TooManyLoadBalancers",
    "TooManyTargetGroups",
    "TooManyListeners",
    "TooManyTargets",
    "TooManyRegistrationsForTargetId",
    "TooManyTags",
    "RulesPerSecurityGroupLimitExceeded",
    "SecurityGroupLimitExceeded",
    "AddressLimitExceeded",
];

fn classify<E>(err: &SdkError<E, HttpResponse>) -> (Failure, Option<String>, String)
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().map(str::to_string);
            let message = ctx
                .err()
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| ctx.err().to_string());
            let status = ctx.raw().status().as_u16();
            let failure = match code.as_deref() {
                Some(c) if THROTTLING.contains(&c) => Failure::Throttled,
                Some(c) if SERVER.contains(&c) => Failure::Server,
                _ if status == 429 => Failure::Throttled,
                _ if status >= 500 => Failure::Server,
                _ => Failure::Client,
            };
            (failure, code, message)
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            (Failure::Network, None, error_chain(err))
        }
        SdkError::ResponseError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let failure = if status == 429 {
                Failure::Throttled
            } else if status >= 500 {
                Failure::Server
            } else {
                Failure::Network
            };
            (failure, None, error_chain(err))
        }
        _ => (Failure::Client, None, error_chain(err)),
    }
}

fn error_chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl From<ApiError> for ProviderError {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        let configuration = |reason| ProviderError::Configuration {
            reason,
            message: message.clone(),
        };
        match (e.failure, e.code.as_deref()) {
            (Failure::Client, Some(c)) if ACCESS.contains(&c) => configuration("AccessDenied"),
            (Failure::Client, Some(c)) if QUOTA.contains(&c) => configuration("QuotaExceeded"),
            (
                Failure::Client,
                Some("ValidationError" | "InvalidConfigurationRequest" | "InvalidParameterValue"),
            ) => configuration("AWSRejectedRequest"),
            (
                Failure::Client,
                Some(
                    "DuplicateLoadBalancerName"
                    | "DuplicateTargetGroupName"
                    | "InvalidGroup.Duplicate"
                    | "InvalidAddress.InUse"
                    | "Resource.AlreadyAssociated",
                ),
            ) => ProviderError::Conflict {
                reason: "ResourceInUse",
                message,
            },
            _ => ProviderError::transient(message),
        }
    }
}

/// The most pages one listing reads: a cloud that hands back a marker forever gets an error,
/// not a loop (400 items a page, so 400,000 items).
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
    budget: Budget,
    retry: RetryPolicy,
    pub counts: Family<Labels, Counter>,
}

impl Calls {
    pub fn new(calls_per_second: f64, retry: RetryPolicy) -> Self {
        let rate = calls_per_second.max(0.1);
        Self {
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
    /// retries are spent.
    pub async fn run<T, E, F, Fut>(
        &self,
        operation: &'static str,
        mut call: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + StdError + 'static,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.budget.take().await;
            tracing::trace!(operation, attempt, "AWS call");
            match call().await {
                Ok(v) => {
                    self.count(operation, "ok");
                    return Ok(v);
                }
                Err(err) => {
                    let (failure, code, message) = classify(&err);
                    self.count(operation, failure.outcome());
                    if failure.retried() && attempt < self.retry.attempts {
                        let wait = backoff(&self.retry, attempt);
                        debug!(operation, attempt, ?code, retry_in = ?wait, "AWS call failed; retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(ApiError {
                        operation,
                        code,
                        message,
                        failure,
                    });
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

    #[test]
    fn errors_map_to_what_the_operator_should_do() {
        let e = |failure, code: &str| ApiError {
            operation: "CreateLoadBalancer",
            code: Some(code.into()),
            message: "m".into(),
            failure,
        };
        assert_eq!(
            ProviderError::from(e(Failure::Client, "AccessDenied")).reason(),
            "AccessDenied"
        );
        assert_eq!(
            ProviderError::from(e(Failure::Client, "TooManyLoadBalancers")).reason(),
            "QuotaExceeded"
        );
        assert_eq!(
            ProviderError::from(e(Failure::Client, "ValidationError")).kind(),
            "configuration"
        );
        assert_eq!(
            ProviderError::from(e(Failure::Throttled, "Throttling")).kind(),
            "transient"
        );
        let text = e(Failure::Client, "ValidationError").to_string();
        assert_eq!(text, "CreateLoadBalancer: ValidationError: m");
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
}
