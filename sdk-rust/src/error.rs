//! The SDK's error type: gRPC status codes and the service's rich error details mapped to typed
//! variants.

use std::fmt;
use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

/// The result type of every fallible SDK call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed error used as the source of a [`Error::Decode`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error returned by the SDK.
///
/// Errors that come from the service carry the gRPC [`tonic::Status`] as their
/// [`source`](std::error::Error::source), the service's human-readable `message`, and the stable
/// machine-readable `reason` (e.g. `JOB_NOT_FOUND`) when the service sent one; see
/// [`Error::reason`].
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was invalid (`INVALID_ARGUMENT`); `field` names the offending field, e.g.
    /// `spec.queue`, when the service said which one.
    #[error("invalid argument{}: {message}", FieldSuffix(.field.as_deref()))]
    InvalidArgument {
        /// The offending field, if known.
        field: Option<String>,
        /// What is wrong with it.
        message: String,
        /// Stable reason, e.g. `INVALID_ARGUMENT`.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The job, queue or worker does not exist in this namespace (`NOT_FOUND`).
    #[error("not found: {message}")]
    NotFound {
        /// The service's message.
        message: String,
        /// Stable reason, e.g. `JOB_NOT_FOUND`.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The entity exists already, e.g. an idempotency key reused with a different spec
    /// (`ALREADY_EXISTS`).
    #[error("already exists: {message}")]
    AlreadyExists {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The system is not in a state that allows the operation (`FAILED_PRECONDITION`).
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// A limit was hit (`RESOURCE_EXHAUSTED`): retry after `retry_after` if given.
    #[error("resource exhausted: {message}{}", RetryAfterSuffix(*.retry_after))]
    ResourceExhausted {
        /// The service's message.
        message: String,
        /// When the service suggests retrying.
        retry_after: Option<Duration>,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// No or invalid credentials (`UNAUTHENTICATED`).
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The credentials do not allow the operation (`PERMISSION_DENIED`).
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The call's deadline passed (`DEADLINE_EXCEEDED`).
    #[error("deadline exceeded: {message}")]
    DeadlineExceeded {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The service is unavailable (`UNAVAILABLE`); retrying may succeed.
    #[error("unavailable: {message}")]
    Unavailable {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The call was cancelled (`CANCELLED`).
    #[error("cancelled: {message}")]
    Cancelled {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The service failed internally (`INTERNAL`, `DATA_LOSS`).
    #[error("internal error: {message}")]
    Internal {
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// Any other gRPC status code (`UNKNOWN`, `ABORTED`, `OUT_OF_RANGE`, `UNIMPLEMENTED`).
    #[error("rpc failed ({}): {message}", code_name(*.code))]
    Other {
        /// The status code.
        code: Code,
        /// The service's message.
        message: String,
        /// Stable reason.
        reason: Option<String>,
        /// The status as received.
        #[source]
        status: Box<tonic::Status>,
    },
    /// The connection to the service could not be established or the address is invalid.
    #[error("transport error: {}", Chain(.0))]
    Transport(#[from] tonic::transport::Error),
    /// Data could not be encoded or decoded: bad JSON, or a response missing a required field.
    #[error("decode error: {message}")]
    Decode {
        /// What could not be decoded.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The SDK was configured wrongly, e.g. a worker without handlers.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Builds an [`Error::Decode`] from a message.
    pub(crate) fn decode(message: impl Into<String>) -> Self {
        Error::Decode {
            message: message.into(),
            source: None,
        }
    }

    /// Builds an [`Error::Decode`] from a message and its cause.
    pub(crate) fn decode_with(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Decode {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Builds an error for a response that lacks a required field.
    pub(crate) fn missing(field: &str) -> Self {
        Error::decode(format!("the service's response has no `{field}`"))
    }

    /// Maps a gRPC status, with the rich error details the service attaches, to a typed error.
    pub fn from_status(status: tonic::Status) -> Self {
        let details = status.get_error_details();
        let reason = details
            .error_info()
            .map(|info| info.reason.clone())
            .filter(|r| !r.is_empty());
        let message = status.message().to_owned();
        let mut code = status.code();
        // A connection that broke mid-call (the service's process died, say) surfaces as
        // UNKNOWN — or INTERNAL for an h2 error — with the transport error as its source; a
        // status the service answered has none. For the caller that is the service being
        // unavailable: retryable, and safe to retry with an idempotency key.
        if matches!(code, Code::Unknown | Code::Internal)
            && std::error::Error::source(&status).is_some()
        {
            code = Code::Unavailable;
        }
        let status = Box::new(status);
        match code {
            Code::InvalidArgument => {
                let field = details
                    .bad_request()
                    .and_then(|br| br.field_violations.first())
                    .map(|v| v.field.clone())
                    .filter(|f| !f.is_empty());
                Error::InvalidArgument {
                    field,
                    message,
                    reason,
                    status,
                }
            }
            Code::NotFound => Error::NotFound {
                message,
                reason,
                status,
            },
            Code::AlreadyExists => Error::AlreadyExists {
                message,
                reason,
                status,
            },
            Code::FailedPrecondition => Error::FailedPrecondition {
                message,
                reason,
                status,
            },
            Code::ResourceExhausted => Error::ResourceExhausted {
                retry_after: details.retry_info().and_then(|ri| ri.retry_delay),
                message,
                reason,
                status,
            },
            Code::Unauthenticated => Error::Unauthenticated {
                message,
                reason,
                status,
            },
            Code::PermissionDenied => Error::PermissionDenied {
                message,
                reason,
                status,
            },
            Code::DeadlineExceeded => Error::DeadlineExceeded {
                message,
                reason,
                status,
            },
            Code::Unavailable => Error::Unavailable {
                message,
                reason,
                status,
            },
            Code::Cancelled => Error::Cancelled {
                message,
                reason,
                status,
            },
            Code::Internal | Code::DataLoss => Error::Internal {
                message,
                reason,
                status,
            },
            _ => Error::Other {
                code,
                message,
                reason,
                status,
            },
        }
    }

    /// The stable machine-readable reason the service gave (its `ErrorInfo.reason`), e.g.
    /// `JOB_NOT_FOUND`.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { reason, .. }
            | Error::NotFound { reason, .. }
            | Error::AlreadyExists { reason, .. }
            | Error::FailedPrecondition { reason, .. }
            | Error::ResourceExhausted { reason, .. }
            | Error::Unauthenticated { reason, .. }
            | Error::PermissionDenied { reason, .. }
            | Error::DeadlineExceeded { reason, .. }
            | Error::Unavailable { reason, .. }
            | Error::Cancelled { reason, .. }
            | Error::Internal { reason, .. }
            | Error::Other { reason, .. } => reason.as_deref(),
            Error::Transport(_) | Error::Decode { .. } | Error::InvalidConfig(_) => None,
        }
    }

    /// The gRPC status the service answered, if the error came from one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::InvalidArgument { status, .. }
            | Error::NotFound { status, .. }
            | Error::AlreadyExists { status, .. }
            | Error::FailedPrecondition { status, .. }
            | Error::ResourceExhausted { status, .. }
            | Error::Unauthenticated { status, .. }
            | Error::PermissionDenied { status, .. }
            | Error::DeadlineExceeded { status, .. }
            | Error::Unavailable { status, .. }
            | Error::Cancelled { status, .. }
            | Error::Internal { status, .. }
            | Error::Other { status, .. } => Some(status),
            Error::Transport(_) | Error::Decode { .. } | Error::InvalidConfig(_) => None,
        }
    }

    /// The gRPC status code, if the error came from the service. A call whose connection broke
    /// is `UNAVAILABLE` here, like its variant, though the raw [`Error::status`] says UNKNOWN.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Unavailable { .. } => Some(Code::Unavailable),
            _ => self.status().map(tonic::Status::code),
        }
    }

    /// The field named by an [`Error::InvalidArgument`].
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// How long the service asked to wait before retrying, for [`Error::ResourceExhausted`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::ResourceExhausted { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether retrying the same call may succeed: the service was unreachable, overloaded, or
    /// the call timed out. Submits are only safe to retry with an idempotency key.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. }
            | Error::ResourceExhausted { .. }
            | Error::DeadlineExceeded { .. }
            | Error::Transport(_) => true,
            Error::Other { code, .. } => *code == Code::Aborted,
            Error::InvalidArgument { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::FailedPrecondition { .. }
            | Error::Unauthenticated { .. }
            | Error::PermissionDenied { .. }
            | Error::Cancelled { .. }
            | Error::Internal { .. }
            | Error::Decode { .. }
            | Error::InvalidConfig(_) => false,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::from_status(status)
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::decode_with(format!("invalid JSON: {err}"), err)
    }
}

/// Whether a status received on a stream means the connection broke (as opposed to an answer
/// of the service), so that the call can be resumed on a new stream.
pub(crate) fn is_transport_failure(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => true,
        // h2 protocol errors surface as INTERNAL with the h2 error as source; an INTERNAL
        // answered by the service has no source.
        Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

struct FieldSuffix<'a>(Option<&'a str>);

impl fmt::Display for FieldSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => write!(f, " ({field})"),
            None => Ok(()),
        }
    }
}

struct RetryAfterSuffix(Option<Duration>);

impl fmt::Display for RetryAfterSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, " (retry after {} ms)", d.as_millis()),
            None => Ok(()),
        }
    }
}

/// Displays an error followed by its sources, because `tonic::transport::Error` alone only says
/// "transport error".
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        let mut current = self.0.source();
        while let Some(err) = current {
            let text = err.to_string();
            if parts.last() != Some(&text) {
                parts.push(text);
            }
            current = err.source();
        }
        if parts.is_empty() {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}", parts.join(": "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, FieldViolation};

    fn with_info(code: Code, msg: &str, mut details: ErrorDetails, reason: &str) -> tonic::Status {
        details.set_error_info(reason, "jobplane", std::collections::HashMap::new());
        tonic::Status::with_error_details(code, msg, details)
    }

    #[test]
    fn a_broken_connection_is_unavailable_and_retryable() {
        let broken = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        let e = Error::from_status(broken);
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert_eq!(e.code(), Some(Code::Unavailable));
        assert!(e.is_retryable());
        // An UNKNOWN the service answered stays what it is.
        let answered = Error::from_status(tonic::Status::unknown("odd"));
        assert!(!answered.is_retryable(), "{answered:?}");
    }

    #[test]
    fn invalid_argument_names_the_field_and_reason() {
        let details = ErrorDetails::with_bad_request(vec![FieldViolation::new(
            "spec.queue",
            "must not be empty",
        )]);
        let status = with_info(
            Code::InvalidArgument,
            "queue must not be empty",
            details,
            "INVALID_ARGUMENT",
        );
        let err = Error::from(status);
        assert!(matches!(err, Error::InvalidArgument { .. }));
        assert_eq!(err.field(), Some("spec.queue"));
        assert_eq!(err.reason(), Some("INVALID_ARGUMENT"));
        assert_eq!(err.code(), Some(Code::InvalidArgument));
        assert_eq!(
            err.to_string(),
            "invalid argument (spec.queue): queue must not be empty"
        );
        assert!(!err.is_retryable());
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn not_found_keeps_reason() {
        let err = Error::from(with_info(
            Code::NotFound,
            "job x not found",
            ErrorDetails::new(),
            "JOB_NOT_FOUND",
        ));
        assert!(matches!(err, Error::NotFound { .. }));
        assert_eq!(err.reason(), Some("JOB_NOT_FOUND"));
        assert_eq!(err.to_string(), "not found: job x not found");
    }

    #[test]
    fn resource_exhausted_reads_retry_info() {
        let details = ErrorDetails::with_retry_info(Some(Duration::from_millis(1500)));
        let err = Error::from(with_info(
            Code::ResourceExhausted,
            "too many queued jobs",
            details,
            "QUEUE_FULL",
        ));
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "resource exhausted: too many queued jobs (retry after 1500 ms)"
        );
    }

    #[test]
    fn plain_statuses_map_by_code() {
        let cases = [
            (Code::AlreadyExists, "already exists: m"),
            (Code::FailedPrecondition, "failed precondition: m"),
            (Code::Unauthenticated, "unauthenticated: m"),
            (Code::PermissionDenied, "permission denied: m"),
            (Code::DeadlineExceeded, "deadline exceeded: m"),
            (Code::Unavailable, "unavailable: m"),
            (Code::Cancelled, "cancelled: m"),
            (Code::Internal, "internal error: m"),
            (Code::Unimplemented, "rpc failed (UNIMPLEMENTED): m"),
        ];
        for (code, text) in cases {
            let err = Error::from(tonic::Status::new(code, "m"));
            assert_eq!(err.to_string(), text, "{code:?}");
            assert_eq!(err.code(), Some(code));
            assert_eq!(err.reason(), None);
        }
        assert!(Error::from(tonic::Status::unavailable("x")).is_retryable());
        assert!(Error::from(tonic::Status::aborted("x")).is_retryable());
        assert!(!Error::from(tonic::Status::permission_denied("x")).is_retryable());
        assert!(matches!(
            Error::from(tonic::Status::data_loss("x")),
            Error::Internal { .. }
        ));
    }

    #[test]
    fn invalid_argument_without_details() {
        let err = Error::from(tonic::Status::invalid_argument("bad"));
        assert_eq!(err.field(), None);
        assert_eq!(err.to_string(), "invalid argument: bad");
    }

    #[test]
    fn transport_failures_are_recognised() {
        assert!(is_transport_failure(&tonic::Status::unavailable("x")));
        assert!(is_transport_failure(&tonic::Status::unknown("x")));
        assert!(!is_transport_failure(&tonic::Status::internal("x")));
        assert!(!is_transport_failure(&tonic::Status::not_found("x")));
    }

    #[test]
    fn json_errors_are_decode_errors() {
        let err: Error = serde_json::from_str::<u32>("nope").unwrap_err().into();
        assert!(matches!(err, Error::Decode { .. }));
        assert!(err.to_string().starts_with("decode error: invalid JSON"));
    }
}
