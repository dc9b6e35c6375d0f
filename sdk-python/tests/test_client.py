"""The blocking and asyncio clients and the worker against a real service."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List

import pytest

import jobplane

LONG = 30.0


def run_worker(worker: jobplane.Worker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def test_submit_work_wait_result(addr: str) -> None:
    client = jobplane.Client(addr)
    job = client.submit("emails", payload={"to": "a@b.c"}, priority=3)
    assert job.state == jobplane.JobState.QUEUED
    assert job.state == "QUEUED"
    assert job.created is True
    assert job.payload == {"to": "a@b.c"}

    worker = jobplane.Worker(queues=["emails"], concurrency=2, addr=addr)

    @worker.handler("emails")
    def send(ctx: jobplane.JobContext) -> Dict[str, Any]:
        ctx.progress(50, "half")
        ctx.output("a line\n")
        return {"sent": ctx.payload["to"], "attempt": ctx.attempt}

    t = run_worker(worker)
    try:
        w = client.wait(job.id, timeout=LONG)
        assert w.reached
        assert w.job.state == jobplane.JobState.SUCCEEDED
        assert w.job.result == {"sent": "a@b.c", "attempt": 1}
        assert w.job.attempt == 1
        events = list(client.watch(job.id, from_seq=0))
        kinds = [e.kind for e in events]
        assert "progress" in kinds and "output" in kinds
        assert events[-1].terminal and events[-1].state == jobplane.JobState.SUCCEEDED
        out = b"".join(e.data or b"" for e in events if e.kind == "output")
        assert out == b"a line\n"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        later = list(client.watch(job.id, from_seq=events[-2].seq))
        assert [e.seq for e in later] == [events[-1].seq]
    finally:
        worker.stop()
        t.join(LONG)
    assert not t.is_alive()


def test_several_addresses_are_used_as_they_answer(addr: str) -> None:
    """Several instances of one service: clients and workers take every address
    (comma-separated) and use those that answer."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % s.getsockname()[1]
    both = f"{dead},{addr}"
    client = jobplane.Client(both)
    job = client.submit("several", payload={"n": 1})
    worker = jobplane.Worker(queues=["several"], concurrency=1, addr=both)

    @worker.handler("several")
    def run(ctx: jobplane.JobContext) -> Dict[str, Any]:
        return {"n": ctx.payload["n"] + 1}

    t = run_worker(worker)
    try:
        w = client.wait(job.id, timeout=LONG)
        assert w.reached and w.job.result == {"n": 2}
    finally:
        worker.stop()
        t.join(LONG)
    assert not t.is_alive()


def test_errors_are_typed_and_name_the_field(addr: str) -> None:
    client = jobplane.Client(addr)
    with pytest.raises(jobplane.InvalidArgument) as e:
        client.submit("bad queue name")
    assert e.value.field == "spec.queue"
    with pytest.raises(jobplane.NotFound):
        client.get("0190a1c2-0000-7000-8000-000000000000")
    with pytest.raises(jobplane.InvalidArgument) as e:
        client.submit("q", pools=[jobplane.PoolRequest("nope")])
    assert e.value.field == "spec.pools[0].pool"


def test_wait_times_out_and_bytes_round_trip(addr: str) -> None:
    client = jobplane.Client(addr)
    job = client.submit("nobody", payload=b"\x00\xffraw")
    w = client.wait(job.id, timeout=0.05)
    assert not w.reached and w.job.state == jobplane.JobState.QUEUED
    assert w.job.payload_bytes == b"\x00\xffraw"
    assert w.job.payload == b"\x00\xffraw"
    assert "worker(queue=nobody)" in (w.job.waiting_for or "")
    c = client.cancel(job.id)
    assert c.outcome == "CANCELLED" and c.job.state == jobplane.JobState.CANCELLED


def test_failures_retries_and_rate_limits(addr: str) -> None:
    client = jobplane.Client(addr)
    client.configure_pool("llm", max_units={"requests": 1})
    worker = jobplane.Worker(queues=["work"], concurrency=4, addr=addr)
    seen: List[str] = []

    @worker.handler("work")
    def work(ctx: jobplane.JobContext) -> Any:
        kind = ctx.payload["do"]
        seen.append(kind)
        if kind == "fatal":
            raise jobplane.Fatal("no way")
        if kind == "flaky" and ctx.attempt < 3:
            raise RuntimeError("try again")
        if kind == "429" and ctx.attempt == 1:
            raise jobplane.RateLimited(retry_after=0.05)
        return "ok"

    t = run_worker(worker)
    try:
        fatal = client.submit("work", {"do": "fatal"}, retries=5)
        flaky = client.submit(
            "work", {"do": "flaky"}, retries=jobplane.RetryPolicy(3, initial_backoff=0.01)
        )
        limited = client.submit(
            "work", {"do": "429"}, retries=0, pools=[jobplane.PoolRequest("llm")]
        )
        r = client.wait_many([fatal.id, flaky.id, limited.id], timeout=LONG)
        assert r.reached
        f, fl, lim = (x.job for x in r.results)
        assert f.state == jobplane.JobState.FAILED and f.error is not None
        assert "no way" in f.error.message
        assert fl.state == jobplane.JobState.SUCCEEDED and fl.attempt == 3
        assert lim.state == jobplane.JobState.SUCCEEDED and lim.retries_used == 0
        assert lim.pool == "llm"
    finally:
        worker.stop()
        t.join(LONG)


def test_cancel_is_visible_to_a_running_handler(addr: str) -> None:
    client = jobplane.Client(addr)
    worker = jobplane.Worker(queues=["slow"], addr=addr)
    started = threading.Event()

    @worker.handler("slow")
    def slow(ctx: jobplane.JobContext) -> None:
        started.set()
        assert ctx.wait_cancelled(LONG)
        raise RuntimeError("stopped")

    t = run_worker(worker)
    try:
        job = client.submit("slow")
        assert started.wait(LONG)
        c = client.cancel(job.id, grace=5.0)
        assert c.outcome == "REQUESTED"
        w = client.wait(job.id, timeout=LONG)
        assert w.job.state == jobplane.JobState.CANCELLED
    finally:
        worker.stop()
        t.join(LONG)


def test_async_client_and_async_worker(addr: str) -> None:
    async def main() -> None:
        client = jobplane.AsyncClient(addr)
        worker = jobplane.Worker(queues=["aq"], concurrency=8, addr=addr)

        @worker.handler("aq")
        async def handle(ctx: jobplane.JobContext) -> Any:
            return ctx.payload * 2

        run = asyncio.ensure_future(worker.run_async())
        jobs = await client.submit_batch([jobplane.JobSpec("aq", payload=i) for i in range(20)])
        r = await client.wait_many([j.id for j in jobs], timeout=LONG)
        assert r.reached
        assert [x.job.result for x in r.results] == [i * 2 for i in range(20)]
        events = [e async for e in client.watch(jobs[0].id)]
        assert events[-1].state == jobplane.JobState.SUCCEEDED
        worker.stop()
        await asyncio.wait_for(run, LONG)

    for _ in range(2):
        asyncio.run(main())


def os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


def test_many_clients_from_many_threads_share_one_runtime(addr: str) -> None:
    jobplane.Client(addr).submit("t")  # the runtime exists from here on
    before = os_threads()
    errors: List[BaseException] = []

    def use() -> None:
        try:
            for _ in range(5):
                c = jobplane.Client(addr)
                j = c.submit("t", payload="x")
                assert c.get(j.id).id == j.id
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
    assert not errors, errors
    # 40 clients later, no runtime or thread of their own is left behind (a runtime per client
    # would add at least two threads each; the shared runtime may keep a few threads of its
    # blocking pool, used to resolve addresses, for a while).
    assert os_threads() <= before + 4


def test_a_blocking_wait_is_interrupted_by_ctrl_c(addr: str) -> None:
    """A real process blocked in Client.wait (no timeout) gets KeyboardInterrupt on SIGINT."""
    import signal
    import subprocess
    import sys

    client = jobplane.Client(addr)
    job = client.submit("nobody-serves-this")
    code = (
        "import sys, jobplane\n"
        f"c = jobplane.Client({addr!r})\n"
        "try:\n"
        "    print('waiting', flush=True)\n"
        f"    c.wait({job.id!r})\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(3)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "waiting"
    # The wait is under way once its RPC reached the service; the signal may also land just
    # before it starts: either way the process must stop with KeyboardInterrupt.
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=LONG)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running {LONG}s after SIGINT: {out!r} {err!r}")
    assert proc.returncode == 3, (out, err)
    assert "interrupted" in out


def test_a_worker_process_drains_on_sigterm(addr: str) -> None:
    """SIGTERM stops a worker gracefully: the running job finishes, then the process exits 0."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, jobplane\n"
        f"w = jobplane.Worker(queues=['drain'], addr={addr!r}, shutdown_timeout=30)\n"
        "@w.handler('drain')\n"
        "def h(ctx):\n"
        "    print('started', flush=True)\n"
        "    return sys.stdin.readline().strip()\n"
        "w.run()\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    client = jobplane.Client(addr)
    job = client.submit("drain")
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    # The handler is still running: the job is not given up, it finishes with its result.
    proc.stdin.write("finished\n")
    proc.stdin.flush()
    w = client.wait(job.id, timeout=LONG)
    assert w.job.state == jobplane.JobState.SUCCEEDED
    assert w.job.result_bytes == b'"finished"'
    out, _ = proc.communicate(timeout=LONG)
    assert proc.returncode == 0
    assert out.strip() == "stopped"


def test_async_handlers_under_a_blocking_run(addr: str) -> None:
    """`Worker.run()` runs `async def` handlers on an event loop of its own thread, beside sync
    ones on its thread pool; cancellation reaches an async handler."""
    client = jobplane.Client(addr)
    worker = jobplane.Worker(queues=["a", "s"], concurrency=4, addr=addr)
    started = threading.Event()

    @worker.handler("a")
    async def a(ctx: jobplane.JobContext) -> Any:
        if ctx.payload == "hold":
            started.set()
            assert await ctx.wait_cancelled_async(LONG)
            raise RuntimeError("stopped")
        return {"async": ctx.attempt}

    @worker.handler("s")
    def s(ctx: jobplane.JobContext) -> Any:
        return {"sync": ctx.attempt}

    t = run_worker(worker)
    try:
        ja = client.submit("a", payload="x")
        js = client.submit("s", payload="x")
        held = client.submit("a", payload="hold")
        r = client.wait_many([ja.id, js.id], timeout=LONG)
        assert [x.job.result for x in r.results] == [{"async": 1}, {"sync": 1}]
        assert started.wait(LONG)
        assert client.cancel(held.id, grace=5.0).outcome == "REQUESTED"
        assert client.wait(held.id, timeout=LONG).job.state == jobplane.JobState.CANCELLED
    finally:
        worker.stop()
        t.join(LONG)
    assert not t.is_alive()
