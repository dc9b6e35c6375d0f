"""Exceptions: one class per kind of failure the service or the SDK reports, mirroring the
Rust SDK's ``jobplane::Error``; and the exceptions a handler raises to say how it ended."""

from __future__ import annotations

from typing import Any, Optional, Tuple


class Error(Exception):
    """A call failed. ``code`` is the gRPC status code name, ``reason`` the service's stable
    reason (e.g. ``JOB_NOT_FOUND``) when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        reason: Optional[str] = None,
        field: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.field = field
        self.retry_after = retry_after


class InvalidArgument(Error):
    """The request was invalid; ``field`` names the offending field (e.g. ``spec.queue``)."""


class NotFound(Error):
    """The job, queue, pool or worker does not exist in this namespace."""


class AlreadyExists(Error):
    """E.g. an idempotency key reused with a different spec."""


class FailedPrecondition(Error):
    """The system is not in a state that allows the operation."""


class ResourceExhausted(Error):
    """A limit was hit; retry after ``retry_after`` seconds if given."""


class Unauthenticated(Error):
    """No valid credentials."""


class PermissionDenied(Error):
    """Not allowed."""


class DeadlineExceeded(Error):
    """The call's deadline passed."""


class Unavailable(Error):
    """The service cannot be reached or is shutting down; retrying may help."""


class Cancelled(Error):
    """The call was cancelled."""


class Internal(Error):
    """The service failed."""


class InvalidConfig(Error):
    """The client or worker configuration is invalid (e.g. a malformed address)."""


_KINDS = {
    cls.__name__: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Unavailable,
        Cancelled,
        Internal,
        InvalidConfig,
    )
}


def from_native(err: Any) -> BaseException:
    """The exception for an error the native module reported."""
    if isinstance(err, BaseException):
        return err
    kind, message, field, reason, retry_after, code = _unpack(err)
    cls = _KINDS.get(kind, Error)
    return cls(message, code=code, reason=reason, field=field, retry_after=retry_after)


def _unpack(err: Any) -> Tuple[str, str, Optional[str], Optional[str], Optional[float], Optional[str]]:
    if isinstance(err, tuple) and len(err) == 6:
        return err
    return ("Error", str(err), None, None, None, None)


class RateLimited(Exception):
    """Raised by a handler whose upstream answered "429, retry after": the job returns to its
    queue without using a retry, and its pool (``pool``, else the one the attempt took) cools
    down for ``retry_after`` seconds."""

    def __init__(self, retry_after: float, pool: Optional[str] = None) -> None:
        super().__init__(f"rate limited; retry after {retry_after}s")
        self.retry_after = float(retry_after)
        self.pool = pool


class Fatal(Exception):
    """Raised by a handler for a failure retrying cannot fix: the job fails at once. Any other
    exception is a retryable failure."""
