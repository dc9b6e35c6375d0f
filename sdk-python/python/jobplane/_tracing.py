"""OpenTelemetry spans of the SDK, when the OpenTelemetry API is installed (``pip install
'jobplane[otel]'``). Without it every helper here is a no-op: nothing is traced and nothing is
propagated beyond what the caller passes explicitly.

The SDK only uses the API (``opentelemetry.trace.get_tracer("jobplane", version)``); whether
spans are recorded and where they go is the application's choice of tracer provider. The wire
format is W3C Trace Context whatever the global propagator is: the service and the worker
protocol carry exactly ``traceparent`` and ``tracestate``.
"""

from __future__ import annotations

import contextlib
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Tuple,
    Union,
)
from urllib.parse import urlsplit

from ._errors import Error

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import trace as _otel
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the optional extra is not installed: tracing is off
    _otel = None  # type: ignore[assignment]
    _otel_context = None  # type: ignore[assignment]
    TraceContextTextMapPropagator = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

ENABLED: bool = _otel is not None
"""Whether the OpenTelemetry API could be imported (spans are then made; whether they are
recorded is up to the tracer provider)."""

Trace = Optional[Tuple[str, Optional[str]]]
"""A W3C trace context as the native module takes it: ``(traceparent, tracestate)``."""

AttributeValue = Union[str, bool, int, float]

_GRPC_CODES = {
    name: i
    for i, name in enumerate(
        "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS "
        "PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE "
        "UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED".split()
    )
}

_tracer: Optional["Tracer"] = None
_propagator: Any = (
    None if TraceContextTextMapPropagator is None else TraceContextTextMapPropagator()
)


def tracer() -> "Tracer":
    """The SDK's tracer (a proxy until the application sets a tracer provider)."""
    global _tracer
    if _tracer is None:
        from ._native import __version__

        _tracer = _otel.get_tracer("jobplane", __version__)
    return _tracer


def _context(trace: Trace) -> Any:
    """The OpenTelemetry context a W3C ``(traceparent, tracestate)`` describes."""
    carrier = {"traceparent": trace[0]} if trace else {}
    if trace and trace[1]:
        carrier["tracestate"] = trace[1]
    return _propagator.extract(carrier)


def _inject() -> Trace:
    """The current context as ``(traceparent, tracestate)``; None if there is no valid span."""
    carrier: Dict[str, str] = {}
    _propagator.inject(carrier)
    tp = carrier.get("traceparent")
    return None if tp is None else (tp, carrier.get("tracestate") or None)


def server_attributes(addr: str) -> Dict[str, AttributeValue]:
    """``server.address`` and ``server.port`` of a client's address (none for several)."""
    if "," in addr:
        return {}
    try:
        parts = urlsplit(addr if "://" in addr else "http://" + addr)
        out: Dict[str, AttributeValue] = {}
        if parts.hostname:
            out["server.address"] = parts.hostname
        if parts.port is not None:
            out["server.port"] = parts.port
        return out
    except ValueError:
        return {}


def record_error(span: "Span", exc: BaseException) -> None:
    """Marks ``span`` failed by ``exc``: an ``exception`` event, status ERROR, ``error.type``
    (the gRPC code's name for a call the service refused, else the exception's class) and
    ``rpc.grpc.status_code`` when there is one."""
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    code = exc.code if isinstance(exc, Error) else None
    if code is not None and code in _GRPC_CODES:
        span.set_attribute("rpc.grpc.status_code", _GRPC_CODES[code])
    span.set_attribute("error.type", code or type(exc).__qualname__)
    name, msg = type(exc).__name__, str(exc)
    span.set_status(Status(StatusCode.ERROR, f"{name}: {msg}" if msg else name))


class Call:
    """One client call's span (None without OpenTelemetry). ``trace`` is the context the call
    carries to the service: the call's span's, else an explicit one, else None."""

    __slots__ = ("span", "trace")

    def __init__(self, span: Optional["Span"], trace: Trace) -> None:
        self.span = span
        self.trace = trace

    def set(self, key: str, value: Optional[AttributeValue]) -> None:
        if self.span is not None and value is not None:
            self.span.set_attribute(key, value)

    def link(self, traceparent: Optional[str], tracestate: Optional[str], job_id: str) -> None:
        """Links the span to a job's trace (a no-op if the job has none, or for an
        OpenTelemetry API older than 1.23, which cannot add a link to a started span)."""
        if self.span is None or not traceparent or not hasattr(self.span, "add_link"):
            return
        linked = _otel.get_current_span(_context((traceparent, tracestate))).get_span_context()
        if linked.is_valid:
            self.span.add_link(linked, {"jobplane.job_id": job_id})

    def end(self, exc: Optional[BaseException] = None) -> None:
        """Ends the span, failed by ``exc`` if given (``client_call`` ends its own; the caller
        of ``start_call`` ends that one)."""
        if self.span is None:
            return
        if exc is None:
            self.span.set_attribute("rpc.grpc.status_code", 0)
        else:
            record_error(self.span, exc)
        self.span.end()


_UNTRACED = Call(None, None)


def _start(
    service: str,
    method: str,
    attributes: Mapping[str, Optional[AttributeValue]],
    parent: Trace,
) -> "Span":
    attrs: Dict[str, AttributeValue] = {
        "rpc.system": "grpc",
        "rpc.service": f"jobplane.v1.{service}",
        "rpc.method": method,
    }
    attrs.update((k, v) for k, v in attributes.items() if v is not None)
    return tracer().start_span(
        f"jobplane.v1.{service}/{method}",
        context=_context(parent) if parent else None,
        kind=_otel.SpanKind.CLIENT,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    )


@contextlib.contextmanager
def client_call(
    service: str,
    method: str,
    attributes: Mapping[str, Optional[AttributeValue]],
    parent: Trace = None,
) -> Iterator[Call]:
    """A CLIENT span around one call, current while it runs (a child of ``parent`` if given,
    else of the current span); an exception out of the block is recorded on it. Without
    OpenTelemetry the call carries ``parent`` as it is."""
    if _otel is None:
        yield Call(None, parent)
        return
    span = _start(service, method, attributes, parent)
    with _otel.use_span(span, end_on_exit=False, record_exception=False,
                        set_status_on_exception=False):
        call = Call(span, _inject())
        try:
            yield call
        except BaseException as e:
            call.end(e)
            raise
    call.end()


def start_call(
    service: str, method: str, attributes: Mapping[str, Optional[AttributeValue]]
) -> Call:
    """A CLIENT span that is not made current (for a stream iterated across many steps); the
    caller ends it with ``Call.end``."""
    if _otel is None:
        return _UNTRACED
    span = _start(service, method, attributes, None)
    token = _otel_context.attach(_otel.set_span_in_context(span))
    try:
        trace = _inject()
    finally:
        _otel_context.detach(token)
    return Call(span, trace)


def link_jobs(call: Call, jobs: Iterable[Any]) -> None:
    """Links ``call``'s span to the traces of ``jobs`` (``Job`` views)."""
    for job in jobs:
        call.link(job.traceparent, job.tracestate, job.id)


# ---- the worker ---------------------------------------------------------------------------


@contextlib.contextmanager
def process_span(
    queue: str,
    job_id: str,
    attempt: int,
    pool: Optional[str],
    worker_id: str,
    parent: Trace,
) -> Iterator[Optional["Span"]]:
    """The CONSUMER span ``process {queue}`` of one attempt, current while the handler runs,
    a child of the context the service handed the attempt (a root span if it gave none)."""
    if _otel is None:
        yield None
        return
    attrs: Dict[str, AttributeValue] = {
        "messaging.system": "jobplane",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": job_id,
        "jobplane.job_id": job_id,
        "jobplane.queue": queue,
        "jobplane.attempt": attempt,
        "jobplane.worker_id": worker_id,
    }
    if pool is not None:
        attrs["jobplane.pool"] = pool
    # An attempt without a trace context starts a trace of its own, never continuing whatever
    # happens to be current on the handler's thread.
    parent_context = _context(parent) if parent else _otel_context.Context()
    span = tracer().start_span(
        f"process {queue}",
        context=parent_context,
        kind=_otel.SpanKind.CONSUMER,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    )
    with _otel.use_span(span, end_on_exit=True, record_exception=False,
                        set_status_on_exception=False):
        yield span


def set_outcome(
    span: Optional["Span"], outcome: str, exc: Optional[BaseException], error: Optional[str]
) -> None:
    """Records how a handler ended on its span: ``jobplane.outcome``, the exception it raised
    (an event), and, if the ending counts as an error (``error``: the status description),
    status ERROR and ``error.type``."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("jobplane.outcome", outcome)
    if exc is not None:
        span.record_exception(exc)
    if error is not None:
        span.set_attribute("error.type", type(exc).__qualname__ if exc is not None else outcome)
        span.set_status(Status(StatusCode.ERROR, error))
