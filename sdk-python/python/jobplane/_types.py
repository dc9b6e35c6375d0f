"""Values the API takes and returns."""

from __future__ import annotations

import datetime as _dt
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

Seconds = Union[float, int, _dt.timedelta]
"""A duration: seconds as a number, or a ``timedelta``."""

Time = Union[float, int, _dt.datetime]
"""A point in time: seconds since the Unix epoch, or an aware ``datetime``."""


class JobState(str, enum.Enum):
    """A job's state (a ``str``: ``JobState.SUCCEEDED == "SUCCEEDED"``)."""

    QUEUED = "QUEUED"
    LEASED = "LEASED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    EXPIRED = "EXPIRED"

    @property
    def terminal(self) -> bool:
        """Whether the state is final."""
        return self not in (JobState.QUEUED, JobState.LEASED, JobState.RUNNING)

    def __str__(self) -> str:
        return self.value


def seconds(value: Optional[Seconds], name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected seconds (a number) or a timedelta, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")
    return float(value)


def epoch(value: Optional[Time], name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"{name}: use an aware datetime (with a tzinfo)")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a datetime or seconds since the epoch, got {value!r}")
    return float(value)


def encode(value: Any) -> bytes:
    """A payload or result as bytes: bytes as they are, anything else as compact JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return json.dumps(value, separators=(",", ":")).encode()


def decode(data: Optional[bytes]) -> Any:
    """Bytes as the JSON value they hold; bytes that are not JSON as they are; empty as None."""
    if data is None or len(data) == 0:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return bytes(data)


def _time(value: Optional[float]) -> Optional[_dt.datetime]:
    if value is None:
        return None
    return _dt.datetime.fromtimestamp(value, tz=_dt.timezone.utc)


@dataclass(frozen=True)
class PoolRequest:
    """Capacity a job asks of a pool: ``units`` (default ``{"requests": 1}``), waiting at most
    ``max_wait`` seconds before its next pool is also tried (``None``: without bound; ``0``:
    take it now or move on)."""

    pool: str
    units: Mapping[str, int] = field(default_factory=dict)
    max_wait: Optional[Seconds] = None

    def _native(self) -> Dict[str, Any]:
        return {
            "pool": self.pool,
            "units": dict(self.units),
            "max_wait": seconds(self.max_wait, "max_wait"),
        }


@dataclass(frozen=True)
class RetryPolicy:
    """How a retryably failed attempt is retried."""

    max_retries: int
    initial_backoff: Optional[Seconds] = None
    max_backoff: Optional[Seconds] = None
    multiplier: Optional[float] = None

    def _native(self) -> Dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "initial_backoff": seconds(self.initial_backoff, "initial_backoff"),
            "max_backoff": seconds(self.max_backoff, "max_backoff"),
            "multiplier": self.multiplier,
        }


class JobSpec:
    """A job to submit (``Client.submit_batch`` takes a list of them). ``payload`` is bytes,
    or any JSON-able value (sent as JSON)."""

    def __init__(
        self,
        queue: str,
        payload: Any = None,
        *,
        priority: int = 0,
        idempotency_key: Optional[str] = None,
        timeout: Optional[Seconds] = None,
        max_wait: Optional[Seconds] = None,
        retries: Union[int, RetryPolicy, None] = None,
        pools: Optional[Sequence[PoolRequest]] = None,
        labels: Optional[Mapping[str, str]] = None,
        scheduled_at: Optional[Time] = None,
        cpu: Optional[float] = None,
        memory: Optional[int] = None,
        selector: Optional[Mapping[str, str]] = None,
        namespace: Optional[str] = None,
    ) -> None:
        self.queue = queue
        self.payload = payload
        self.priority = priority
        self.idempotency_key = idempotency_key
        self.timeout = timeout
        self.max_wait = max_wait
        self.retries = retries
        self.pools = list(pools or [])
        self.labels = dict(labels or {})
        self.scheduled_at = scheduled_at
        self.cpu = cpu
        self.memory = memory
        self.selector = dict(selector or {})
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"JobSpec({self.queue!r}, payload={self.payload!r}, priority={self.priority})"

    def _native(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "queue": self.queue,
            "payload": b"" if self.payload is None else encode(self.payload),
            "priority": self.priority,
            "idempotency_key": self.idempotency_key,
            "timeout": seconds(self.timeout, "timeout"),
            "max_wait": seconds(self.max_wait, "max_wait"),
            "pools": [p._native() for p in self.pools],
            "labels": self.labels,
            "scheduled_at": epoch(self.scheduled_at, "scheduled_at"),
            "cpu": self.cpu,
            "memory": self.memory,
            "selector": self.selector,
            "namespace": self.namespace,
        }
        if isinstance(self.retries, RetryPolicy):
            d["retry_policy"] = self.retries._native()
        elif self.retries is not None:
            d["retries"] = int(self.retries)
        return d


@dataclass(frozen=True)
class JobError:
    """Why a job or attempt failed: a stable ``reason`` and a ``message``."""

    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.reason else self.message


def _error(d: Optional[Mapping[str, Any]]) -> Optional[JobError]:
    return None if d is None else JobError(d["reason"], d["message"])


@dataclass(frozen=True)
class Job:
    """A snapshot of a job. ``result`` and ``payload`` are decoded from JSON when they hold
    JSON (else bytes); ``result_bytes`` and ``payload_bytes`` are as stored."""

    id: str
    namespace: str
    queue: str
    state: JobState
    attempt: int
    retries_used: int
    payload_bytes: bytes
    result_bytes: Optional[bytes]
    error: Optional[JobError]
    waiting_for: Optional[str]
    pool: Optional[str]
    progress: float
    priority: int
    labels: Dict[str, str]
    idempotency_key: Optional[str]
    worker_id: Optional[str]
    cancel_requested: bool
    last_seq: int
    created_at: Optional[_dt.datetime]
    started_at: Optional[_dt.datetime]
    finished_at: Optional[_dt.datetime]
    pools: List[PoolRequest]
    created: Optional[bool] = None
    """For a submit: whether this call created the job (False: an idempotency key matched)."""

    @property
    def result(self) -> Any:
        return decode(self.result_bytes)

    @property
    def payload(self) -> Any:
        return decode(self.payload_bytes)

    @classmethod
    def _from(cls, d: Mapping[str, Any], created: Optional[bool] = None) -> "Job":
        return cls(
            id=d["id"],
            namespace=d["namespace"],
            queue=d["queue"],
            state=JobState(d["state"]),
            attempt=d["attempt"],
            retries_used=d["retries_used"],
            payload_bytes=d["payload"],
            result_bytes=d["result"],
            error=_error(d["error"]),
            waiting_for=d["waiting_for"],
            pool=d["pool"],
            progress=d["progress"],
            priority=d["priority"],
            labels=d["labels"],
            idempotency_key=d["idempotency_key"],
            worker_id=d["worker_id"],
            cancel_requested=d["cancel_requested"],
            last_seq=d["last_seq"],
            created_at=_time(d["created_at"]),
            started_at=_time(d["started_at"]),
            finished_at=_time(d["finished_at"]),
            pools=[PoolRequest(p["pool"], p["units"], p["max_wait"]) for p in d["pools"]],
            created=created,
        )


@dataclass(frozen=True)
class WaitResult:
    """The job when the wait ended, and whether it reached a target state in time."""

    job: Job
    reached: bool

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "WaitResult":
        return cls(Job._from(d["job"]), d["reached"])


@dataclass(frozen=True)
class WaitManyResult:
    """One result per requested id, in order; ``reached``: the mode's condition was met."""

    results: List[WaitResult]
    reached: bool

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "WaitManyResult":
        return cls([WaitResult._from(r) for r in d["results"]], d["reached"])


@dataclass(frozen=True)
class CancelResult:
    """The job after a cancel, and what the cancel did: ``CANCELLED`` (it was queued),
    ``REQUESTED`` (its worker was told to stop) or ``ALREADY_TERMINAL``."""

    job: Job
    outcome: str


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log. ``kind`` is ``"state"`` (``state``, ``from_state``,
    ``error``, ``result_bytes``, ``waiting_for``), ``"progress"`` (``percent``, ``message``) or
    ``"output"`` (``stream``, ``data``, ``truncated``)."""

    seq: int
    job_id: str
    kind: str
    time: Optional[_dt.datetime]
    attempt: int = 0
    state: Optional[JobState] = None
    from_state: Optional[JobState] = None
    error: Optional[JobError] = None
    result_bytes: Optional[bytes] = None
    waiting_for: Optional[str] = None
    percent: Optional[float] = None
    message: Optional[str] = None
    stream: Optional[str] = None
    data: Optional[bytes] = None
    truncated: bool = False

    @property
    def terminal(self) -> bool:
        """Whether this is the job's terminal state change (its last event)."""
        return self.kind == "state" and self.state is not None and self.state.terminal

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "Event":
        kind = d["kind"]
        e = cls(seq=d["seq"], job_id=d["job_id"], kind=kind, time=_time(d["time"]))
        if kind == "state":
            return cls(
                seq=e.seq,
                job_id=e.job_id,
                kind=kind,
                time=e.time,
                attempt=d["attempt"],
                state=JobState(d["state"]),
                from_state=None if d["from_state"] is None else JobState(d["from_state"]),
                error=_error(d["error"]),
                result_bytes=d["result"],
                waiting_for=d["waiting_for"],
            )
        if kind == "progress":
            return cls(
                seq=e.seq,
                job_id=e.job_id,
                kind=kind,
                time=e.time,
                attempt=d["attempt"],
                percent=d["percent"],
                message=d["message"],
            )
        if kind == "output":
            return cls(
                seq=e.seq,
                job_id=e.job_id,
                kind=kind,
                time=e.time,
                attempt=d["attempt"],
                stream=d["stream"],
                data=d["data"],
                truncated=d["truncated"],
            )
        return e
