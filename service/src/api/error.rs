//! The one mapping from engine errors to gRPC statuses.
//!
//! Each status carries a stable machine-readable reason (`google.rpc.ErrorInfo`, domain
//! `jobplane`), the offending field for bad input (`google.rpc.BadRequest`) and a retry delay for
//! exhaustion (`google.rpc.RetryInfo`). Internals (SQL, driver messages) are never echoed.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::EngineError;

/// Domain of every `ErrorInfo`.
pub const DOMAIN: &str = "jobplane";

/// Converts an engine error into a status.
pub fn to_status(e: EngineError) -> Status {
    let mut details = ErrorDetails::new();
    let (code, reason) = match &e {
        EngineError::InvalidArgument { field, message } => {
            details.add_bad_request_violation(field.clone(), message.clone());
            (Code::InvalidArgument, "INVALID_ARGUMENT")
        }
        EngineError::NotFound { reason, .. } => (Code::NotFound, *reason),
        EngineError::AlreadyExists { reason, .. } => (Code::AlreadyExists, *reason),
        EngineError::FailedPrecondition { reason, .. } => (Code::FailedPrecondition, *reason),
        EngineError::ResourceExhausted {
            reason,
            retry_after,
            ..
        } => {
            details.set_retry_info(Some(*retry_after));
            (Code::ResourceExhausted, *reason)
        }
        EngineError::Unavailable(_) => (Code::Unavailable, "UNAVAILABLE"),
    };
    details.set_error_info(reason, DOMAIN, HashMap::<String, String>::new());
    let message = match e {
        // The code already says "unavailable"; clients print it before the message.
        EngineError::Unavailable(why) => why,
        e => e.to_string(),
    };
    Status::with_error_details(code, message, details)
}

/// A bad-input status naming the field.
pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Status {
    to_status(EngineError::invalid(field, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let s = to_status(EngineError::invalid("spec.queue", "must not be empty"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("spec.queue"));
        let d = s.get_error_details();
        let v = &d.bad_request().expect("bad request").field_violations[0];
        assert_eq!(v.field, "spec.queue");
        assert_eq!(d.error_info().expect("info").reason, "INVALID_ARGUMENT");
    }

    #[test]
    fn exhaustion_carries_retry_after() {
        let s = to_status(EngineError::ResourceExhausted {
            reason: "QUEUE_FULL",
            message: "full".into(),
            retry_after: std::time::Duration::from_secs(2),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        let d = s.get_error_details();
        assert_eq!(
            d.retry_info().and_then(|r| r.retry_delay),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(d.error_info().expect("info").reason, "QUEUE_FULL");
    }

    #[test]
    fn unavailable_hides_internals() {
        let s = to_status(EngineError::from(crate::store::StoreError::Unavailable(
            "SQLITE_BUSY: select * from jobs".into(),
        )));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("SQLITE"));
    }
}
