"""jobplane: the Python SDK.

A blocking :class:`Client`, an asyncio :class:`AsyncClient` and a :class:`Worker`, built on the
Rust SDK (the private native module ``jobplane._native``).

>>> import jobplane
>>> jobplane.JobState("SUCCEEDED").terminal
True
"""

from ._client import DEFAULT_ADDR, AsyncClient, Client, JobPage
from ._errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    Error,
    FailedPrecondition,
    Fatal,
    Internal,
    InvalidArgument,
    InvalidConfig,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ._native import __version__
from ._types import (
    CancelResult,
    Event,
    Job,
    JobError,
    JobSpec,
    JobState,
    PoolRequest,
    RetryPolicy,
    WaitManyResult,
    WaitResult,
)
from ._worker import JobContext, Worker

__all__ = [
    "DEFAULT_ADDR",
    "AlreadyExists",
    "AsyncClient",
    "CancelResult",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Error",
    "Event",
    "FailedPrecondition",
    "Fatal",
    "Internal",
    "InvalidArgument",
    "InvalidConfig",
    "Job",
    "JobContext",
    "JobError",
    "JobPage",
    "JobSpec",
    "JobState",
    "NotFound",
    "PermissionDenied",
    "PoolRequest",
    "RateLimited",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "WaitManyResult",
    "WaitResult",
    "Worker",
    "__version__",
]
