//! How Compute Engine errors classify and what they mean to the operator. Every call goes
//! through the shared `crate::calls::Calls` (budget, retries, counts) with a per-attempt
//! timeout; the client's own retries are off. GCE answers errors as
//! `{"error":{"code":…,"message":…,"errors":[{"reason":…}]}}`: the HTTP status and the first
//! `reason` decide (404 absent, 409 `alreadyExists`, 403 `quotaExceeded` or `forbidden`,
//! 429 and `rateLimitExceeded` throttled, 5xx retried).

use std::future::Future;
use std::time::Duration;

use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::StatusDetails;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::ProviderError;
use crate::calls::{Failure, Labels, RetryPolicy, error_chain};

/// The longest one attempt may take before it counts as a network failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed Compute Engine call, after retries.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{operation}: {}{message}", reason.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct ApiError {
    pub operation: &'static str,
    /// The HTTP status, when GCE answered.
    pub status: Option<u16>,
    /// The first `errors[].reason` (`alreadyExists`, `quotaExceeded`, …).
    pub reason: Option<String>,
    pub message: String,
    pub failure: Failure,
}

impl ApiError {
    pub fn not_found(&self) -> bool {
        self.status == Some(404)
    }

    pub fn already_exists(&self) -> bool {
        self.status == Some(409)
    }

    /// Deleting something another resource still uses.
    pub fn in_use(&self) -> bool {
        self.status == Some(400) && self.reason.as_deref() == Some("resourceInUseByAnotherResource")
    }
}

const THROTTLING_REASONS: &[&str] = &["rateLimitExceeded", "userRateLimitExceeded"];

/// One attempt's failure: GCE's answer, or no answer in time.
#[derive(Debug)]
pub enum Attempt {
    Api(GaxError),
    TimedOut,
}

fn reason(err: &GaxError) -> Option<String> {
    let from_status = err.status().and_then(|s| {
        s.details.iter().find_map(|d| match d {
            StatusDetails::ErrorInfo(info) if !info.reason.is_empty() => Some(info.reason.clone()),
            _ => None,
        })
    });
    from_status.or_else(|| {
        // An answer the client could not read as a status: read the envelope ourselves.
        let body: serde_json::Value = serde_json::from_slice(err.http_payload()?).ok()?;
        body.pointer("/error/errors/0/reason")?
            .as_str()
            .map(str::to_string)
    })
}

fn classify(attempt: &Attempt) -> Failure {
    let err = match attempt {
        Attempt::TimedOut => return Failure::Network,
        Attempt::Api(e) => e,
    };
    match err.http_status_code() {
        Some(429) => Failure::Throttled,
        Some(s) if s >= 500 => Failure::Server,
        Some(403) if reason(err).is_some_and(|r| THROTTLING_REASONS.contains(&r.as_str())) => {
            Failure::Throttled
        }
        Some(_) => Failure::Client,
        None if err.is_timeout() || err.is_io() || err.is_connect() || err.is_transport() => {
            Failure::Network
        }
        None if err.is_authentication() => Failure::Network,
        None => Failure::Client,
    }
}

fn api_error(operation: &'static str, attempt: Attempt) -> ApiError {
    let failure = classify(&attempt);
    match attempt {
        Attempt::TimedOut => ApiError {
            operation,
            status: None,
            reason: None,
            message: format!("no answer in {}s", ATTEMPT_TIMEOUT.as_secs()),
            failure,
        },
        Attempt::Api(err) => ApiError {
            operation,
            status: err.http_status_code(),
            reason: reason(&err),
            message: err
                .status()
                .map(|s| s.message.clone())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| error_chain(&err)),
            failure,
        },
    }
}

impl From<ApiError> for ProviderError {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        let configuration = |reason| ProviderError::Configuration {
            reason,
            message: message.clone(),
        };
        match (e.failure, e.status, e.reason.as_deref()) {
            (Failure::Client, Some(403), Some("quotaExceeded" | "QUOTA_EXCEEDED")) => {
                ProviderError::allocation("QuotaExceeded", message)
            }
            (Failure::Client, Some(401), _) => configuration("Unauthenticated"),
            (Failure::Client, Some(403), _) => configuration("AccessDenied"),
            (Failure::Client, Some(412), _) => configuration("ConditionNotMet"),
            (Failure::Client, Some(409), _) => ProviderError::Conflict {
                reason: "ResourceInUse",
                message,
            },
            (Failure::Client, Some(400), Some("resourceInUseByAnotherResource")) => {
                ProviderError::Conflict {
                    reason: "ResourceInUse",
                    message,
                }
            }
            (Failure::Client, Some(400), _) => configuration("GCERejectedRequest"),
            (Failure::Client, None, _) => configuration("GCEClientError"),
            _ => ProviderError::transient(message),
        }
    }
}

/// A failed Operation's `error.errors[]` as the operator should see it.
pub fn operation_failed(what: &str, codes: &[(String, String)]) -> ProviderError {
    let text = codes
        .iter()
        .map(|(code, message)| format!("{code}: {message}"))
        .collect::<Vec<_>>()
        .join("; ");
    let message = format!("{what} failed: {text}");
    let first = codes.first().map(|(c, _)| c.as_str()).unwrap_or_default();
    match first {
        "QUOTA_EXCEEDED" => ProviderError::allocation("QuotaExceeded", message),
        "RESOURCE_NOT_FOUND" | "RESOURCE_NOT_READY" | "INTERNAL_ERROR" | "" => {
            ProviderError::transient(message)
        }
        "IP_IN_USE_BY_ANOTHER_RESOURCE" | "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE" => {
            ProviderError::Conflict {
                reason: "ResourceInUse",
                message,
            }
        }
        _ => ProviderError::Configuration {
            reason: "GCEOperationFailed",
            message,
        },
    }
}

/// Compute Engine's face of the shared call layer.
pub struct Calls(crate::calls::Calls);

impl Calls {
    pub fn new(calls_per_second: f64, retry: RetryPolicy) -> Self {
        Self(crate::calls::Calls::new(
            "Compute Engine",
            calls_per_second,
            retry,
        ))
    }

    pub fn counts(&self) -> &Family<Labels, Counter> {
        &self.0.counts
    }

    /// Runs `call` (which sends one request) until it succeeds, fails for good, or the
    /// retries are spent.
    pub async fn run<T, F, Fut>(&self, operation: &'static str, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, GaxError>>,
    {
        self.0
            .run(operation, classify, || {
                let attempt = call();
                async move {
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(Attempt::Api(e)),
                        Err(_) => Err(Attempt::TimedOut),
                    }
                }
            })
            .await
            .map_err(|a| api_error(operation, a))
    }

    /// Like `run`, with 404 as `None`.
    pub async fn find<T, F, Fut>(
        &self,
        operation: &'static str,
        call: F,
    ) -> Result<Option<T>, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, GaxError>>,
    {
        match self.run(operation, call).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(status: u16, reason: &str) -> ApiError {
        ApiError {
            operation: "forwardingRules.insert",
            status: Some(status),
            reason: Some(reason.into()),
            message: "m".into(),
            failure: if status >= 500 || status == 429 {
                Failure::Server
            } else {
                Failure::Client
            },
        }
    }

    #[test]
    fn errors_map_to_what_the_operator_should_do() {
        let p = |status, reason| ProviderError::from(e(status, reason));
        assert_eq!(p(403, "quotaExceeded").kind(), "allocation");
        assert_eq!(p(403, "quotaExceeded").reason(), "QuotaExceeded");
        assert_eq!(p(403, "forbidden").reason(), "AccessDenied");
        assert_eq!(p(412, "conditionNotMet").reason(), "ConditionNotMet");
        assert_eq!(p(409, "alreadyExists").kind(), "conflict");
        assert_eq!(p(400, "resourceInUseByAnotherResource").kind(), "conflict");
        assert_eq!(p(400, "invalid").kind(), "configuration");
        assert_eq!(p(503, "backendError").kind(), "transient");
        assert_eq!(
            e(403, "quotaExceeded").to_string(),
            "forwardingRules.insert: quotaExceeded: m"
        );
    }

    /// GCE's error envelope, as the client turns it into an error (a status with the
    /// `errors[]` items as details), or, `readable` false, as an unreadable payload.
    fn answer(status: u16, reason: &str, readable: bool) -> Attempt {
        let body = serde_json::json!({"error": {"code": status, "message": "m",
            "errors": [{"reason": reason, "domain": "global", "message": "m"}]}});
        let bytes = bytes::Bytes::from(body.to_string());
        Attempt::Api(if readable {
            let parsed = google_cloud_gax::error::rpc::Status::try_from(&bytes).unwrap();
            GaxError::service_with_http_metadata(parsed, Some(status), None)
        } else {
            GaxError::http(status, http::HeaderMap::new(), bytes)
        })
    }

    fn answered(status: u16, reason: &str) -> Attempt {
        answer(status, reason, true)
    }

    #[test]
    fn gce_answers_classify_by_status_and_reason() {
        assert_eq!(
            classify(&answered(429, "rateLimitExceeded")),
            Failure::Throttled
        );
        assert_eq!(
            classify(&answered(403, "userRateLimitExceeded")),
            Failure::Throttled
        );
        assert_eq!(classify(&answered(403, "quotaExceeded")), Failure::Client);
        assert_eq!(classify(&answered(503, "backendError")), Failure::Server);
        assert_eq!(classify(&answered(409, "alreadyExists")), Failure::Client);
        assert_eq!(classify(&Attempt::TimedOut), Failure::Network);
        let e = api_error("addresses.insert", answered(403, "quotaExceeded"));
        assert_eq!(
            (e.status, e.reason.as_deref()),
            (Some(403), Some("quotaExceeded"))
        );
        assert_eq!(ProviderError::from(e).reason(), "QuotaExceeded");
        let raw = api_error("addresses.insert", answer(403, "rateLimitExceeded", false));
        assert_eq!(raw.reason.as_deref(), Some("rateLimitExceeded"));
        assert_eq!(raw.failure, Failure::Throttled);
    }

    #[test]
    fn a_failed_operation_names_its_code() {
        let failed = |code: &str| {
            operation_failed(
                "forwardingRules.insert ferry-x-tcp",
                &[(code.to_string(), "why".to_string())],
            )
        };
        assert_eq!(failed("QUOTA_EXCEEDED").reason(), "QuotaExceeded");
        let other = failed("INVALID_USAGE");
        assert_eq!(other.reason(), "GCEOperationFailed");
        assert!(other.to_string().contains("INVALID_USAGE: why"), "{other}");
        assert_eq!(failed("RESOURCE_NOT_READY").kind(), "transient");
    }
}
