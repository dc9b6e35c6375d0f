//! What a worker runs: [`Handler`]s and the [`HandlerError`]s they return.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::JobContext;

/// The future a [`Handler`] returns: the result bytes, or why the attempt did not succeed.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, HandlerError>> + Send>>;

/// Runs one attempt of a job.
///
/// Any `Fn(JobContext) -> impl Future<Output = Result<Vec<u8>, HandlerError>>` is a handler,
/// so most handlers are closures or `async fn`s:
///
/// ```
/// use jobplane::worker::{HandlerError, JobContext};
///
/// async fn resize(ctx: JobContext) -> Result<Vec<u8>, HandlerError> {
///     let request: serde_json::Value = ctx.json()?;
///     ctx.progress(50.0, "resizing").await;
///     Ok(serde_json::to_vec(&request)?)
/// }
/// ```
///
/// Implement the trait directly for handlers with state of their own.
pub trait Handler: Send + Sync + 'static {
    /// Runs the attempt described by `ctx`.
    fn handle(&self, ctx: JobContext) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, HandlerError>> + Send + 'static,
{
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        Box::pin(self(ctx))
    }
}

/// Why a handler did not succeed.
///
/// Any [`std::error::Error`] converts into a *retryable* [`HandlerError::Failed`], so `?` works
/// in handlers; use [`HandlerError::fatal`] for failures that retrying cannot fix. (Like
/// `anyhow::Error`, this type deliberately does not implement `std::error::Error` itself, which
/// is what makes that blanket conversion possible.)
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerError {
    /// The attempt failed.
    Failed {
        /// What went wrong; recorded in the job's error.
        message: String,
        /// Whether the job may be retried under its retry policy.
        retryable: bool,
    },
    /// An upstream rate limit was hit: the job goes back to the queue without using a retry, and
    /// `pool` (if named) cools down for `retry_after`.
    RateLimited {
        /// The capacity pool that was hit.
        pool: Option<String>,
        /// When the upstream said to retry.
        retry_after: Duration,
    },
    /// The handler stopped because its job was cancelled (see [`JobContext::cancellation`]).
    Cancelled,
}

impl HandlerError {
    /// A failure that may be retried.
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError::Failed {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that retrying cannot fix: the job fails at once.
    pub fn fatal(message: impl Into<String>) -> Self {
        HandlerError::Failed {
            message: message.into(),
            retryable: false,
        }
    }

    /// An upstream rate limit on `pool` (if any), to retry after `retry_after`.
    pub fn rate_limited(pool: Option<String>, retry_after: Duration) -> Self {
        HandlerError::RateLimited { pool, retry_after }
    }

    /// The handler stopped after a cancel request.
    pub fn cancelled() -> Self {
        HandlerError::Cancelled
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Failed {
                message,
                retryable: true,
            } => write!(f, "failed (retryable): {message}"),
            HandlerError::Failed {
                message,
                retryable: false,
            } => write!(f, "failed: {message}"),
            HandlerError::RateLimited {
                pool: Some(pool),
                retry_after,
            } => write!(f, "rate limited on {pool}; retry after {retry_after:?}"),
            HandlerError::RateLimited {
                pool: None,
                retry_after,
            } => write!(f, "rate limited; retry after {retry_after:?}"),
            HandlerError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        HandlerError::retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_errors_become_retryable_failures() {
        let io = std::io::Error::other("disk on fire");
        let err: HandlerError = io.into();
        assert_eq!(err, HandlerError::retryable("disk on fire"));
        let json: HandlerError = serde_json::from_str::<u8>("x").unwrap_err().into();
        assert!(matches!(
            json,
            HandlerError::Failed {
                retryable: true,
                ..
            }
        ));
    }

    #[test]
    fn constructors_and_display() {
        assert_eq!(HandlerError::fatal("bad").to_string(), "failed: bad");
        assert_eq!(
            HandlerError::rate_limited(Some("gpt".into()), Duration::from_secs(2)).to_string(),
            "rate limited on gpt; retry after 2s"
        );
        assert_eq!(HandlerError::cancelled().to_string(), "cancelled");
    }

    #[test]
    fn closures_are_handlers() {
        fn assert_handler<H: Handler>(_: H) {}
        assert_handler(|_ctx: JobContext| async { Ok::<_, HandlerError>(Vec::new()) });
    }
}
