"""Python SDK figures, to set beside the Rust ones (docs/benchmarks.md).

    python sdk-python/bench/bench.py [--addr URL] [--jobs 20000] [--batch 500] [--submitters 8]

Without --addr it starts `target/release/jobplane serve` on a temporary database. Phases:

- submit only: jobs submitted with AsyncClient.submit_batch by concurrent submitters to a queue
  no worker serves (what the client and binding can push);
- submit -> complete: the same load with a no-op Python async worker (concurrency 256);
- latency: one job at a time, submit call -> handler start (p50/p99).

Prints one JSON object on stdout with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jobplane

ROOT = Path(__file__).resolve().parents[2]


def start_server(tmp: str) -> Tuple[subprocess.Popen, str]:
    binary = os.environ.get("JOBPLANE_BIN", str(ROOT / "target" / "release" / "jobplane"))
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--db", f"sqlite://{tmp}/bench.db"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, NO_COLOR="1", RUST_LOG="warn,jobplane_server=info"),
    )
    found = threading.Event()
    addr: List[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if not found.is_set() and "jobplane serving" in line and "listen=" in line:
                addr.append("http://" + line.split("listen=")[1].split()[0])
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(30):
        proc.kill()
        sys.exit("jobplane serve did not start")
    return proc, addr[0]


def pct(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def submit_all(client: jobplane.AsyncClient, queue: str, n: int, batch: int,
                     submitters: int) -> List[str]:
    per = -(-n // submitters)

    async def one(count: int) -> List[str]:
        ids: List[str] = []
        while count > 0:
            k = min(count, batch)
            jobs = await client.submit_batch([jobplane.JobSpec(queue) for _ in range(k)])
            ids.extend(j.id for j in jobs)
            count -= k
        return ids

    parts = await asyncio.gather(*(one(min(per, n - i * per)) for i in range(submitters)))
    return [i for p in parts for i in p]


async def wait_all(client: jobplane.AsyncClient, ids: List[str]) -> None:
    for i in range(0, len(ids), 10_000):
        r = await client.wait_many(ids[i:i + 10_000], timeout=120)
        assert r.reached, "jobs finished"
        assert all(x.job.state == jobplane.JobState.SUCCEEDED for x in r.results)


async def main(args: argparse.Namespace, addr: str) -> Dict[str, float]:
    client = jobplane.AsyncClient(addr)
    figures: Dict[str, float] = {}

    # Submit only (the queue has no worker).
    await submit_all(client, "bench-submit", 1000, args.batch, 2)  # warm-up
    t0 = time.perf_counter()
    await submit_all(client, "bench-submit", args.jobs, args.batch, args.submitters)
    figures["py_submit_only_jobs_per_sec"] = round(args.jobs / (time.perf_counter() - t0))
    print(f"submit only: {figures['py_submit_only_jobs_per_sec']:.0f} jobs/s", file=sys.stderr)

    started: Dict[str, float] = {}
    worker = jobplane.Worker(queues=["bench"], concurrency=256, addr=addr)

    @worker.handler("bench")
    async def noop(ctx: jobplane.JobContext) -> None:
        if ctx.payload_bytes == b"mark":
            started[ctx.job_id] = time.perf_counter()

    run = asyncio.ensure_future(worker.run_async())
    await wait_all(client, await submit_all(client, "bench", 1000, args.batch, 2))  # warm-up
    t0 = time.perf_counter()
    ids = await submit_all(client, "bench", args.jobs, args.batch, args.submitters)
    submitted = time.perf_counter() - t0
    await wait_all(client, ids)
    total = time.perf_counter() - t0
    figures["py_jobs_per_sec"] = round(args.jobs / total)
    print(f"submit -> complete: {args.jobs} jobs submitted in {submitted:.3f}s, all succeeded "
          f"after {total:.3f}s: {figures['py_jobs_per_sec']:.0f} jobs/s", file=sys.stderr)

    lat: List[float] = []
    for _ in range(args.latency_jobs):
        t = time.perf_counter()
        job = await client.submit("bench", payload=b"mark")
        w = await client.wait(job.id, timeout=30)
        assert w.job.state == jobplane.JobState.SUCCEEDED
        lat.append((started[job.id] - t) * 1000)
    figures["py_start_p50_ms"] = round(pct(lat, 0.5), 3)
    figures["py_start_p99_ms"] = round(pct(lat, 0.99), 3)
    print(f"latency: submit -> start p50 {figures['py_start_p50_ms']} ms "
          f"p99 {figures['py_start_p99_ms']} ms (mean {statistics.mean(lat):.3f})",
          file=sys.stderr)
    worker.stop()
    await run
    return figures


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--addr")
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--submitters", type=int, default=8)
    p.add_argument("--latency-jobs", type=int, default=500)
    args = p.parse_args()
    server: Optional[subprocess.Popen] = None
    with tempfile.TemporaryDirectory() as tmp:
        addr = args.addr
        if addr is None:
            server, addr = start_server(tmp)
        try:
            print(json.dumps(asyncio.run(main(args, addr)), sort_keys=True))
        finally:
            if server is not None:
                server.terminate()
                server.wait()
