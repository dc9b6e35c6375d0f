"""A Python application traced with the OpenTelemetry SDK, exporting over OTLP/gRPC through the
standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_BSP_*``): a
client submits two jobs in an application span, a worker in the same process runs them (one
succeeds, one fails), and the client waits for them outside that span. The end-to-end test in
test_tracing.py runs it as a process of its own (a process has one global tracer provider).

Usage: ``python otel_app.py ADDR``; prints ``{"ok": id, "failed": id, "states": [...]}``.
"""

from __future__ import annotations

import json
import sys
import threading

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import jobplane

QUEUE = "render"


def main(addr: str) -> None:
    provider = TracerProvider()  # the resource comes from OTEL_SERVICE_NAME and friends
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("shop")

    client = jobplane.Client(addr)
    worker = jobplane.Worker(queues=[QUEUE], concurrency=2, addr=addr)

    @worker.handler(QUEUE)
    def render(ctx: jobplane.JobContext) -> str:
        with tracer.start_as_current_span("draw"):
            if ctx.payload == "fail":
                raise ValueError("boom")
            return "drawn"

    t = threading.Thread(target=worker.run)
    t.start()
    try:
        with tracer.start_as_current_span("checkout"):
            ok = client.submit(QUEUE, "ok")
            failed = client.submit(QUEUE, "fail", retries=0)
        waited = client.wait_many([ok.id, failed.id], timeout=30)
        single = client.wait(ok.id, timeout=30)
    finally:
        worker.stop()
        t.join()
    provider.shutdown()  # exports what is still queued
    print(json.dumps({
        "ok": ok.id,
        "failed": failed.id,
        "states": [w.job.state.value for w in waited.results] + [single.job.state.value],
    }))


if __name__ == "__main__":
    main(sys.argv[1])
