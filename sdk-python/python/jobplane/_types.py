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
    or any JSON-able value (sent as JSON). ``traceparent``/``tracestate``: a W3C trace context
    the job's trace continues instead of the current span's (a batch carries the first one)."""

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
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
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
        self.traceparent = traceparent
        self.tracestate = tracestate

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
            "traceparent": self.traceparent,
            "tracestate": self.tracestate,
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


class Job:
    """A snapshot of a job (read-only). ``result`` and ``payload`` are decoded from JSON when
    they hold JSON (else bytes); ``result_bytes`` and ``payload_bytes`` are as stored. Fields
    are converted when read, so a large batch of submits costs little in Python."""

    __slots__ = ("_d", "created")

    def __init__(self, d: Mapping[str, Any], created: Optional[bool] = None) -> None:
        self._d = d
        self.created = created
        """For a submit: whether this call created the job (False: an idempotency key
        matched)."""

    @classmethod
    def _from(cls, d: Mapping[str, Any], created: Optional[bool] = None) -> "Job":
        return cls(d, created)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, queue={self.queue!r}, state={self.state.value})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and dict(self._d) == dict(other._d)

    __hash__ = None  # type: ignore[assignment]

    @property
    def id(self) -> str:
        return str(self._d["id"])

    @property
    def namespace(self) -> str:
        return str(self._d["namespace"])

    @property
    def queue(self) -> str:
        return str(self._d["queue"])

    @property
    def state(self) -> JobState:
        return JobState(self._d["state"])

    @property
    def attempt(self) -> int:
        """The current or last attempt's number (its fencing token); 0 before the first."""
        return int(self._d["attempt"])

    @property
    def retries_used(self) -> int:
        return int(self._d["retries_used"])

    @property
    def payload_bytes(self) -> bytes:
        return bytes(self._d["payload"])

    @property
    def payload(self) -> Any:
        return decode(self._d["payload"])

    @property
    def result_bytes(self) -> Optional[bytes]:
        r = self._d["result"]
        return None if r is None else bytes(r)

    @property
    def result(self) -> Any:
        return decode(self._d["result"])

    @property
    def error(self) -> Optional[JobError]:
        return _error(self._d["error"])

    @property
    def waiting_for(self) -> Optional[str]:
        """Why a queued job is not running, e.g. ``capacity(pool=gpt-4o)``."""
        return self._d["waiting_for"]  # type: ignore[no-any-return]

    @property
    def pool(self) -> Optional[str]:
        """The pool the current or last attempt took its capacity from."""
        return self._d["pool"]  # type: ignore[no-any-return]

    @property
    def progress(self) -> float:
        return float(self._d["progress"])

    @property
    def priority(self) -> int:
        return int(self._d["priority"])

    @property
    def labels(self) -> Dict[str, str]:
        return dict(self._d["labels"])

    @property
    def idempotency_key(self) -> Optional[str]:
        return self._d["idempotency_key"]  # type: ignore[no-any-return]

    @property
    def worker_id(self) -> Optional[str]:
        return self._d["worker_id"]  # type: ignore[no-any-return]

    @property
    def cancel_requested(self) -> bool:
        return bool(self._d["cancel_requested"])

    @property
    def last_seq(self) -> int:
        """Sequence number of the job's newest event: watch from here for what comes next."""
        return int(self._d["last_seq"])

    @property
    def timeout(self) -> Optional[float]:
        """The effective run timeout per attempt, in seconds."""
        return self._d["timeout"]  # type: ignore[no-any-return]

    @property
    def max_wait(self) -> Optional[float]:
        return self._d["max_wait"]  # type: ignore[no-any-return]

    @property
    def created_at(self) -> Optional[_dt.datetime]:
        return _time(self._d["created_at"])

    @property
    def started_at(self) -> Optional[_dt.datetime]:
        return _time(self._d["started_at"])

    @property
    def finished_at(self) -> Optional[_dt.datetime]:
        return _time(self._d["finished_at"])

    @property
    def pools(self) -> List[PoolRequest]:
        return [PoolRequest(p["pool"], p["units"], p["max_wait"]) for p in self._d["pools"]]

    @property
    def traceparent(self) -> Optional[str]:
        """The W3C ``traceparent`` of the job's trace (the service span that accepted it), if
        the job has one: what a ``wait`` span links to."""
        return self._d.get("traceparent")

    @property
    def tracestate(self) -> Optional[str]:
        """The W3C ``tracestate`` that came with the job's trace context, if any."""
        return self._d.get("tracestate")


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
        common: Dict[str, Any] = {
            "seq": d["seq"],
            "job_id": d["job_id"],
            "kind": kind,
            "time": _time(d["time"]),
        }
        if kind == "state":
            return cls(
                **common,
                attempt=d["attempt"],
                state=JobState(d["state"]),
                from_state=None if d["from_state"] is None else JobState(d["from_state"]),
                error=_error(d["error"]),
                result_bytes=d["result"],
                waiting_for=d["waiting_for"],
            )
        if kind == "progress":
            return cls(**common, attempt=d["attempt"], percent=d["percent"], message=d["message"])
        if kind == "output":
            return cls(
                **common,
                attempt=d["attempt"],
                stream=d["stream"],
                data=d["data"],
                truncated=d["truncated"],
            )
        return cls(**common)
