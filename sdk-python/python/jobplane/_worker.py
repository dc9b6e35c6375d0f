"""``Worker``: runs handlers for queues, sync (on a thread pool) or ``async def`` (on an event
loop), with the Rust SDK's worker runtime underneath (leases, heartbeats, ordered output,
reconnects, graceful shutdown)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import signal
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Mapping, Optional, Union

from . import _native, _tracing
from ._client import acall, call, resolve_addr
from ._errors import Fatal, RateLimited
from ._types import Seconds, decode, encode, seconds

if TYPE_CHECKING:
    from opentelemetry.trace import Span

Handler = Callable[["JobContext"], Union[Any, Awaitable[Any]]]


class JobContext:
    """What a handler knows of its attempt and can do for it."""

    def __init__(self, native: "_native.NativeContext") -> None:
        self._n = native
        self._span: Optional["Span"] = None

    @property
    def job_id(self) -> str:
        return self._n.job_id

    @property
    def attempt(self) -> int:
        """The attempt's number (its fencing token), from 1."""
        return self._n.attempt

    @property
    def queue(self) -> str:
        return self._n.queue

    @property
    def payload(self) -> Any:
        """The payload decoded from JSON (bytes if it is not JSON, None if empty)."""
        return decode(self._n.payload)

    @property
    def payload_bytes(self) -> bytes:
        return self._n.payload

    @property
    def labels(self) -> Dict[str, str]:
        return self._n.labels

    @property
    def priority(self) -> int:
        return self._n.priority

    @property
    def timeout(self) -> Optional[float]:
        """The attempt's run timeout in seconds, if any."""
        return self._n.timeout

    @property
    def pool(self) -> Optional[str]:
        """The capacity pool the attempt took its units from."""
        return self._n.pool

    @property
    def worker_id(self) -> str:
        return self._n.worker_id

    @property
    def traceparent(self) -> Optional[str]:
        """The W3C ``traceparent`` the service handed the attempt (its ``attempt {queue}`` span
        in the job's trace, or the submitter's context), if any: the parent of the handler's
        ``process {queue}`` span."""
        return self._n.traceparent

    @property
    def tracestate(self) -> Optional[str]:
        """The W3C ``tracestate`` that came with ``traceparent``, if any."""
        return self._n.tracestate

    @property
    def span(self) -> Optional["Span"]:
        """The handler's ``process {queue}`` span (current while the handler runs), or None
        when OpenTelemetry is not installed."""
        return self._span

    @property
    def cancelled(self) -> bool:
        """Whether the attempt must stop (cancelled, timed out, or the worker is stopping)."""
        return self._n.cancelled

    @property
    def cancel_reason(self) -> Optional[str]:
        return self._n.cancel_reason

    def wait_cancelled(self, timeout: Optional[Seconds] = None) -> bool:
        """Blocks until the attempt must stop or ``timeout`` seconds pass; True if it must
        stop. (In an ``async def`` handler use ``await ctx.wait_cancelled_async()``.)"""
        return self._n.wait_cancelled(seconds(timeout, "timeout"))

    async def wait_cancelled_async(self, timeout: Optional[Seconds] = None) -> bool:
        """Like ``wait_cancelled``, without blocking the event loop."""
        if self._n.cancelled:
            return True
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()

        def fire() -> None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass

        self._n.on_cancel(fire)
        try:
            await asyncio.wait_for(ev.wait(), seconds(timeout, "timeout"))
            return True
        except asyncio.TimeoutError:
            return False

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` once the attempt must stop (at once if it must already). It runs
        on an SDK thread: keep it short (set an event, schedule work)."""
        self._n.on_cancel(callback)

    def progress(self, percent: float, message: str = "") -> None:
        """Reports progress, 0-100."""
        self._n.progress(float(percent), message)

    def output(self, data: Union[str, bytes], stream: str = "stdout") -> None:
        """Sends output (delivered in order, before the outcome)."""
        self._n.output(data.encode() if isinstance(data, str) else bytes(data), stream)

    def report_usage(self, units: Mapping[str, int]) -> None:
        """Reports what the attempt really used of its pool's units (e.g. tokens)."""
        self._n.report_usage(dict(units))


# What a client's cancel says (`ctx.cancel_reason`); any other stop (a run timeout, the
# worker's shutdown) is a failure of the attempt.
_CLIENT_CANCEL = "CANCELLED"


class _Outcome:
    """How a handler ended, as reported to the service: ``kind`` is ``succeeded``, ``failed``
    (retryable), ``fatal``, ``rate_limited`` or ``cancelled``; ``error`` says why the ending
    counts as an error on the handler's span (as in the Rust SDK: everything but a success
    and a client's cancel), None if it does not."""

    __slots__ = ("kind", "data", "message", "exc", "error")

    def __init__(
        self,
        kind: str,
        data: bytes = b"",
        message: str = "",
        exc: Optional[BaseException] = None,
        error: Optional[str] = None,
    ) -> None:
        self.kind = kind
        self.data = data
        self.message = message
        self.exc = exc
        self.error = error

    @classmethod
    def of(cls, ctx: JobContext, result: Any, exc: Optional[BaseException]) -> "_Outcome":
        if exc is None:
            try:
                data = b"" if result is None else encode(result)
            except (TypeError, ValueError) as e:
                msg = f"the handler's result is neither bytes nor JSON-able: {e}"
                return cls("fatal", message=msg, error=msg)
            return cls("succeeded", data)
        if isinstance(exc, RateLimited):
            pool = f" by pool {exc.pool}" if exc.pool else ""
            return cls("rate_limited", message=str(exc), exc=exc, error=f"rate limited{pool}")
        if ctx.cancelled:
            reason = ctx.cancel_reason
            if reason == _CLIENT_CANCEL:
                stopped = None
            elif reason:
                stopped = f"cancelled: {reason}"
            else:
                stopped = "cancelled without a cancel request from the service"
            return cls("cancelled", exc=exc, error=stopped)
        if isinstance(exc, Fatal):
            msg = str(exc) or type(exc).__name__
            return cls("fatal", message=msg, exc=exc, error=msg)
        msg = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return cls("failed", message=msg, exc=exc, error=msg)

    def report(self, done: "_native.Done") -> None:
        if self.kind == "succeeded":
            done.ok(self.data)
        elif self.kind == "rate_limited":
            assert isinstance(self.exc, RateLimited)
            done.rate_limited(self.exc.retry_after, self.exc.pool)
        elif self.kind == "cancelled":
            done.cancelled()
        else:
            done.fail(self.message, self.kind == "failed")


def _process_span(ctx: JobContext) -> Any:
    n = ctx._n
    parent = (n.traceparent, n.tracestate) if n.traceparent else None
    return _tracing.process_span(n.queue, n.job_id, n.attempt, n.pool, n.worker_id, parent)


class Worker:
    """Runs handlers for jobs of its queues.

    >>> worker = jobplane.Worker(queues=["emails"], concurrency=4, addr=addr)
    >>> @worker.handler("emails")
    ... def send(ctx):
    ...     return {"sent": ctx.payload["to"]}
    """

    def __init__(
        self,
        queues: Optional[List[str]] = None,
        concurrency: int = 1,
        *,
        addr: Optional[str] = None,
        namespace: str = "default",
        labels: Optional[Mapping[str, str]] = None,
        cpu: Optional[float] = None,
        memory: Optional[int] = None,
        name: Optional[str] = None,
        id: Optional[str] = None,
        shutdown_timeout: Optional[Seconds] = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        self.addr = resolve_addr(addr)
        self.queues = list(queues or [])
        self.concurrency = concurrency
        self._options: Dict[str, Any] = {
            "namespace": namespace,
            "concurrency": concurrency,
            "labels": dict(labels or {}),
            "cpu": cpu,
            "memory": memory,
            "name": name,
            "id": id,
            "shutdown_timeout": seconds(shutdown_timeout, "shutdown_timeout"),
        }
        self._handlers: Dict[str, Handler] = {}
        self._native: Optional[_native.NativeWorker] = None
        self._stop_requested = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def handler(self, queue: str) -> Callable[[Handler], Handler]:
        """Registers the decorated function (sync or ``async def``) for ``queue``."""

        def register(fn: Handler) -> Handler:
            self._handlers[queue] = fn
            if queue not in self.queues:
                self.queues.append(queue)
            return fn

        return register

    @property
    def id(self) -> Optional[str]:
        """The worker's id: the one given, else generated when it starts running."""
        if self._native is not None:
            return self._native.id
        given = self._options.get("id")
        return given if isinstance(given, str) else None

    def _build(self) -> "_native.NativeWorker":
        missing = [q for q in self.queues if q not in self._handlers]
        if missing:
            raise ValueError(f"queues without a handler: {', '.join(missing)}")
        if not self.queues:
            raise ValueError("no queues: register a handler with @worker.handler(queue)")
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="jobplane-handler"
        )
        self._native = _native.NativeWorker(self.addr, self.queues, self._dispatch, self._options)
        if self._stop_requested.is_set():
            self._native.stop()
        return self._native

    def _dispatch(self, native_ctx: "_native.NativeContext", done: "_native.Done") -> None:
        # Called on an SDK thread: only schedule the handler here.
        ctx = JobContext(native_ctx)
        fn = self._handlers[native_ctx.queue]
        if inspect.iscoroutinefunction(fn):
            loop = self._loop
            assert loop is not None
            asyncio.run_coroutine_threadsafe(self._run_async(fn, ctx, done), loop)
        else:
            assert self._pool is not None
            self._pool.submit(self._run_sync, fn, ctx, done)

    # The handler runs inside its `process {queue}` span, current on its thread (sync) or in its
    # task (async) so that the user's spans nest under it; the span ends before the outcome is
    # reported, inside the service's `attempt` span that the report ends.

    @staticmethod
    def _run_sync(fn: Handler, ctx: JobContext, done: "_native.Done") -> None:
        with _process_span(ctx) as span:
            ctx._span = span
            try:
                outcome = _Outcome.of(ctx, fn(ctx), None)
            except BaseException as e:  # noqa: BLE001 - every ending is reported
                outcome = _Outcome.of(ctx, None, e)
            _tracing.set_outcome(span, outcome.kind, outcome.exc, outcome.error)
        outcome.report(done)

    @staticmethod
    async def _run_async(fn: Handler, ctx: JobContext, done: "_native.Done") -> None:
        with _process_span(ctx) as span:
            ctx._span = span
            try:
                outcome = _Outcome.of(ctx, await fn(ctx), None)
            except BaseException as e:  # noqa: BLE001
                outcome = _Outcome.of(ctx, None, e)
            _tracing.set_outcome(span, outcome.kind, outcome.exc, outcome.error)
        outcome.report(done)

    def stop(self) -> None:
        """Starts a graceful shutdown: no new jobs; running handlers finish (or are cancelled
        after the shutdown timeout); then ``run`` returns."""
        self._stop_requested.set()
        if self._native is not None:
            self._native.stop()

    def run(self) -> None:
        """Runs until ``stop()``, SIGTERM or Ctrl-C (then drains gracefully). ``async def``
        handlers run on an event loop of their own thread."""
        needs_loop = any(inspect.iscoroutinefunction(h) for h in self._handlers.values())
        loop_thread = None
        if needs_loop:
            self._loop = asyncio.new_event_loop()
            loop_thread = threading.Thread(
                target=self._loop.run_forever, name="jobplane-async-handlers", daemon=True
            )
            loop_thread.start()
        native = self._build()
        restore = self._install_signals()
        try:
            call(native.run)
        finally:
            restore()
            self._teardown()
            if self._loop is not None and loop_thread is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                loop_thread.join()
                self._loop.close()
                self._loop = None

    async def run_async(self) -> None:
        """Runs on the current event loop until ``stop()``, SIGTERM or Ctrl-C; sync handlers run
        on a thread pool."""
        self._loop = asyncio.get_running_loop()
        native = self._build()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        try:
            await acall(native.run)
        finally:
            for sig in installed:
                self._loop.remove_signal_handler(sig)
            self._teardown()
            self._loop = None

    def _teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self._native = None

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {}

        def on_signal(signum: int, frame: Any) -> None:
            self.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)

        return restore
