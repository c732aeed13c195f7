//! Typed provider errors. Each variant tells the operator what to do next; `reason` is a
//! CamelCase word that ends up in the Service's condition, so a user can act on it.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The Service asks for something this provider cannot do as written (an unsupported
    /// protocol, a malformed annotation). Retrying is pointless until the Service changes.
    #[error("{message}")]
    InvalidInput {
        reason: &'static str,
        message: String,
    },

    /// No address could be allocated: the requested one is in no pool or held by another
    /// Service, or the pools are exhausted. Retried when the pools or allocations change.
    #[error("{message}")]
    Allocation {
        reason: &'static str,
        message: String,
    },

    /// The cloud refused because something conflicts (a name or address in use elsewhere).
    #[error("{message}")]
    Conflict {
        reason: &'static str,
        message: String,
    },

    /// The provider is misconfigured or lacks a permission; an operator must fix it.
    #[error("{message}")]
    Configuration {
        reason: &'static str,
        message: String,
    },

    /// Not a failure: the cloud accepted the change and is still carrying it out (a GCE
    /// Operation that is RUNNING). The operator shows the Service as provisioning (condition
    /// reason `Provisioning`, a Normal Event, no Warning) and calls `ensure` again after
    /// `retry_after`, without growing the Service's backoff; `ensure` then picks up where the
    /// cloud is. Like the upstream cloud-provider's `RetryError`.
    #[error("{message}")]
    InProgress {
        message: String,
        retry_after: Duration,
    },

    /// A failure that may pass by itself: network, 5xx, throttling. `retry_after` is the
    /// server's hint, if it gave one.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
}

impl From<ferry_model::desired::InvalidService> for ProviderError {
    fn from(e: ferry_model::desired::InvalidService) -> Self {
        Self::InvalidInput {
            reason: e.reason,
            message: e.message,
        }
    }
}

impl ProviderError {
    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            reason,
            message: message.into(),
        }
    }

    pub fn allocation(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Allocation {
            reason,
            message: message.into(),
        }
    }

    pub fn in_progress(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::InProgress {
            message: message.into(),
            retry_after,
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    /// The CamelCase reason for conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidInput { reason, .. }
            | Self::Allocation { reason, .. }
            | Self::Conflict { reason, .. }
            | Self::Configuration { reason, .. } => reason,
            Self::InProgress { .. } => "Provisioning",
            Self::Transient { .. } => "ProviderUnavailable",
        }
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidInput { .. } => "invalid_input",
            Self::Allocation { .. } => "allocation",
            Self::Conflict { .. } => "conflict",
            Self::Configuration { .. } => "configuration",
            Self::InProgress { .. } => "in_progress",
            Self::Transient { .. } => "transient",
        }
    }
}
