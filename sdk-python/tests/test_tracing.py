"""OpenTelemetry in the Python SDK.

In-process tests record the SDK's spans with the OpenTelemetry SDK's in-memory exporter (the
service runs without a collector; what it did with the context shows in the job's
``traceparent``). The end-to-end test runs a real OTLP/gRPC receiver and points the service and
a Python client and worker process at it through the standard ``OTEL_*`` variables. A
subprocess without the ``opentelemetry`` package checks that nothing depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import jobplane
from conftest import Server

LONG = 30.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MISSING = "0190a1c2-0000-7000-8000-000000000000"
HERE = Path(__file__).resolve().parent

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans ended during the test. The process's tracer provider is set once (the
    OpenTelemetry API allows no other): the first test of this module installs it."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, name: str) -> List[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = named(exporter, name)
    names = [s.name for s in exporter.get_finished_spans()]
    assert len(found) == 1, f"one {name!r} span expected among {names}"
    return found[0]


def hex_trace(span: Any) -> str:
    return format(span.context.trace_id, "032x")


def trace_id_of(traceparent: Optional[str]) -> Optional[str]:
    return None if traceparent is None else traceparent.split("-")[1]


def span_id_of(traceparent: Optional[str]) -> Optional[str]:
    return None if traceparent is None else traceparent.split("-")[2]


def run_worker(worker: jobplane.Worker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


# ---- client spans -------------------------------------------------------------------------


def test_submit_is_a_client_span_in_the_current_trace(
    addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(addr)
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("checkout") as app:
        job = client.submit("emails", payload={"to": "a@b.c"})

    submit = one(spans, "jobplane.v1.JobService/SubmitJob")
    assert submit.kind == SpanKind.CLIENT
    assert submit.parent is not None and submit.parent.span_id == app.get_span_context().span_id
    assert submit.context.trace_id == app.get_span_context().trace_id
    attrs = dict(submit.attributes or {})
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "jobplane.v1.JobService"
    assert attrs["rpc.method"] == "SubmitJob"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["messaging.destination.name"] == attrs["jobplane.queue"] == "emails"
    assert attrs["jobplane.job_id"] == attrs["messaging.message.id"] == job.id
    assert attrs["jobplane.namespace"] == "default"
    assert attrs["server.address"] == "127.0.0.1" and isinstance(attrs["server.port"], int)
    assert submit.status.status_code == StatusCode.UNSET
    assert submit.instrumentation_scope is not None
    assert submit.instrumentation_scope.name == "jobplane"
    assert submit.instrumentation_scope.version == jobplane.__version__


def test_an_explicit_traceparent_is_the_submit_spans_parent(
    addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(addr)
    client.submit("emails", traceparent=TRACEPARENT, tracestate="vendor=opaque")
    submit = one(spans, "jobplane.v1.JobService/SubmitJob")
    assert hex_trace(submit) == TRACE_ID
    assert submit.parent is not None and format(submit.parent.span_id, "016x") == PARENT_ID
    assert submit.context.trace_state.get("vendor") == "opaque"

    # A batch is one call: its span continues the first explicit context.
    specs = [jobplane.JobSpec("emails"), jobplane.JobSpec("emails", traceparent=TRACEPARENT)]
    client.submit_batch(specs)
    batch = one(spans, "jobplane.v1.JobService/SubmitJobs")
    assert hex_trace(batch) == TRACE_ID
    attrs = dict(batch.attributes or {})
    assert attrs["messaging.batch.message_count"] == 2
    assert attrs["rpc.method"] == "SubmitJobs"


def test_a_failed_call_has_an_error_status_and_the_exception(
    addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(addr)
    with pytest.raises(jobplane.NotFound):
        client.get(MISSING)
    get = one(spans, "jobplane.v1.JobService/GetJob")
    assert get.kind == SpanKind.CLIENT
    assert get.status.status_code == StatusCode.ERROR
    attrs = dict(get.attributes or {})
    assert attrs["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert attrs["error.type"] == "NOT_FOUND"
    assert attrs["jobplane.job_id"] == MISSING
    (event,) = get.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"].endswith("NotFound")

    with pytest.raises(jobplane.InvalidArgument):
        client.configure_pool("bad pool name", max_units={"requests": 1})
    admin = one(spans, "jobplane.v1.AdminService/ConfigurePool")
    assert dict(admin.attributes or {})["rpc.service"] == "jobplane.v1.AdminService"
    assert admin.status.status_code == StatusCode.ERROR


def test_every_call_carries_its_span(addr: str, spans: InMemorySpanExporter) -> None:
    """Calls other than submit carry their span too: the service's spans join the caller's
    trace (seen here through a cancel, whose returned job is unchanged, and a watch)."""
    client = jobplane.Client(addr)
    tracer = trace.get_tracer("app")
    job = client.submit("nobody")
    with tracer.start_as_current_span("admin") as app:
        client.cancel(job.id, reason="test")
        events = list(client.watch(job.id))
        client.list(queue="nobody")
        client.list_queues()
    assert events[-1].state == jobplane.JobState.CANCELLED
    names = {
        "jobplane.v1.JobService/CancelJob",
        "jobplane.v1.JobService/WatchJob",
        "jobplane.v1.JobService/ListJobs",
        "jobplane.v1.AdminService/ListQueues",
    }
    for name in names:
        s = one(spans, name)
        assert s.parent is not None and s.parent.span_id == app.get_span_context().span_id, name
        assert s.status.status_code == StatusCode.UNSET, name
    watch = one(spans, "jobplane.v1.JobService/WatchJob")
    assert dict(watch.attributes or {})["jobplane.job_id"] == job.id


def test_async_client_spans(addr: str, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("app")

    async def main() -> None:
        client = jobplane.AsyncClient(addr)
        with tracer.start_as_current_span("async-app"):
            await client.submit("aq")
            with pytest.raises(jobplane.NotFound):
                await client.get(MISSING)

    asyncio.run(main())
    app = one(spans, "async-app")
    submit = one(spans, "jobplane.v1.JobService/SubmitJob")
    get = one(spans, "jobplane.v1.JobService/GetJob")
    for s in (submit, get):
        assert s.parent is not None and s.parent.span_id == app.context.span_id
    assert get.status.status_code == StatusCode.ERROR


# ---- worker spans -------------------------------------------------------------------------


def test_the_handler_runs_in_a_process_span_that_nests_its_spans(
    addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(addr)
    client.configure_pool("llm", max_units={"requests": 1})
    worker = jobplane.Worker(queues=["work"], concurrency=4, addr=addr)
    tracer = trace.get_tracer("app")
    seen: Dict[str, Dict[str, Any]] = {}

    @worker.handler("work")
    def work(ctx: jobplane.JobContext) -> Any:
        kind = ctx.payload["do"]
        seen[kind] = {"span": ctx.span, "worker_id": ctx.worker_id}
        with tracer.start_as_current_span(f"user {kind}"):
            if kind == "fail":
                raise ValueError("boom")
            if kind == "fatal":
                raise jobplane.Fatal("no way")
            if kind == "429" and ctx.attempt == 1:
                raise jobplane.RateLimited(retry_after=0.05)
            return "ok"

    t = run_worker(worker)
    try:
        ok = client.submit("work", {"do": "ok"})
        fail = client.submit("work", {"do": "fail"}, retries=0)
        fatal = client.submit("work", {"do": "fatal"}, retries=3)
        limited = client.submit("work", {"do": "429"}, retries=0,
                                pools=[jobplane.PoolRequest("llm")])
        r = client.wait_many([ok.id, fail.id, fatal.id, limited.id], timeout=LONG)
        assert r.reached
        states = [w.job.state for w in r.results]
        assert states == ["SUCCEEDED", "FAILED", "FAILED", "SUCCEEDED"]
    finally:
        worker.stop()
        t.join(LONG)

    process = named(spans, "process work")
    by_job: Dict[str, List[ReadableSpan]] = {}
    for s in process:
        by_job.setdefault(str((s.attributes or {})["jobplane.job_id"]), []).append(s)
    assert sorted(len(v) for v in by_job.values()) == [1, 1, 1, 2]

    for job, kind in ((ok, "ok"), (fail, "fail"), (fatal, "fatal"), (limited, "429")):
        attempts = sorted(by_job[job.id], key=lambda s: s.start_time or 0)
        for n, s in enumerate(attempts, 1):
            assert s.kind == SpanKind.CONSUMER
            attrs = dict(s.attributes or {})
            assert attrs["messaging.system"] == "jobplane"
            assert attrs["messaging.operation.type"] == "process"
            assert attrs["messaging.destination.name"] == attrs["jobplane.queue"] == "work"
            assert attrs["messaging.message.id"] == job.id
            assert attrs["jobplane.attempt"] == n
            assert attrs["jobplane.worker_id"] == seen[kind]["worker_id"]
        # The handler's own span nests under the process span; ctx.span is that span.
        last = attempts[-1]
        user = [u for u in named(spans, f"user {kind}")
                if u.context.trace_id == last.context.trace_id]
        assert user and all(u.parent is not None for u in user)
        assert last.context.span_id in {u.parent.span_id for u in user if u.parent}
        assert seen[kind]["span"].get_span_context().span_id == last.context.span_id

    ok_span, = by_job[ok.id]
    assert ok_span.status.status_code == StatusCode.UNSET
    assert dict(ok_span.attributes or {})["jobplane.outcome"] == "succeeded"
    assert ok_span.events == ()

    fail_span, = by_job[fail.id]
    assert fail_span.status.status_code == StatusCode.ERROR
    assert fail_span.status.description == "ValueError: boom"
    assert dict(fail_span.attributes or {})["error.type"] == "ValueError"
    assert [e.name for e in fail_span.events] == ["exception"]

    fatal_span, = by_job[fatal.id]
    assert fatal_span.status.status_code == StatusCode.ERROR
    assert dict(fatal_span.attributes or {})["jobplane.outcome"] == "fatal"
    assert dict(fatal_span.attributes or {})["error.type"] == "Fatal"

    # Rate limited: the attempt failed (the job is requeued without using a retry).
    limited_first, limited_second = sorted(by_job[limited.id], key=lambda s: s.start_time or 0)
    assert limited_first.status.status_code == StatusCode.ERROR
    assert limited_first.status.description == "rate limited"
    assert dict(limited_first.attributes or {})["jobplane.outcome"] == "rate_limited"
    assert dict(limited_first.attributes or {})["jobplane.pool"] == "llm"
    assert [e.name for e in limited_first.events] == ["exception"]
    assert limited_second.status.status_code == StatusCode.UNSET
    assert dict(limited_second.attributes or {})["jobplane.outcome"] == "succeeded"


def test_a_clients_cancel_is_not_an_error_a_stop_without_one_is(
    addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(addr)
    worker = jobplane.Worker(queues=["slow"], concurrency=2, addr=addr, shutdown_timeout=0.2)
    started = {"cancel": threading.Event(), "shutdown": threading.Event()}

    @worker.handler("slow")
    def slow(ctx: jobplane.JobContext) -> None:
        started[ctx.payload].set()
        assert ctx.wait_cancelled(LONG)
        raise RuntimeError("stopped")

    t = run_worker(worker)
    try:
        cancelled = client.submit("slow", "cancel")
        assert started["cancel"].wait(LONG)
        assert client.cancel(cancelled.id, grace=LONG).outcome == "REQUESTED"
        assert client.wait(cancelled.id, timeout=LONG).job.state == "CANCELLED"
        stopped = client.submit("slow", "shutdown")
        assert started["shutdown"].wait(LONG)
    finally:
        worker.stop()  # drains: the handler still running is stopped after the shutdown timeout
        t.join(LONG)
    by_job = {(s.attributes or {})["jobplane.job_id"]: s for s in named(spans, "process slow")}
    cancel = by_job[cancelled.id]
    assert dict(cancel.attributes or {})["jobplane.outcome"] == "cancelled"
    assert cancel.status.status_code == StatusCode.UNSET
    assert [e.name for e in cancel.events] == ["exception"]
    shutdown = by_job[stopped.id]
    assert dict(shutdown.attributes or {})["jobplane.outcome"] == "cancelled"
    assert shutdown.status.status_code == StatusCode.ERROR


def test_async_handlers_and_client_calls_in_handlers_nest_under_the_process_span(
    addr: str, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("app")

    async def main() -> None:
        client = jobplane.AsyncClient(addr)
        worker = jobplane.Worker(queues=["aq"], concurrency=4, addr=addr)

        @worker.handler("aq")
        async def handle(ctx: jobplane.JobContext) -> Any:
            with tracer.start_as_current_span("user async"):
                await asyncio.sleep(0)  # the span stays current across a suspension
                await client.get(ctx.job_id)
            return 1

        run = asyncio.ensure_future(worker.run_async())
        job = await client.submit("aq")
        assert (await client.wait(job.id, timeout=LONG)).job.state == "SUCCEEDED"
        worker.stop()
        await asyncio.wait_for(run, LONG)

    asyncio.run(main())
    process = one(spans, "process aq")
    user = one(spans, "user async")
    get = one(spans, "jobplane.v1.JobService/GetJob")
    assert user.parent is not None and user.parent.span_id == process.context.span_id
    assert get.parent is not None and get.parent.span_id == user.context.span_id


# ---- the helpers, without a service ------------------------------------------------------


def test_a_process_span_continues_the_attempts_context(spans: InMemorySpanExporter) -> None:
    from jobplane import _tracing

    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("unrelated"):  # never the parent of an attempt
        with _tracing.process_span("q", "job-1", 2, "llm", "w-1", (TRACEPARENT, "k=v")) as span:
            assert span is not None and trace.get_current_span() is span
            with tracer.start_as_current_span("user"):
                pass
            _tracing.set_outcome(span, "failed", ValueError("boom"), "ValueError: boom")
        with _tracing.process_span("q", "job-2", 1, None, "w-1", None) as root:
            _tracing.set_outcome(root, "succeeded", None, None)
    first, second = sorted(named(spans, "process q"), key=lambda s: s.start_time or 0)
    assert hex_trace(first) == TRACE_ID
    assert first.parent is not None and first.parent.is_remote
    assert format(first.parent.span_id, "016x") == PARENT_ID
    assert first.context.trace_state.get("k") == "v"
    assert dict(first.attributes or {})["jobplane.pool"] == "llm"
    assert first.status.status_code == StatusCode.ERROR
    assert one(spans, "user").parent.span_id == first.context.span_id  # type: ignore[union-attr]
    # Without a context from the service the attempt starts a trace of its own.
    assert second.parent is None
    assert "jobplane.pool" not in dict(second.attributes or {})


def test_a_call_links_to_a_jobs_trace_and_ignores_what_is_not_one(
    spans: InMemorySpanExporter,
) -> None:
    from jobplane import _tracing

    with _tracing.client_call("JobService", "WaitJob", {"jobplane.job_id": "j"}) as call:
        assert call.trace is not None and trace_id_of(call.trace[0]) == hex_trace(call.span)
        call.link(TRACEPARENT, None, "j")
        call.link(None, None, "none")
        call.link("garbage", None, "malformed")
    (link,) = one(spans, "jobplane.v1.JobService/WaitJob").links
    assert format(link.context.trace_id, "032x") == TRACE_ID


def test_without_the_api_the_helpers_do_nothing_but_pass_explicit_contexts(
    monkeypatch: pytest.MonkeyPatch, spans: InMemorySpanExporter
) -> None:
    from jobplane import _tracing

    monkeypatch.setattr(_tracing, "_otel", None)
    with _tracing.client_call("JobService", "GetJob", {}) as call:
        assert call.span is None and call.trace is None
    with _tracing.client_call("JobService", "SubmitJob", {}, (TRACEPARENT, None)) as call:
        assert call.trace == (TRACEPARENT, None)
    with _tracing.process_span("q", "j", 1, None, "w", (TRACEPARENT, None)) as span:
        assert span is None
    _tracing.start_call("JobService", "WatchJob", {}).end()
    assert spans.get_finished_spans() == ()


class Received:
    """A span as an OTLP receiver got it, with its resource's ``service.name``."""

    def __init__(self, service: str, span: trace_pb2.Span) -> None:
        self.service = service
        self.span = span
        self.name = span.name
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_id = span.parent_span_id.hex()
        self.attrs = {kv.key: value(kv.value) for kv in span.attributes}

    def __repr__(self) -> str:
        return f"{self.service}:{self.name}"


def value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: List[Received] = []
        self.lock = threading.Lock()

    def Export(  # noqa: N802 - the generated servicer's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for rs in request.resource_spans:
                service = next(
                    (value(kv.value) for kv in rs.resource.attributes if kv.key == "service.name"),
                    "",
                )
                for ss in rs.scope_spans:
                    self.spans.extend(Received(service, sp) for sp in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def receiver() -> Iterator[Tuple[str, Collector]]:
    """An OTLP/gRPC trace receiver on 127.0.0.1:0: its endpoint and what it received."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", collector
    finally:
        server.stop(grace=None)


def exporting_to(endpoint: str) -> Dict[str, Optional[str]]:
    """The environment of a process exporting to ``endpoint`` (no other OTEL_* variable)."""
    env: Dict[str, Optional[str]] = {k: None for k in os.environ if k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    return env


@pytest.fixture
def traced_addr(tmp_path: Path) -> Iterator[str]:
    """A service exporting its traces (so that it makes the job's spans and hands them on)."""
    with receiver() as (endpoint, _):
        server = Server(tmp_path, env=exporting_to(endpoint))
        try:
            yield server.addr
        finally:
            server.stop()


# ---- the service carries the trace --------------------------------------------------------

# The service stores a context with the job (Job.traceparent): the caller's as it came, or,
# when it exports traces, that of its server span for the submit. An exporting service hands
# each attempt the context of its `attempt {queue}` span (Assignment.traceparent).


def test_the_job_continues_the_submit_spans_trace(
    traced_addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(traced_addr)
    with trace.get_tracer("app").start_as_current_span("checkout"):
        job = client.submit("emails")
    submit = one(spans, "jobplane.v1.JobService/SubmitJob")
    assert trace_id_of(job.traceparent) == hex_trace(submit)
    assert client.get(job.id).traceparent == job.traceparent

    explicit = client.submit("emails", traceparent=TRACEPARENT, tracestate="vendor=opaque")
    assert trace_id_of(explicit.traceparent) == TRACE_ID
    assert explicit.tracestate == "vendor=opaque"
    jobs = client.submit_batch([jobplane.JobSpec("emails", traceparent=TRACEPARENT)] * 2)
    assert {trace_id_of(j.traceparent) for j in jobs} == {TRACE_ID}


def test_a_service_that_does_not_export_keeps_the_context_the_call_carried(
    addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(addr)
    with trace.get_tracer("app").start_as_current_span("checkout"):
        job = client.submit("emails")
    submit = one(spans, "jobplane.v1.JobService/SubmitJob")
    assert job.traceparent == f"00-{hex_trace(submit)}-{format(submit.context.span_id, '016x')}-01"
    # An explicit context is the parent of the client span, whose context the job keeps.
    explicit = client.submit("emails", traceparent=TRACEPARENT, tracestate="vendor=opaque")
    assert explicit.traceparent is not None
    assert trace_id_of(explicit.traceparent) == TRACE_ID
    assert explicit.traceparent != TRACEPARENT
    assert explicit.tracestate == "vendor=opaque"


def test_the_process_span_is_a_child_of_the_context_the_service_hands_the_attempt(
    traced_addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(traced_addr)
    worker = jobplane.Worker(queues=["work"], addr=traced_addr)
    handed: List[Optional[str]] = []

    @worker.handler("work")
    def work(ctx: jobplane.JobContext) -> None:
        handed.append(ctx.traceparent)

    t = run_worker(worker)
    try:
        job = client.submit("work")
        assert client.wait(job.id, timeout=LONG).job.state == "SUCCEEDED"
    finally:
        worker.stop()
        t.join(LONG)
    process = one(spans, "process work")
    (traceparent,) = handed
    assert traceparent is not None
    assert process.parent is not None and process.parent.is_remote
    assert format(process.parent.span_id, "016x") == span_id_of(traceparent)
    assert hex_trace(process) == trace_id_of(job.traceparent)
    assert hex_trace(process) == hex_trace(one(spans, "jobplane.v1.JobService/SubmitJob"))


def test_the_wait_span_links_to_the_jobs_trace(
    traced_addr: str, spans: InMemorySpanExporter
) -> None:
    client = jobplane.Client(traced_addr)
    job = client.submit("emails", traceparent=TRACEPARENT)
    with trace.get_tracer("app").start_as_current_span("elsewhere"):
        r = client.wait(job.id, timeout=0.01)
        many = client.wait_many([job.id], timeout=0.01)
    assert not r.reached and not many.reached
    for name in ("jobplane.v1.JobService/WaitJob", "jobplane.v1.JobService/WaitJobs"):
        w = one(spans, name)
        assert hex_trace(w) != TRACE_ID  # its own trace, linked to the job's
        (link,) = w.links
        assert format(link.context.trace_id, "032x") == TRACE_ID
        assert format(link.context.span_id, "016x") == span_id_of(r.job.traceparent)
        assert dict(link.attributes or {})["jobplane.job_id"] == job.id


# ---- end to end, over OTLP/gRPC ------------------------------------------------------------


class Scenario:
    def __init__(self, spans: List[Received], ids: Dict[str, Any]) -> None:
        self.spans = spans
        self.ok: str = ids["ok"]
        self.failed: str = ids["failed"]
        self.states: List[str] = ids["states"]

    def named(self, name: str, service: Optional[str] = None, **attrs: Any) -> List[Received]:
        return [
            s for s in self.spans
            if s.name == name and (service is None or s.service == service)
            and all(s.attrs.get(k) == v for k, v in attrs.items())
        ]

    def one(self, name: str, service: Optional[str] = None, **attrs: Any) -> Received:
        found = self.named(name, service, **attrs)
        assert len(found) == 1, f"one {name} {attrs} expected among {self.spans}"
        return found[0]

    def by_id(self, span_id: str) -> Received:
        (s,) = [s for s in self.spans if s.span_id == span_id]
        return s


@pytest.fixture(scope="module")
def otlp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The service and otel_app.py, both exporting to a receiver in this process; the spans
    once both exited (each flushes its spans at a graceful exit)."""
    with receiver() as (endpoint, collector):
        server = Server(tmp_path_factory.mktemp("otlp"), env=exporting_to(endpoint))
        try:
            env = {k: v for k, v in exporting_to(endpoint).items() if v is not None}
            env.update({k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                       OTEL_SERVICE_NAME="shop")
            app = subprocess.run(
                [sys.executable, str(HERE / "otel_app.py"), server.addr],
                capture_output=True, text=True, timeout=120, env=env,
            )
            assert app.returncode == 0, app.stderr
        finally:
            server.stop()
    yield Scenario(collector.spans, json.loads(app.stdout))


SUBMIT = "jobplane.v1.JobService/SubmitJob"


def test_e2e_the_client_submit_span_is_the_parent_of_the_service_span(otlp: Scenario) -> None:
    assert otlp.states == ["SUCCEEDED", "FAILED", "SUCCEEDED"]
    checkout = otlp.one("checkout", "shop")
    for job in (otlp.ok, otlp.failed):
        client = otlp.one(SUBMIT, "shop", **{"jobplane.job_id": job})
        assert client.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert client.parent_id == checkout.span_id
        assert client.attrs["rpc.system"] == "grpc"
        assert client.attrs["rpc.method"] == "SubmitJob"
        assert client.attrs["messaging.destination.name"] == "render"
        # The service's server span of that call is the client span's child.
        (server,) = [s for s in otlp.named(SUBMIT, "jobplane") if s.parent_id == client.span_id]
        assert server.span.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert server.trace_id == client.trace_id == checkout.trace_id


def test_e2e_handlers_run_in_process_spans(otlp: Scenario) -> None:
    ok = otlp.one("process render", "shop", **{"jobplane.job_id": otlp.ok})
    failed = otlp.one("process render", "shop", **{"jobplane.job_id": otlp.failed})
    for s, job in ((ok, otlp.ok), (failed, otlp.failed)):
        assert s.span.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
        assert s.attrs["messaging.system"] == "jobplane"
        assert s.attrs["messaging.operation.type"] == "process"
        assert s.attrs["messaging.destination.name"] == s.attrs["jobplane.queue"] == "render"
        assert s.attrs["messaging.message.id"] == job
        assert s.attrs["jobplane.attempt"] == 1
        # The user's span inside the handler nests under it.
        (draw,) = [d for d in otlp.named("draw", "shop") if d.parent_id == s.span_id]
        assert draw.trace_id == s.trace_id
    assert ok.span.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    assert failed.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert failed.span.status.message == "ValueError: boom"
    assert [e.name for e in failed.span.events] == ["exception"]


def test_e2e_one_trace_for_the_jobs_life(otlp: Scenario) -> None:
    checkout = otlp.one("checkout", "shop")
    for job in (otlp.ok, otlp.failed):
        submit = otlp.one(SUBMIT, "shop", **{"jobplane.job_id": job})
        (server,) = [s for s in otlp.named(SUBMIT, "jobplane") if s.parent_id == submit.span_id]
        # The service's span of the attempt is in the job's trace (the submit call's server
        # span), and the worker's span is its child.
        attempt = otlp.one("attempt render", "jobplane", **{"jobplane.job_id": job})
        assert attempt.span.kind == trace_pb2.Span.SPAN_KIND_PRODUCER
        assert attempt.parent_id == server.span_id
        assert "dispatched" in [e.name for e in attempt.span.events]
        process = otlp.one("process render", "shop", **{"jobplane.job_id": job})
        assert process.parent_id == attempt.span_id
        (draw,) = [d for d in otlp.named("draw", "shop") if d.parent_id == process.span_id]
        trace_ids = {s.trace_id for s in (submit, server, attempt, process, draw)}
        assert trace_ids == {checkout.trace_id}
    failed = otlp.one("attempt render", "jobplane", **{"jobplane.job_id": otlp.failed})
    assert failed.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    # The waits happened outside the jobs' trace and link to the jobs' contexts (the submit
    # calls' server spans).
    servers = {
        job: [s for s in otlp.named(SUBMIT, "jobplane")
              if s.parent_id == otlp.one(SUBMIT, "shop", **{"jobplane.job_id": job}).span_id][0]
        for job in (otlp.ok, otlp.failed)
    }
    wait_many = otlp.one("jobplane.v1.JobService/WaitJobs", "shop")
    assert wait_many.trace_id != checkout.trace_id
    assert sorted((link.trace_id.hex(), link.span_id.hex()) for link in wait_many.span.links) \
        == sorted((s.trace_id, s.span_id) for s in servers.values())
    wait = otlp.one("jobplane.v1.JobService/WaitJob", "shop")
    assert [link.span_id.hex() for link in wait.span.links] == [servers[otlp.ok].span_id]
    # Calls other than submits carry their span too: the service's spans are their children.
    for client in (wait, wait_many):
        assert [s for s in otlp.named(client.name, "jobplane") if s.parent_id == client.span_id]


# ---- without OpenTelemetry ----------------------------------------------------------------

NO_OTEL = r"""
import json, sys, threading
sys.modules["opentelemetry"] = None  # `import opentelemetry...` raises ImportError
import jobplane
from jobplane import _tracing

addr, traceparent = sys.argv[1], sys.argv[2]
client = jobplane.Client(addr)
worker = jobplane.Worker(queues=["plain"], addr=addr)
seen = {}

@worker.handler("plain")
def plain(ctx):
    seen["span"] = ctx.span
    if ctx.payload == "fail":
        raise ValueError("boom")
    return "done"

t = threading.Thread(target=worker.run)
t.start()
ok = client.submit("plain", "ok", traceparent=traceparent, tracestate="k=v")
bad = client.submit("plain", "fail", retries=0)
r = client.wait_many([ok.id, bad.id], timeout=30)
events = list(client.watch(ok.id))
worker.stop()
t.join()
print(json.dumps({
    "enabled": _tracing.ENABLED,
    "states": [w.job.state.value for w in r.results],
    "events": len(events),
    "span": repr(seen["span"]),
    "job_traceparent": r.results[0].job.traceparent,
    "job_tracestate": r.results[0].job.tracestate,
}))
"""


def no_otel(addr: str) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", NO_OTEL, addr, TRACEPARENT],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_without_opentelemetry_everything_works_and_nothing_is_traced(traced_addr: str) -> None:
    r = no_otel(traced_addr)
    assert r["enabled"] is False
    assert r["states"] == ["SUCCEEDED", "FAILED"]
    assert r["events"] >= 3
    assert r["span"] == "None"
    # An explicit context still travels: the job's trace continues it.
    assert trace_id_of(r["job_traceparent"]) == TRACE_ID
    assert r["job_tracestate"] == "k=v"
