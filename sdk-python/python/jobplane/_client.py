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
    ContextManager,
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

from . import _native, _tracing
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


def _explicit(spec: Mapping[str, Any]) -> _tracing.Trace:
    """The trace context a spec names explicitly, if any."""
    tp = spec.get("traceparent")
    return (tp, spec.get("tracestate")) if tp else None


def _carry(specs: Sequence[Dict[str, Any]], trace: _tracing.Trace) -> None:
    """Makes the submit span's context the one the specs carry: the job's trace continues from
    it (a spec's explicit context is the span's parent)."""
    if trace is not None:
        for spec in specs:
            spec["traceparent"], spec["tracestate"] = trace


def _submit_attrs(specs: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    queues = {s["queue"] for s in specs}
    namespaces = {s.get("namespace") for s in specs} - {None}
    attrs: Dict[str, Any] = {
        "messaging.system": "jobplane",
        "messaging.operation.type": "send",
    }
    if len(queues) == 1:
        (queue,) = queues
        attrs["messaging.destination.name"] = attrs["jobplane.queue"] = queue
    if len(namespaces) == 1:
        (attrs["jobplane.namespace"],) = namespaces
    return attrs


def _on_jobs(c: _tracing.Call, jobs: Sequence[Job]) -> None:
    if len(jobs) == 1:
        c.set("jobplane.job_id", jobs[0].id)
        c.set("messaging.message.id", jobs[0].id)


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
        self._attrs: Dict[str, Any] = {
            **_tracing.server_attributes(self.addr),
            "jobplane.namespace": namespace,
        }

    def _span(
        self,
        method: str,
        attrs: Optional[Mapping[str, Any]] = None,
        service: str = "JobService",
        parent: _tracing.Trace = None,
    ) -> ContextManager[_tracing.Call]:
        """The CLIENT span of one call (see ``_tracing``)."""
        return _tracing.client_call(service, method, {**self._attrs, **(attrs or {})}, parent)

    def _submit_span(
        self, specs: Sequence[Dict[str, Any]], batch: bool
    ) -> ContextManager[_tracing.Call]:
        attrs = _submit_attrs(specs)
        if not batch:
            return self._span("SubmitJob", attrs, parent=_explicit(specs[0]))
        # A batch is one call, so it carries one context: the first explicit one (as in the
        # Rust SDK).
        parent = next((t for t in map(_explicit, specs) if t is not None), None)
        attrs["messaging.batch.message_count"] = len(specs)
        return self._span("SubmitJobs", attrs, parent=parent)

    def _job_span(self, method: str, id: str) -> ContextManager[_tracing.Call]:
        return self._span(method, {"jobplane.job_id": id, "messaging.message.id": id})

    def _admin_span(
        self, method: str, *, queue: Optional[str] = None, pool: Optional[str] = None
    ) -> ContextManager[_tracing.Call]:
        return self._span(method, {"jobplane.queue": queue, "jobplane.pool": pool}, "AdminService")

    def _stream_span(self, method: str, id: str) -> _tracing.Call:
        """The span of a stream, open until the stream ends (never current: the iterator's
        consumer runs in between)."""
        return _tracing.start_call("JobService", method, {
            **self._attrs, "jobplane.job_id": id, "messaging.message.id": id,
        })

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
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
    ) -> Job:
        """Submits a job; returns it as committed (``job.created`` is False when an
        idempotency key matched an existing job). ``namespace`` defaults to the client's.
        The job's trace continues the current span (``traceparent``/``tracestate``: another
        W3C context to continue instead; see the README's Tracing)."""
        spec = _spec(queue, payload, priority, idempotency_key, timeout, max_wait, retries, pools,
                     dict(labels=labels, scheduled_at=scheduled_at, cpu=cpu, memory=memory,
                          selector=selector, namespace=namespace, traceparent=traceparent,
                          tracestate=tracestate))
        with self._submit_span([spec], batch=False) as c:
            _carry([spec], c.trace)
            job = _submitted(call(lambda done: self._native.submit(spec, done, c.trace)))
            _on_jobs(c, [job])
            return job

    def submit_batch(self, specs: Sequence[JobSpec]) -> List[Job]:
        """Submits jobs in one call: all are accepted, or none."""
        native = [s._native() for s in specs]
        with self._submit_span(native, batch=True) as c:
            _carry(native, c.trace)
            d = call(lambda done: self._native.submit_batch(native, done, c.trace))
            jobs = [_submitted(j) for j in d]
            _on_jobs(c, jobs)
            return jobs

    def get(self, id: str) -> Job:
        """The job's current snapshot."""
        with self._job_span("GetJob", id) as c:
            return Job._from(call(lambda done: self._native.get(id, done, c.trace)))

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
        with self._span("ListJobs", {"jobplane.queue": queue}) as c:
            return JobPage._from(call(lambda done: self._native.list(f, done, c.trace)))

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
        with self._job_span("WaitJob", id) as c:
            r = WaitResult._from(call(lambda done: self._native.wait(id, t, u, done, c.trace)))
            _tracing.link_jobs(c, [r.job])
            return r

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
        with self._span("WaitJobs") as c:
            r = WaitManyResult._from(
                call(lambda done: self._native.wait_many(i, mode, t, u, done, c.trace))
            )
            _tracing.link_jobs(c, [w.job for w in r.results])
            return r

    def cancel(self, id: str, grace: Optional[Seconds] = None, *, reason: str = "") -> CancelResult:
        """Cancels a job: a queued one at once; a running one is asked to stop and is cancelled
        when it does or after ``grace`` seconds (default 10)."""
        g = seconds(grace, "grace")
        with self._job_span("CancelJob", id) as c:
            d = call(lambda done: self._native.cancel(id, g, reason, done, c.trace))
            return CancelResult(Job._from(d["job"]), d["outcome"])

    def watch(self, id: str, from_seq: int = 0) -> Iterator[Event]:
        """The job's events after ``from_seq`` (0: all), ending with its terminal state."""
        span = self._stream_span("WatchJob", id)
        w = self._native.watch(id, from_seq, span.trace)
        failed: Optional[BaseException] = None
        try:
            while True:
                d = call(w.next)
                if d is None:
                    return
                yield Event._from(d)
        except Exception as e:
            failed = e
            raise
        finally:
            w.close()
            span.end(failed)

    # ---- administration

    def configure_queue(self, name: str, **config: Any) -> Dict[str, Any]:
        """Sets a queue's settings (replacing them whole): ``max_concurrency``,
        ``default_timeout``, ``default_retries`` (a count or a ``RetryPolicy``), ``max_depth``,
        ``paused``, ``default_max_wait``, ``reject_unplaceable``."""
        c = _queue_config(**config)
        with self._admin_span("ConfigureQueue", queue=name) as s:
            return dict(call(lambda done: self._native.configure_queue(name, c, done, s.trace)))

    def list_queues(self) -> List[Dict[str, Any]]:
        with self._admin_span("ListQueues") as s:
            return list(call(lambda done: self._native.list_queues(done, s.trace)))

    def list_workers(self) -> List[Dict[str, Any]]:
        with self._admin_span("ListWorkers") as s:
            return list(call(lambda done: self._native.list_workers(done, s.trace)))

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
        with self._admin_span("ConfigurePool", pool=name) as s:
            return dict(call(lambda done: self._native.configure_pool(name, c, done, s.trace)))

    def get_pool(self, name: str) -> Dict[str, Any]:
        with self._admin_span("GetPool", pool=name) as s:
            return dict(call(lambda done: self._native.get_pool(name, done, s.trace)))

    def list_pools(self) -> List[Dict[str, Any]]:
        with self._admin_span("ListPools") as s:
            return list(call(lambda done: self._native.list_pools(done, s.trace)))

    def delete_pool(self, name: str) -> None:
        with self._admin_span("DeletePool", pool=name) as s:
            call(lambda done: self._native.delete_pool(name, done, s.trace))


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
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
    ) -> Job:
        spec = _spec(queue, payload, priority, idempotency_key, timeout, max_wait, retries, pools,
                     dict(labels=labels, scheduled_at=scheduled_at, cpu=cpu, memory=memory,
                          selector=selector, namespace=namespace, traceparent=traceparent,
                          tracestate=tracestate))
        with self._submit_span([spec], batch=False) as c:
            _carry([spec], c.trace)
            job = _submitted(await acall(lambda done: self._native.submit(spec, done, c.trace)))
            _on_jobs(c, [job])
            return job

    async def submit_batch(self, specs: Sequence[JobSpec]) -> List[Job]:
        native = [s._native() for s in specs]
        with self._submit_span(native, batch=True) as c:
            _carry(native, c.trace)
            d = await acall(lambda done: self._native.submit_batch(native, done, c.trace))
            jobs = [_submitted(j) for j in d]
            _on_jobs(c, jobs)
            return jobs

    async def get(self, id: str) -> Job:
        with self._job_span("GetJob", id) as c:
            return Job._from(await acall(lambda done: self._native.get(id, done, c.trace)))

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
        with self._span("ListJobs", {"jobplane.queue": queue}) as c:
            return JobPage._from(await acall(lambda done: self._native.list(f, done, c.trace)))

    async def wait(
        self,
        id: str,
        timeout: Optional[Seconds] = None,
        *,
        until: Optional[Iterable[Union[JobState, str]]] = None,
    ) -> WaitResult:
        t, u = _timeout(timeout), _states(until)
        with self._job_span("WaitJob", id) as c:
            r = WaitResult._from(
                await acall(lambda done: self._native.wait(id, t, u, done, c.trace))
            )
            _tracing.link_jobs(c, [r.job])
            return r

    async def wait_many(
        self,
        ids: Iterable[str],
        timeout: Optional[Seconds] = None,
        mode: str = "all",
        *,
        until: Optional[Iterable[Union[JobState, str]]] = None,
    ) -> WaitManyResult:
        i, t, u = list(ids), _timeout(timeout), _states(until)
        with self._span("WaitJobs") as c:
            r = WaitManyResult._from(
                await acall(lambda done: self._native.wait_many(i, mode, t, u, done, c.trace))
            )
            _tracing.link_jobs(c, [w.job for w in r.results])
            return r

    async def cancel(
        self, id: str, grace: Optional[Seconds] = None, *, reason: str = ""
    ) -> CancelResult:
        g = seconds(grace, "grace")
        with self._job_span("CancelJob", id) as c:
            d = await acall(lambda done: self._native.cancel(id, g, reason, done, c.trace))
            return CancelResult(Job._from(d["job"]), d["outcome"])

    async def watch(self, id: str, from_seq: int = 0) -> AsyncIterator[Event]:
        span = self._stream_span("WatchJob", id)
        w = self._native.watch(id, from_seq, span.trace)
        failed: Optional[BaseException] = None
        try:
            while True:
                d = await acall(w.next)
                if d is None:
                    return
                yield Event._from(d)
        except Exception as e:
            failed = e
            raise
        finally:
            w.close()
            span.end(failed)

    async def configure_queue(self, name: str, **config: Any) -> Dict[str, Any]:
        c = _queue_config(**config)
        with self._admin_span("ConfigureQueue", queue=name) as s:
            return dict(
                await acall(lambda done: self._native.configure_queue(name, c, done, s.trace))
            )

    async def list_queues(self) -> List[Dict[str, Any]]:
        with self._admin_span("ListQueues") as s:
            return list(await acall(lambda done: self._native.list_queues(done, s.trace)))

    async def list_workers(self) -> List[Dict[str, Any]]:
        with self._admin_span("ListWorkers") as s:
            return list(await acall(lambda done: self._native.list_workers(done, s.trace)))

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
        with self._admin_span("ConfigurePool", pool=name) as s:
            return dict(
                await acall(lambda done: self._native.configure_pool(name, c, done, s.trace))
            )

    async def get_pool(self, name: str) -> Dict[str, Any]:
        with self._admin_span("GetPool", pool=name) as s:
            return dict(await acall(lambda done: self._native.get_pool(name, done, s.trace)))

    async def list_pools(self) -> List[Dict[str, Any]]:
        with self._admin_span("ListPools") as s:
            return list(await acall(lambda done: self._native.list_pools(done, s.trace)))

    async def delete_pool(self, name: str) -> None:
        with self._admin_span("DeletePool", pool=name) as s:
            await acall(lambda done: self._native.delete_pool(name, done, s.trace))


class JobPage:
    """One page of ``list``: ``jobs`` newest first, ``next_page_token`` (None at the end)."""

    def __init__(self, jobs: List[Job], next_page_token: Optional[str]) -> None:
        self.jobs = jobs
        self.next_page_token = next_page_token

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "JobPage":
        return cls([Job._from(j) for j in d["jobs"]], d["next_page_token"])
