//! How AWS errors classify and what they mean to the operator. Every AWS call goes through
//! the shared `crate::calls::Calls` (budget, retries, counts); `Calls::run` here is the AWS
//! face of it, turning the SDK's last error into an `ApiError` with AWS's code.

use std::error::Error as StdError;
use std::future::Future;

use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::ProviderError;
pub use crate::calls::{Failure, RetryPolicy, all_pages};
use crate::calls::{Labels, error_chain};

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

/// AWS's face of the shared call layer.
pub struct Calls(crate::calls::Calls);

impl Calls {
    pub fn new(calls_per_second: f64, retry: RetryPolicy) -> Self {
        Self(crate::calls::Calls::new("AWS", calls_per_second, retry))
    }

    pub fn counts(&self) -> &Family<Labels, Counter> {
        &self.0.counts
    }

    /// Runs `call` (which sends one request) until it succeeds, fails for good, or the
    /// retries are spent.
    pub async fn run<T, E, F, Fut>(&self, operation: &'static str, call: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + StdError + 'static,
    {
        self.0
            .run(operation, |e| classify(e).0, call)
            .await
            .map_err(|err| {
                let (failure, code, message) = classify(&err);
                ApiError {
                    operation,
                    code,
                    message,
                    failure,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
