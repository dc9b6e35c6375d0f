"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the same calls, on one shared
connection machinery in the native module. Blocking calls release the GIL while they wait
and are interruptible by Ctrl-C (the call is then abandoned)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from . import _native
from ._errors import from_native
from ._types import (
    CancelResult,
    Event,
    Job,
    JobSpec,
    JobState,
    PoolRequest,
    RetryPolicy,
    Seconds,
    Time,
    WaitManyResult,
    WaitResult,
    seconds,
)

T = TypeVar("T")

SIGNAL_CHECK = 0.2
"""Longest a blocking call on the main thread sleeps before it looks for a Ctrl-C again."""
Done = Callable[[Any, Any], None]

DEFAULT_ADDR: str = _native.DEFAULT_ADDR
"""The address used when none is given and ``JOBPLANE_ADDR`` is unset."""


def resolve_addr(addr: Optional[str]) -> str:
    """``addr``, else ``$JOBPLANE_ADDR``, else ``http://127.0.0.1:7741``."""
    return addr or os.environ.get(_native.ADDR_ENV) or DEFAULT_ADDR


def call(start: Callable[[Done], "_native.Task"]) -> Any:
    """Runs a native call to completion, blocking (interruptibly) until it ends."""
    fut: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

    def done(result: Any, error: Any) -> None:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(from_native(error))

    task = start(done)
    try:
        if threading.current_thread() is not threading.main_thread():
            return fut.result()
        # On the main thread, Ctrl-C must interrupt the wait. A signal that lands just before
        # the thread goes to sleep on the lock does not wake it (CPython runs the handler at
        # the next bytecode), so the sleep is bounded: a missed signal is noticed within
        # SIGNAL_CHECK. The result itself wakes the wait at once.
        while True:
            try:
                return fut.result(timeout=SIGNAL_CHECK)
            except concurrent.futures.TimeoutError:
                continue
    except BaseException:
        task.cancel()
        raise


async def acall(start: Callable[[Done], "_native.Task"]) -> Any:
    """Runs a native call to completion on the running event loop."""
    loop = asyncio.get_running_loop()
    fut: "asyncio.Future[Any]" = loop.create_future()

    def settle(result: Any, error: Any) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(from_native(error))

    def done(result: Any, error: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    task = start(done)
    try:
        return await fut
    except BaseException:
        task.cancel()
        raise


def _states(until: Optional[Iterable[Union[JobState, str]]]) -> Optional[List[str]]:
    if until is None:
        return None
    return [JobState(s).value if not isinstance(s, JobState) else s.value for s in until]


def _timeout(timeout: Optional[Seconds]) -> float:
    t = seconds(timeout, "timeout")
    return float("inf") if t is None else t


def _spec(
    queue: str,
    payload: Any,
    priority: int,
    idempotency_key: Optional[str],
    timeout: Optional[Seconds],
    max_wait: Optional[Seconds],
    retries: Union[int, RetryPolicy, None],
    pools: Optional[Sequence[PoolRequest]],
    extra: Mapping[str, Any],
) -> Dict[str, Any]:
    return JobSpec(
        queue,
        payload,
        priority=priority,
        idempotency_key=idempotency_key,
        timeout=timeout,
        max_wait=max_wait,
        retries=retries,
        pools=pools,
        **extra,
    )._native()


def _submitted(d: Mapping[str, Any]) -> Job:
    return Job._from(d["job"], created=d["created"])


_QUEUE_KEYS = {
    "max_concurrency",
    "default_timeout",
    "default_retries",
    "max_depth",
    "paused",
    "default_max_wait",
    "reject_unplaceable",
}


def _queue_config(**kw: Any) -> Dict[str, Any]:
    unknown = set(kw) - _QUEUE_KEYS
    if unknown:
        raise TypeError(f"unknown queue settings: {', '.join(sorted(unknown))}")
    out = dict(kw)
    for k in ("default_timeout", "default_max_wait"):
        out[k] = seconds(out.get(k), k)
    retries = out.pop("default_retries", None)
    if isinstance(retries, RetryPolicy):
        out["default_retry_policy"] = retries._native()
    elif retries is not None:
        out["default_retries"] = int(retries)
    return out


def _pool_config(
    max_units: Optional[Mapping[str, int]],
    rates: Optional[Sequence[Mapping[str, Any]]],
    shared: bool,
    weights: Optional[Mapping[str, int]],
) -> Dict[str, Any]:
    return {
        "max_units": dict(max_units or {}),
        "rates": [
            {**r, "per": seconds(r.get("per"), "rates.per")} for r in (rates or [])
        ],
        "shared": shared,
        "weights": dict(weights or {}),
    }


class _Base:
    def __init__(self, addr: Optional[str] = None, *, namespace: str = "default") -> None:
        self.addr = resolve_addr(addr)
        self._native = _native.NativeClient(self.addr, namespace)

    @property
    def namespace(self) -> str:
        """The namespace every call is scoped to."""
        return self._native.namespace

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.addr!r}, namespace={self.namespace!r})"


class Client(_Base):
    """A blocking client.

    >>> client = jobplane.Client(addr)
    >>> job = client.submit("emails", payload={"to": "a@b.c"})
    >>> job.state
    <JobState.QUEUED: 'QUEUED'>
    >>> client.wait(job.id, timeout=0.1).reached
    False
    """

    def submit(
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
    ) -> Job:
        """Submits a job; returns it as committed (``job.created`` is False when an
        idempotency key matched an existing job). ``namespace`` defaults to the client's."""
        spec = _spec(queue, payload, priority, idempotency_key, timeout, max_wait, retries, pools,
                     dict(labels=labels, scheduled_at=scheduled_at, cpu=cpu, memory=memory,
                          selector=selector, namespace=namespace))
        return _submitted(call(lambda done: self._native.submit(spec, done)))

    def submit_batch(self, specs: Sequence[JobSpec]) -> List[Job]:
        """Submits jobs in one call: all are accepted, or none."""
        native = [s._native() for s in specs]
        return [_submitted(d) for d in call(lambda done: self._native.submit_batch(native, done))]

    def get(self, id: str) -> Job:
        """The job's current snapshot."""
        return Job._from(call(lambda done: self._native.get(id, done)))

    def list(
        self,
        *,
        queue: Optional[str] = None,
        states: Optional[Iterable[Union[JobState, str]]] = None,
        labels: Optional[Mapping[str, str]] = None,
        page_size: Optional[int] = None,
        page_token: Optional[str] = None,
    ) -> "JobPage":
        """One page of jobs, newest first."""
        f = {"queue": queue, "states": _states(states), "labels": dict(labels or {}),
             "page_size": page_size, "page_token": page_token}
        return JobPage._from(call(lambda done: self._native.list(f, done)))

    def wait(
        self,
        id: str,
        timeout: Optional[Seconds] = None,
        *,
        until: Optional[Iterable[Union[JobState, str]]] = None,
    ) -> WaitResult:
        """Waits until the job reaches a terminal state (or one of ``until``), at most
        ``timeout`` seconds (``None``: without limit)."""
        t, u = _timeout(timeout), _states(until)
        return WaitResult._from(call(lambda done: self._native.wait(id, t, u, done)))

    def wait_many(
        self,
        ids: Iterable[str],
        timeout: Optional[Seconds] = None,
        mode: str = "all",
        *,
        until: Optional[Iterable[Union[JobState, str]]] = None,
    ) -> WaitManyResult:
        """Waits until all (``mode="all"``) or any (``"any"``) of the jobs reach a terminal
        state (or one of ``until``), at most ``timeout`` seconds."""
        i, t, u = list(ids), _timeout(timeout), _states(until)
        return WaitManyResult._from(call(lambda done: self._native.wait_many(i, mode, t, u, done)))

    def cancel(self, id: str, grace: Optional[Seconds] = None, *, reason: str = "") -> CancelResult:
        """Cancels a job: a queued one at once; a running one is asked to stop and is cancelled
        when it does or after ``grace`` seconds (default 10)."""
        g = seconds(grace, "grace")
        d = call(lambda done: self._native.cancel(id, g, reason, done))
        return CancelResult(Job._from(d["job"]), d["outcome"])

    def watch(self, id: str, from_seq: int = 0) -> Iterator[Event]:
        """The job's events after ``from_seq`` (0: all), ending with its terminal state."""
        w = self._native.watch(id, from_seq)
        try:
            while True:
                d = call(w.next)
                if d is None:
                    return
                yield Event._from(d)
        finally:
            w.close()

    # ---- administration

    def configure_queue(self, name: str, **config: Any) -> Dict[str, Any]:
        """Sets a queue's settings (replacing them whole): ``max_concurrency``,
        ``default_timeout``, ``default_retries`` (a count or a ``RetryPolicy``), ``max_depth``,
        ``paused``, ``default_max_wait``, ``reject_unplaceable``."""
        c = _queue_config(**config)
        return dict(call(lambda done: self._native.configure_queue(name, c, done)))

    def list_queues(self) -> List[Dict[str, Any]]:
        return list(call(self._native.list_queues))

    def list_workers(self) -> List[Dict[str, Any]]:
        return list(call(self._native.list_workers))

    def configure_pool(
        self,
        name: str,
        *,
        max_units: Optional[Mapping[str, int]] = None,
        rates: Optional[Sequence[Mapping[str, Any]]] = None,
        shared: bool = False,
        weights: Optional[Mapping[str, int]] = None,
    ) -> Dict[str, Any]:
        """Creates a capacity pool or replaces its limits. ``rates``: dicts of ``unit``,
        ``amount``, ``per`` (seconds) and optional ``burst``."""
        c = _pool_config(max_units, rates, shared, weights)
        return dict(call(lambda done: self._native.configure_pool(name, c, done)))

    def get_pool(self, name: str) -> Dict[str, Any]:
        return dict(call(lambda done: self._native.get_pool(name, done)))

    def list_pools(self) -> List[Dict[str, Any]]:
        return list(call(self._native.list_pools))

    def delete_pool(self, name: str) -> None:
        call(lambda done: self._native.delete_pool(name, done))


class AsyncClient(_Base):
    """An asyncio client: the methods of ``Client`` as coroutines, ``watch`` as an async
    iterator."""

    async def submit(
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
    ) -> Job:
        spec = _spec(queue, payload, priority, idempotency_key, timeout, max_wait, retries, pools,
                     dict(labels=labels, scheduled_at=scheduled_at, cpu=cpu, memory=memory,
                          selector=selector, namespace=namespace))
        return _submitted(await acall(lambda done: self._native.submit(spec, done)))

    async def submit_batch(self, specs: Sequence[JobSpec]) -> List[Job]:
        native = [s._native() for s in specs]
        return [_submitted(d) for d in await acall(lambda done: self._native.submit_batch(native, done))]

    async def get(self, id: str) -> Job:
        return Job._from(await acall(lambda done: self._native.get(id, done)))

    async def list(
        self,
        *,
        queue: Optional[str] = None,
        states: Optional[Iterable[Union[JobState, str]]] = None,
        labels: Optional[Mapping[str, str]] = None,
        page_size: Optional[int] = None,
        page_token: Optional[str] = None,
    ) -> "JobPage":
        f = {"queue": queue, "states": _states(states), "labels": dict(labels or {}),
             "page_size": page_size, "page_token": page_token}
        return JobPage._from(await acall(lambda done: self._native.list(f, done)))

    async def wait(
        self,
        id: str,
        timeout: Optional[Seconds] = None,
        *,
        until: Optional[Iterable[Union[JobState, str]]] = None,
    ) -> WaitResult:
        t, u = _timeout(timeout), _states(until)
        return WaitResult._from(await acall(lambda done: self._native.wait(id, t, u, done)))

    async def wait_many(
        self,
        ids: Iterable[str],
        timeout: Optional[Seconds] = None,
        mode: str = "all",
        *,
        until: Optional[Iterable[Union[JobState, str]]] = None,
    ) -> WaitManyResult:
        i, t, u = list(ids), _timeout(timeout), _states(until)
        return WaitManyResult._from(
            await acall(lambda done: self._native.wait_many(i, mode, t, u, done))
        )

    async def cancel(
        self, id: str, grace: Optional[Seconds] = None, *, reason: str = ""
    ) -> CancelResult:
        g = seconds(grace, "grace")
        d = await acall(lambda done: self._native.cancel(id, g, reason, done))
        return CancelResult(Job._from(d["job"]), d["outcome"])

    async def watch(self, id: str, from_seq: int = 0) -> AsyncIterator[Event]:
        w = self._native.watch(id, from_seq)
        try:
            while True:
                d = await acall(w.next)
                if d is None:
                    return
                yield Event._from(d)
        finally:
            w.close()

    async def configure_queue(self, name: str, **config: Any) -> Dict[str, Any]:
        c = _queue_config(**config)
        return dict(await acall(lambda done: self._native.configure_queue(name, c, done)))

    async def list_queues(self) -> List[Dict[str, Any]]:
        return list(await acall(self._native.list_queues))

    async def list_workers(self) -> List[Dict[str, Any]]:
        return list(await acall(self._native.list_workers))

    async def configure_pool(
        self,
        name: str,
        *,
        max_units: Optional[Mapping[str, int]] = None,
        rates: Optional[Sequence[Mapping[str, Any]]] = None,
        shared: bool = False,
        weights: Optional[Mapping[str, int]] = None,
    ) -> Dict[str, Any]:
        c = _pool_config(max_units, rates, shared, weights)
        return dict(await acall(lambda done: self._native.configure_pool(name, c, done)))

    async def get_pool(self, name: str) -> Dict[str, Any]:
        return dict(await acall(lambda done: self._native.get_pool(name, done)))

    async def list_pools(self) -> List[Dict[str, Any]]:
        return list(await acall(self._native.list_pools))

    async def delete_pool(self, name: str) -> None:
        await acall(lambda done: self._native.delete_pool(name, done))


class JobPage:
    """One page of ``list``: ``jobs`` newest first, ``next_page_token`` (None at the end)."""

    def __init__(self, jobs: List[Job], next_page_token: Optional[str]) -> None:
        self.jobs = jobs
        self.next_page_token = next_page_token

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "JobPage":
        return cls([Job._from(j) for j in d["jobs"]], d["next_page_token"])
