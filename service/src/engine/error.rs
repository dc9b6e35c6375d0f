//! The engine's errors. `api::error` maps each to one gRPC status code and a stable reason.

use std::time::Duration;

use crate::store::StoreError;

/// What went wrong in an engine operation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Bad input; names the field.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// Field path, e.g. `spec.queue`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No such job, or not in the caller's namespace.
    #[error("{what} not found")]
    NotFound {
        /// Stable reason, e.g. `JOB_NOT_FOUND`.
        reason: &'static str,
        /// What was looked for.
        what: String,
    },
    /// An idempotency key was reused with a different spec.
    #[error("{message}")]
    AlreadyExists {
        /// Stable reason.
        reason: &'static str,
        /// Details.
        message: String,
    },
    /// The operation is not possible in the current state.
    #[error("{message}")]
    FailedPrecondition {
        /// Stable reason.
        reason: &'static str,
        /// Details.
        message: String,
    },
    /// A limit was reached; try again later.
    #[error("{message}")]
    ResourceExhausted {
        /// Stable reason.
        reason: &'static str,
        /// Details.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The store is failing or the service is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl EngineError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::Unavailable(_) | EngineError::ResourceExhausted { .. }
        )
    }

    /// An invalid-argument error.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A job that does not exist (or that the caller may not see).
    pub fn job_not_found(id: impl std::fmt::Display) -> Self {
        EngineError::NotFound {
            reason: "JOB_NOT_FOUND",
            what: format!("job {id}"),
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        // Never echo driver details to clients: the store already classified them, and the full
        // error is logged where it happened.
        tracing::error!(error = %e, "store error");
        EngineError::Unavailable("the database failed; try again".into())
    }
}
