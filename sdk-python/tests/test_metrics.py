"""The Prometheus endpoint of `jobplane serve`, scraped over HTTP and read with the reference
parser of the Prometheus project (`prometheus_client`'s strict OpenMetrics parser): one job
succeeds, one fails, one lookup misses, and the counters and histograms say so."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from typing import Dict, Tuple

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import Server, jobplane_bin

QUEUE = "metrics-q"


Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def scrape(url: str) -> Tuple[Dict[str, str], Samples]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.status == 200
        content_type = r.headers["Content-Type"]
        text = r.read().decode()
    assert content_type.startswith("application/openmetrics-text"), content_type
    types: Dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_jobs_rpcs_and_commits(server: Server) -> None:
    # Before anything ran: the endpoint parses (families without a label set yet are empty).
    types, _ = scrape(server.metrics)
    assert types["jobplane_commit_batch_writes"] == "histogram"

    worker = subprocess.Popen(
        [jobplane_bin(), "worker", QUEUE, "--concurrency", "2", "--addr", server.addr, "--",
         "sh", "-c", 'read p; case "$p" in *fail*) echo boom >&2; exit 3;; esac; echo done'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ids = []
        for payload in ('"ok"', '"fail"'):
            r = server.cli("submit", QUEUE, "--payload", payload, "--retries", "0", "--output", "json")
            assert r.returncode == 0, r.stderr
            ids.append(json.loads(r.stdout)["id"])
        ok = server.cli("wait", ids[0], "--timeout", "30s")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        failed = server.cli("wait", ids[1], "--timeout", "30s")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        missing = server.cli("get", str(uuid.uuid4()))
        assert missing.returncode != 0

        types, samples = scrape(server.metrics)
    finally:
        worker.terminate()
        worker.wait(30)

    q = {"namespace": "default", "queue": QUEUE}
    assert value(samples, "jobplane_jobs_submitted_total", **q) == 2
    assert value(samples, "jobplane_jobs_completed_total", outcome="SUCCEEDED", **q) == 1
    assert value(samples, "jobplane_jobs_completed_total", outcome="FAILED", **q) == 1
    assert value(samples, "jobplane_run_seconds_count", **q) == 2
    assert value(samples, "jobplane_run_seconds_bucket", le="+Inf", **q) == 2
    assert value(samples, "jobplane_schedule_to_start_seconds_count", **q) == 2
    assert value(samples, "jobplane_queue_depth", **q) == 0
    assert value(samples, "jobplane_queue_running", **q) == 0
    assert value(samples, "jobplane_queue_oldest_wait_seconds", **q) == 0
    assert value(samples, "jobplane_workers_connected", namespace="default") == 1
    assert types["jobplane_jobs_submitted"] == "counter"
    assert types["jobplane_run_seconds"] == "histogram"

    submit = "jobplane.v1.JobService/SubmitJob"
    assert value(samples, "jobplane_rpc_duration_seconds_count", method=submit) == 2
    get = "jobplane.v1.JobService/GetJob"
    assert value(samples, "jobplane_rpc_errors_total", method=get, code="NotFound") == 1
    assert value(samples, "jobplane_rpc_errors_total", method=submit, code="NotFound") == 0

    commits = value(samples, "jobplane_commit_batch_writes_count")
    writes = value(samples, "jobplane_commit_batch_writes_sum")
    assert commits >= 1 and writes >= commits
