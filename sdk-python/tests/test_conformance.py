"""The conformance corpus (tests/conformance/, schema in its README.md) driven through the Python
SDK: one pytest test per scenario, each against its own `jobplane serve` on a fresh database
(SQLite, or PostgreSQL with JOBPLANE_TEST_BACKEND=postgres: see conftest.py).

Scenarios listed in tests/conformance/known-failing-python.txt are strict xfails: their failure
is expected, and their passing fails the run, so the list cannot go stale."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import pytest
import yaml

import jobplane

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "conformance"
GUARD = 30.0
DEFAULT_WAIT = 20.0


class ScenarioError(AssertionError):
    """A scenario failed (or is malformed)."""


def fail(msg: str) -> None:
    raise ScenarioError(msg)


# ---- the corpus --------------------------------------------------------------------------------

def duration(v: Any, what: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", v) if isinstance(v, str) else None
    if not m:
        fail(f"{what}: a duration such as 150ms or 2s, got {v!r}")
    n = int(m.group(1))  # type: ignore[union-attr]
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]  # type: ignore[union-attr]


def keys(d: Any, what: str, allowed: Iterable[str], required: Iterable[str] = ()) -> Dict[str, Any]:
    if not isinstance(d, dict):
        fail(f"{what}: expected a map, got {d!r}")
    unknown = set(d) - set(allowed)
    if unknown:
        fail(f"{what}: unknown key(s) {sorted(unknown)}")
    for k in required:
        if k not in d:
            fail(f"{what}: `{k}` is required")
    return d  # type: ignore[no-any-return]


def load_corpus() -> Tuple[List[Tuple[str, Dict[str, Any]]], List[str]]:
    """(file stem, scenario) pairs in file order, and problems with the corpus."""
    out: List[Tuple[str, Dict[str, Any]]] = []
    problems: List[str] = []
    for path in sorted((CORPUS / "scenarios").glob("*.yaml")):
        try:
            doc = keys(yaml.safe_load(path.read_text()), path.name, ["scenarios"], ["scenarios"])
            for s in doc["scenarios"]:
                keys(s, f"{path.name}: scenario", ["name", "description", "setup", "steps"],
                     ["name", "description", "steps"])
                out.append((path.stem, s))
        except (ScenarioError, yaml.YAMLError) as e:
            problems.append(f"{path.name} does not parse: {e}")
    names = [s["name"] for _, s in out]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"scenario {n} is defined more than once")
    return out, problems


def load_known() -> Tuple[Set[str], List[str]]:
    known: Set[str] = set()
    problems: List[str] = []
    for line in (CORPUS / "known-failing-python.txt").read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name in known:
            problems.append(f"{name} is listed twice in known-failing-python.txt")
        known.add(name)
    return known, problems


SCENARIOS, CORPUS_PROBLEMS = load_corpus()
KNOWN, KNOWN_PROBLEMS = load_known()


def test_corpus_consistent() -> None:
    names = {s["name"] for _, s in SCENARIOS}
    problems = CORPUS_PROBLEMS + KNOWN_PROBLEMS
    problems += [f"known-failing-python.txt lists {n}, which is no scenario"
                 for n in sorted(KNOWN - names)]
    assert not problems, "\n".join(problems)


# ---- worker behaviours -------------------------------------------------------------------------

PRELUDE = {"progress", "lines"}
ACTIONS: Dict[str, Set[str]] = {
    "succeed": {"result"},
    "fail": {"message", "retryable"},
    "fail_times": {"n", "message", "result"},
    "rate_limited": {"times", "retry_after", "pool", "result"},
    "hold": {"until", "ignore_cancel", "result"},
}


class BadBehaviour(jobplane.Fatal):
    def __init__(self, what: str) -> None:
        super().__init__(f"bad behaviour: {what}")


class Stopped(Exception):
    """The attempt was cancelled while holding."""


def _int(p: Mapping[str, Any], k: str, default: int) -> int:
    v = p.get(k, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadBehaviour(f"{k} must be an integer, got {v!r}")
    return v


def _str(p: Mapping[str, Any], k: str, default: Optional[str]) -> Optional[str]:
    v = p.get(k, default)
    if v is not None and not isinstance(v, str):
        raise BadBehaviour(f"{k} must be a string, got {v!r}")
    return v


class Book:
    """Signals and the handler bookkeeping of one scenario."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fired: Set[str] = set()
        self.waiters: Dict[str, List[threading.Event]] = {}
        self.starts: List[str] = []
        self.started = threading.Condition(self.lock)
        self.running: Dict[str, int] = {}
        self.peak: Dict[str, int] = {}

    def fire(self, name: str) -> None:
        with self.lock:
            self.fired.add(name)
            for ev in self.waiters.pop(name, []):
                ev.set()

    def fire_all(self) -> None:
        with self.lock:
            names = list(self.waiters)
        for n in names:
            self.fire(n)

    def handler(self, ctx: jobplane.JobContext) -> Any:
        q = ctx.queue
        with self.lock:
            self.starts.append(ctx.job_id)
            self.started.notify_all()
            self.running[q] = self.running.get(q, 0) + 1
            self.peak[q] = max(self.peak.get(q, 0), self.running[q])
        try:
            return self.behave(ctx)
        finally:
            with self.lock:
                self.running[q] -= 1

    def wait_started(self, ids: List[str], timeout: float) -> bool:
        """Waits until the handlers of every job in `ids` have started."""
        with self.started:
            return self.started.wait_for(lambda: all(i in self.starts for i in ids), timeout)

    def behave(self, ctx: jobplane.JobContext) -> Any:
        raw = ctx.payload_bytes
        try:
            p = json.loads(raw) if raw else None
        except ValueError:
            p = None
        if not isinstance(p, dict):
            return b""
        do = p.get("do")
        if do is None:
            action = "succeed"
        else:
            if do not in ACTIONS:
                raise BadBehaviour(f"unknown do {do!r}")
            action = do
            extra = set(p) - {"do"} - PRELUDE - ACTIONS[action]
            if extra:
                raise BadBehaviour(f"{action} does not take {sorted(extra)}")
        progress = p.get("progress", [])
        if not isinstance(progress, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in progress
        ):
            raise BadBehaviour(f"progress must be a list of numbers, got {progress!r}")
        for x in progress:
            ctx.progress(x)
        for i in range(_int(p, "lines", 0)):
            ctx.output(f"line {i}\n")

        def result() -> bytes:
            return json.dumps(p["result"], separators=(",", ":")).encode() if "result" in p else b""

        if action == "succeed":
            return result()
        if action == "fail":
            message = _str(p, "message", "failed") or "failed"
            retryable = p.get("retryable", False)
            if not isinstance(retryable, bool):
                raise BadBehaviour("retryable must be a boolean")
            if retryable:
                raise RuntimeError(message)
            raise jobplane.Fatal(message)
        if action == "fail_times":
            n = _int(p, "n", 1)
            if ctx.attempt <= n:
                raise RuntimeError(_str(p, "message", None) or f"attempt {ctx.attempt} failed")
            return result()
        if action == "rate_limited":
            times = _int(p, "times", 1)
            after = p.get("retry_after", "100ms")
            try:
                secs = duration(after, "retry_after")
            except ScenarioError as e:
                raise BadBehaviour(str(e)) from None
            if ctx.attempt <= times:
                raise jobplane.RateLimited(retry_after=secs, pool=_str(p, "pool", None))
            return result()
        # hold
        until = _str(p, "until", None)
        ignore_cancel = p.get("ignore_cancel", False)
        if not isinstance(ignore_cancel, bool) or (ignore_cancel and until is None):
            raise BadBehaviour("ignore_cancel must be a boolean, and needs until")
        wake = threading.Event()
        with self.lock:
            if until is not None:
                if until in self.fired:
                    wake.set()
                else:
                    self.waiters.setdefault(until, []).append(wake)
        if not ignore_cancel:
            ctx.on_cancel(wake.set)
        wake.wait()
        with self.lock:
            released = until is not None and until in self.fired
        if released:
            return result()
        raise Stopped("cancelled while holding")


# ---- expectations ------------------------------------------------------------------------------

JOB_KEYS = {
    "same_job_as", "state", "state_in", "queue", "priority", "result", "has_result",
    "error_reason", "error_message_contains", "has_error", "attempt", "attempt_at_least",
    "retries_used", "pool", "waiting_for", "waiting_for_contains", "progress",
    "cancel_requested", "worker", "handler_starts", "queued_for_at_least",
}


def json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


@dataclass
class Run:
    addr: str
    book: Book = field(default_factory=Book)
    clients: Dict[str, jobplane.Client] = field(default_factory=dict)
    jobs: Dict[str, str] = field(default_factory=dict)
    workers: Dict[str, Tuple[jobplane.Worker, threading.Thread]] = field(default_factory=dict)
    watches: Dict[str, List[jobplane.Event]] = field(default_factory=dict)
    background: Dict[str, Tuple[threading.Thread, Dict[str, Any]]] = field(default_factory=dict)

    def client(self, ns: Optional[str] = None) -> jobplane.Client:
        ns = ns or "default"
        if ns not in self.clients:
            self.clients[ns] = jobplane.Client(self.addr, namespace=ns)
        return self.clients[ns]

    def job_id(self, step: Mapping[str, Any], what: str) -> str:
        if ("job" in step) == ("id" in step):
            fail(f"{what}: exactly one of job and id")
        if "id" in step:
            return str(step["id"])
        name = step["job"]
        if name not in self.jobs:
            fail(f"{what}: no job named {name!r}")
        return self.jobs[name]

    # -- checks

    def check_job(self, job: jobplane.Job, exp: Mapping[str, Any], what: str,
                  extra: Optional[Dict[str, Any]] = None) -> None:
        extra = extra or {}
        keys(exp, f"{what}: expect", JOB_KEYS | set(extra))
        for k, v in exp.items():
            if k in extra:
                if not json_equal(extra[k], v):
                    fail(f"{what}: {k} is {extra[k]!r}, expected {v!r}")
                continue
            self.check_field(job, k, v, what)

    def check_field(self, job: jobplane.Job, k: str, v: Any, what: str) -> None:
        def bad(actual: Any) -> None:
            fail(f"{what}: {k}: expected {v!r}, got {actual!r} (job {job.id}: state {job.state.value}, "
                 f"error {job.error}, waiting_for {job.waiting_for})")

        if k == "same_job_as":
            if job.id != self.jobs.get(v):
                bad(job.id)
        elif k == "state":
            if job.state.value != v:
                bad(job.state.value)
        elif k == "state_in":
            if job.state.value not in v:
                bad(job.state.value)
        elif k == "queue":
            if job.queue != v:
                bad(job.queue)
        elif k == "priority":
            if job.priority != v:
                bad(job.priority)
        elif k == "result":
            try:
                actual = json.loads(job.result_bytes) if job.result_bytes else None
                ok = bool(job.result_bytes) and json_equal(actual, v)
            except ValueError:
                actual, ok = job.result_bytes, False
            if not ok:
                bad(actual)
        elif k == "has_result":
            if bool(job.result_bytes) != v:
                bad(job.result_bytes)
        elif k == "error_reason":
            if job.error is None or job.error.reason != v:
                bad(job.error)
        elif k == "error_message_contains":
            if job.error is None or v not in job.error.message:
                bad(job.error)
        elif k == "has_error":
            if (job.error is not None) != v:
                bad(job.error)
        elif k == "attempt":
            if job.attempt != v:
                bad(job.attempt)
        elif k == "attempt_at_least":
            if job.attempt < v:
                bad(job.attempt)
        elif k == "retries_used":
            if job.retries_used != v:
                bad(job.retries_used)
        elif k == "pool":
            if job.pool != v:
                bad(job.pool)
        elif k == "waiting_for":
            if job.waiting_for != v:
                bad(job.waiting_for)
        elif k == "waiting_for_contains":
            if job.waiting_for is None or v not in job.waiting_for:
                bad(job.waiting_for)
        elif k == "progress":
            if job.progress != v:
                bad(job.progress)
        elif k == "cancel_requested":
            if job.cancel_requested != v:
                bad(job.cancel_requested)
        elif k == "worker":
            entry = self.workers.get(v)
            if entry is None:
                fail(f"{what}: no worker named {v!r}")
            if job.worker_id != entry[0].id:  # type: ignore[index]
                bad(job.worker_id)
        elif k == "handler_starts":
            with self.book.lock:
                n = self.book.starts.count(job.id)
            if n != v:
                bad(n)
        elif k == "queued_for_at_least":
            end = job.started_at or job.finished_at
            if job.created_at is None or end is None:
                bad(None)
            elif (end - job.created_at).total_seconds() < duration(v, k):  # type: ignore[operator]
                bad(end - job.created_at)  # type: ignore[operator]

    def expecting(self, step: Mapping[str, Any], what: str, call: Callable[[], Any]) -> Any:
        """Runs `call`; with `expect_error` it must fail so, else it must succeed."""
        exp = step.get("expect_error")
        if exp is not None and "expect" in step:
            fail(f"{what}: expect and expect_error exclude each other")
        if exp is None:
            return call()
        keys(exp, f"{what}: expect_error", ["code", "reason", "field", "message_contains",
                                             "retry_after"], ["code"])
        try:
            call()
        except jobplane.Error as e:
            got = {"code": e.code, "reason": e.reason, "field": e.field}
            for k in ("code", "reason", "field"):
                if k in exp and got[k] != exp[k]:
                    fail(f"{what}: error {k} {got[k]!r}, expected {exp[k]!r} ({e.message})")
            if "message_contains" in exp and exp["message_contains"] not in e.message:
                fail(f"{what}: error message {e.message!r} lacks {exp['message_contains']!r}")
            if "retry_after" in exp and (e.retry_after is not None) != exp["retry_after"]:
                fail(f"{what}: error retry_after {e.retry_after!r}")
            return None
        fail(f"{what}: expected {exp['code']}, but the call succeeded")

    # -- setup

    def queue_config(self, c: Mapping[str, Any], what: str) -> Dict[str, Any]:
        keys(c, what, ["max_concurrency", "default_run_timeout", "default_retry_policy",
                       "default_max_wait", "max_depth", "paused"])
        out: Dict[str, Any] = {}
        if "max_concurrency" in c:
            out["max_concurrency"] = c["max_concurrency"]
        if "default_run_timeout" in c:
            out["default_timeout"] = duration(c["default_run_timeout"], "default_run_timeout")
        if "default_max_wait" in c:
            out["default_max_wait"] = duration(c["default_max_wait"], "default_max_wait")
        if "max_depth" in c:
            out["max_depth"] = c["max_depth"]
        if "paused" in c:
            out["paused"] = c["paused"]
        if "default_retry_policy" in c:
            out["default_retries"] = self.retry_policy(c["default_retry_policy"], what)
        return out

    @staticmethod
    def retry_policy(rp: Any, what: str) -> jobplane.RetryPolicy:
        keys(rp, f"{what}: retry policy", ["max_retries", "initial_backoff", "max_backoff",
                                            "multiplier"], ["max_retries"])
        return jobplane.RetryPolicy(
            rp["max_retries"],
            initial_backoff=duration(rp["initial_backoff"], "initial_backoff")
            if "initial_backoff" in rp else None,
            max_backoff=duration(rp["max_backoff"], "max_backoff") if "max_backoff" in rp else None,
            multiplier=rp.get("multiplier"),
        )

    @staticmethod
    def pool_config(c: Mapping[str, Any], what: str) -> Dict[str, Any]:
        keys(c, what, ["max_units", "rates"])
        rates = []
        for r in c.get("rates", []):
            keys(r, f"{what}: rate", ["unit", "amount", "per", "burst"], ["unit", "amount", "per"])
            rates.append({**r, "per": duration(r["per"], "per")})
        return {"max_units": c.get("max_units"), "rates": rates}

    def setup(self, s: Mapping[str, Any]) -> None:
        keys(s, "setup", ["queues", "pools"])
        for name, c in (s.get("pools") or {}).items():
            self.client().configure_pool(name, **self.pool_config(c, f"setup pool {name}"))
        for name, c in (s.get("queues") or {}).items():
            self.client().configure_queue(name, **self.queue_config(c, f"setup queue {name}"))

    # -- steps

    def step(self, i: int, step: Any) -> None:
        if not isinstance(step, dict) or len(step) != 1:
            fail(f"step {i}: a map with exactly one key, got {step!r}")
        (kind, body), = step.items()
        handler = getattr(self, f"do_{kind}", None)
        if handler is None:
            fail(f"step {i}: unknown step kind {kind!r}")
        handler(body, f"step {i} ({kind})")

    def do_start_worker(self, b: Any, what: str) -> None:
        keys(b, what, ["name", "queues", "concurrency", "namespace"], ["queues"])
        name = b.get("name", "worker")
        if name in self.workers:
            fail(f"{what}: a worker named {name!r} exists")
        w = jobplane.Worker(
            queues=list(b["queues"]),
            concurrency=b.get("concurrency", 4),
            addr=self.addr,
            namespace=b.get("namespace", "default"),
            id=f"{name}-{uuid.uuid4()}",
            shutdown_timeout=0.2,
        )
        for q in b["queues"]:
            w.handler(q)(self.book.handler)
        t = threading.Thread(target=w.run, name=f"worker-{name}", daemon=True)
        t.start()
        self.workers[name] = (w, t)

    def do_stop_worker(self, b: Any, what: str) -> None:
        if b not in self.workers:
            fail(f"{what}: no worker named {b!r}")
        w, t = self.workers[b]
        w.stop()
        t.join(GUARD)
        if t.is_alive():
            fail(f"{what}: the worker did not stop within {GUARD}s")

    def do_release(self, b: Any, what: str) -> None:
        if not isinstance(b, str):
            fail(f"{what}: a signal name")
        self.book.fire(b)

    SPEC_KEYS = ["queue", "as", "payload", "payload_size", "priority", "idempotency_key",
                 "run_timeout", "max_wait", "retries", "retry_policy", "labels", "pools",
                 "namespace", "expect"]

    def spec(self, b: Mapping[str, Any], what: str) -> jobplane.JobSpec:
        keys(b, what, self.SPEC_KEYS + ["expect_error"], ["queue"])
        for a, c in (("retries", "retry_policy"), ("payload", "payload_size"), ("as", "expect_error")):
            if a in b and c in b:
                fail(f"{what}: {a} and {c} exclude each other")
        payload: Any = None
        if "payload" in b:
            payload = json.dumps(b["payload"]).encode()
        elif "payload_size" in b:
            payload = b"x" * b["payload_size"]
        pools = []
        for p in b.get("pools", []):
            keys(p, f"{what}: pool", ["pool", "units", "max_wait"], ["pool"])
            pools.append(jobplane.PoolRequest(
                p["pool"], p.get("units", {}),
                duration(p["max_wait"], "max_wait") if "max_wait" in p else None))
        retries: Any = b.get("retries")
        if "retry_policy" in b:
            retries = self.retry_policy(b["retry_policy"], what)
        return jobplane.JobSpec(
            b["queue"],
            payload,
            priority=b.get("priority", 0),
            idempotency_key=b.get("idempotency_key"),
            timeout=duration(b["run_timeout"], "run_timeout") if "run_timeout" in b else None,
            max_wait=duration(b["max_wait"], "max_wait") if "max_wait" in b else None,
            retries=retries,
            pools=pools,
            labels=b.get("labels"),
            namespace=b.get("namespace"),
        )

    def named(self, b: Mapping[str, Any], job: jobplane.Job, what: str) -> None:
        if "as" in b:
            if b["as"] in self.jobs:
                fail(f"{what}: a job named {b['as']!r} exists")
            self.jobs[b["as"]] = job.id
        if "expect" in b:
            self.check_job(job, b["expect"], what, {"created": job.created})

    def do_submit(self, b: Any, what: str) -> None:
        spec = self.spec(b, what)
        job = self.expecting(b, what, lambda: self.client().submit(
            spec.queue, spec.payload, priority=spec.priority,
            idempotency_key=spec.idempotency_key, timeout=spec.timeout, max_wait=spec.max_wait,
            retries=spec.retries, pools=spec.pools, labels=spec.labels, namespace=spec.namespace))
        if job is not None:
            self.named(b, job, what)

    def do_submit_batch(self, b: Any, what: str) -> None:
        keys(b, what, ["jobs", "namespace", "expect_error"], ["jobs"])
        specs = []
        for j, entry in enumerate(b["jobs"]):
            if "expect_error" in entry:
                fail(f"{what}: jobs[{j}] cannot carry expect_error")
            specs.append(self.spec(entry, f"{what} jobs[{j}]"))
        jobs = self.expecting(b, what, lambda: self.client(b.get("namespace")).submit_batch(specs))
        if jobs is not None:
            for j, (entry, job) in enumerate(zip(b["jobs"], jobs)):
                self.named(entry, job, f"{what} jobs[{j}]")

    def do_get(self, b: Any, what: str) -> None:
        keys(b, what, ["job", "id", "namespace", "expect", "expect_error"])
        id = self.job_id(b, what)
        job = self.expecting(b, what, lambda: self.client(b.get("namespace")).get(id))
        if job is not None and "expect" in b:
            self.check_job(job, b["expect"], what)

    def do_wait(self, b: Any, what: str) -> None:
        keys(b, what, ["job", "id", "until", "timeout", "namespace", "expect", "expect_error"])
        id = self.job_id(b, what)
        timeout = duration(b["timeout"], "timeout") if "timeout" in b else DEFAULT_WAIT
        w = self.expecting(b, what, lambda: self.client(b.get("namespace")).wait(
            id, timeout, until=b.get("until")))
        if w is None:
            return
        self.handlers_started(b.get("until"), [w.job], what)
        exp = dict(b.get("expect") or {})
        reached = exp.pop("reached", True)
        if w.reached != reached:
            fail(f"{what}: reached {w.reached}, expected {reached} (state {w.job.state.value}, "
                 f"waiting_for {w.job.waiting_for}, error {w.job.error})")
        self.check_job(w.job, exp, what)

    def handlers_started(self, until: Any, jobs: List[jobplane.Job], what: str) -> None:
        """After a wait for RUNNING: the handlers of the jobs found RUNNING have started too (the
        service marks RUNNING when the worker acknowledges, just before the handler begins)."""
        if "RUNNING" not in (until or []):
            return
        ids = [j.id for j in jobs if j.state == jobplane.JobState.RUNNING]
        if not self.book.wait_started(ids, GUARD):
            fail(f"{what}: handlers of {ids} did not start within {GUARD}s")

    def do_wait_many(self, b: Any, what: str) -> None:
        keys(b, what, ["jobs", "mode", "until", "timeout", "expect"], ["jobs", "mode"])
        ids = [self.job_id({"job": n}, what) for n in b["jobs"]]
        timeout = duration(b["timeout"], "timeout") if "timeout" in b else DEFAULT_WAIT
        r = self.client().wait_many(ids, timeout, b["mode"], until=b.get("until"))
        self.handlers_started(b.get("until"), [x.job for x in r.results], what)
        exp = keys(dict(b.get("expect") or {}), f"{what}: expect",
                   ["reached", "reached_count", "each", "jobs"])
        if r.reached != exp.get("reached", True):
            fail(f"{what}: reached {r.reached}, expected {exp.get('reached', True)}: "
                 + ", ".join(f"{x.job.state.value}" for x in r.results))
        if "reached_count" in exp:
            n = sum(1 for x in r.results if x.reached)
            if n != exp["reached_count"]:
                fail(f"{what}: {n} jobs reached, expected {exp['reached_count']}")
        for x in r.results:
            if "each" in exp:
                self.check_job(x.job, exp["each"], f"{what} each")
        for name, je in (exp.get("jobs") or {}).items():
            x = r.results[b["jobs"].index(name)]
            self.check_job(x.job, je, f"{what} {name}", {"reached": x.reached})

    def do_cancel(self, b: Any, what: str) -> None:
        keys(b, what, ["job", "id", "grace", "reason", "namespace", "expect", "expect_error"])
        id = self.job_id(b, what)
        grace = duration(b["grace"], "grace") if "grace" in b else None
        c = self.expecting(b, what, lambda: self.client(b.get("namespace")).cancel(
            id, grace, reason=b.get("reason", "")))
        if c is not None and "expect" in b:
            self.check_job(c.job, b["expect"], what, {"outcome": c.outcome})

    # -- watches

    def collect(self, id: str, from_seq: int, stop_after: Optional[Mapping[str, Any]],
                out: Dict[str, Any]) -> None:
        events: List[jobplane.Event] = []
        out["events"] = events
        try:
            it = self.client().watch(id, from_seq)
            for e in it:
                events.append(e)
                if stop_after is not None and self.matches(e, stop_after):
                    out["stopped"] = True
                    it.close()  # type: ignore[attr-defined]
                    break
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    @staticmethod
    def matches(e: jobplane.Event, m: Mapping[str, Any]) -> bool:
        for k, v in m.items():
            if k == "state" and not (e.kind == "state" and e.state is not None and e.state.value == v):
                return False
            if k == "progress" and not (e.kind == "progress" and e.percent == v):
                return False
            if k == "error" and not (e.kind == "state" and e.error is not None and e.error.reason == v):
                return False
            if k == "output_contains" and not (
                e.kind == "output" and v in (e.data or b"").decode(errors="replace")
            ):
                return False
        return True

    def start_watch(self, b: Mapping[str, Any], what: str) -> Tuple[threading.Thread, Dict[str, Any]]:
        id = self.job_id({"job": b["job"]}, what)
        stop_after = b.get("stop_after")
        if stop_after is not None:
            keys(stop_after, f"{what}: stop_after", ["state", "progress", "error", "output_contains"])
        out: Dict[str, Any] = {"from_seq": b.get("from_seq", 0), "stop_after": stop_after}
        t = threading.Thread(target=self.collect, args=(id, out["from_seq"], stop_after, out),
                             daemon=True)
        t.start()
        return t, out

    def finish_watch(self, t: threading.Thread, out: Dict[str, Any], name: Optional[str],
                     exp: Optional[Mapping[str, Any]], what: str) -> None:
        t.join(GUARD)
        if t.is_alive():
            fail(f"{what}: the watch did not end within {GUARD}s")
        if "error" in out:
            fail(f"{what}: the watch failed: {out['error']!r}")
        events: List[jobplane.Event] = out["events"]
        if out["stop_after"] is not None and not out.get("stopped"):
            fail(f"{what}: the stream ended before an event matching {out['stop_after']}")
        for i, e in enumerate(events):
            if e.seq != out["from_seq"] + 1 + i:
                fail(f"{what}: event {i} has seq {e.seq}, expected {out['from_seq'] + 1 + i}")
        terminal = [i for i, e in enumerate(events) if e.terminal]
        if len(terminal) > 1 or (terminal and terminal[0] != len(events) - 1):
            fail(f"{what}: terminal events at {terminal} of {len(events)}")
        if out["stop_after"] is None and events and not events[-1].terminal:
            fail(f"{what}: the stream ended without the terminal event")
        if name is not None:
            self.watches[name] = events
        if exp:
            self.check_watch(events, exp, what)

    def check_watch(self, events: List[jobplane.Event], exp: Mapping[str, Any], what: str) -> None:
        keys(exp, f"{what}: expect", ["states", "errors", "progress", "output", "output_lines",
                                       "kinds", "count", "first_seq", "terminal", "same_as"])
        text = b"".join(e.data or b"" for e in events if e.kind == "output").decode()
        got: Dict[str, Any] = {
            "states": [e.state.value for e in events if e.kind == "state" and e.state is not None],
            "errors": [e.error.reason for e in events if e.kind == "state" and e.error is not None],
            "progress": [e.percent for e in events if e.kind == "progress"],
            "output": text,
            "kinds": [e.kind for e in events],
            "count": len(events),
            "first_seq": events[0].seq if events else None,
            "terminal": events[-1].state.value if events and events[-1].terminal
            and events[-1].state is not None else None,
        }
        for k, v in exp.items():
            if k == "output_lines":
                want = "".join(f"line {i}\n" for i in range(v))
                if text != want:
                    fail(f"{what}: output is not line 0..{v - 1}: {text[:200]!r}…")
            elif k == "same_as":
                keys(v, f"{what}: same_as", ["watch", "after_seq"], ["watch", "after_seq"])
                if v["watch"] not in self.watches:
                    fail(f"{what}: no watch named {v['watch']!r}")
                ref = [e for e in self.watches[v["watch"]] if e.seq > v["after_seq"]]

                def content(e: jobplane.Event) -> Tuple[Any, ...]:
                    return (e.seq, e.kind, e.attempt, e.state, e.from_state, e.error,
                            e.result_bytes, e.waiting_for, e.percent, e.message, e.stream, e.data,
                            e.truncated)

                if [content(e) for e in events] != [content(e) for e in ref]:
                    fail(f"{what}: events differ from watch {v['watch']} after {v['after_seq']}")
            elif not json_equal(got[k], v):
                fail(f"{what}: {k} is {got[k]!r}, expected {v!r}")

    def do_watch(self, b: Any, what: str) -> None:
        keys(b, what, ["job", "from_seq", "stop_after", "as", "background", "expect"], ["job"])
        t, out = self.start_watch(b, what)
        if b.get("background"):
            if "as" not in b or "expect" in b:
                fail(f"{what}: a background watch needs `as` and takes no `expect`")
            self.background[b["as"]] = (t, out)
            return
        self.finish_watch(t, out, b.get("as"), b.get("expect"), what)

    def do_await_watch(self, b: Any, what: str) -> None:
        keys(b, what, ["watch", "expect"], ["watch"])
        if b["watch"] not in self.background:
            fail(f"{what}: no background watch named {b['watch']!r}")
        t, out = self.background.pop(b["watch"])
        self.finish_watch(t, out, b["watch"], b.get("expect"), what)

    # -- listing and administration

    def do_list(self, b: Any, what: str) -> None:
        keys(b, what, ["queue", "states", "labels", "namespace", "expect"])
        page = self.client(b.get("namespace")).list(
            queue=b.get("queue"), states=b.get("states"), labels=b.get("labels"), page_size=1000)
        exp = keys(dict(b.get("expect") or {}), f"{what}: expect", ["count", "jobs"])
        if "count" in exp and len(page.jobs) != exp["count"]:
            fail(f"{what}: {len(page.jobs)} jobs listed, expected {exp['count']}")
        if "jobs" in exp:
            want = {self.job_id({"job": n}, what) for n in exp["jobs"]}
            if {j.id for j in page.jobs} != want:
                fail(f"{what}: listed jobs differ from {exp['jobs']}")

    def do_configure_queue(self, b: Any, what: str) -> None:
        keys(b, what, ["name", "config", "expect_error"], ["name", "config"])
        c = self.queue_config(b["config"], what)
        self.expecting(b, what, lambda: self.client().configure_queue(b["name"], **c))

    def do_configure_pool(self, b: Any, what: str) -> None:
        keys(b, what, ["name", "config", "expect_error"], ["name", "config"])
        c = self.pool_config(b["config"], what)
        self.expecting(b, what, lambda: self.client().configure_pool(b["name"], **c))

    def do_queue(self, b: Any, what: str) -> None:
        keys(b, what, ["name", "expect"], ["name"])
        qs = [q for q in self.client().list_queues() if q["name"] == b["name"]]
        if not qs:
            fail(f"{what}: queue {b['name']!r} is not listed")
        q = qs[0]
        exp = keys(dict(b.get("expect") or {}), f"{what}: expect",
                   ["depth", "running", "paused", "max_concurrency"])
        got = dict(q, max_concurrency=q["max_concurrency"] or 0)
        for k, v in exp.items():
            if not json_equal(got[k], v):
                fail(f"{what}: {k} is {got[k]!r}, expected {v!r}")

    def do_pool(self, b: Any, what: str) -> None:
        keys(b, what, ["name", "expect"], ["name"])
        p = self.client().get_pool(b["name"])
        exp = keys(dict(b.get("expect") or {}), f"{what}: expect",
                   ["in_use", "running", "waiting", "epoch", "epoch_at_least"])
        for k, v in exp.items():
            if k == "in_use":
                for unit, n in v.items():
                    if p["in_use"].get(unit, 0) != n:
                        fail(f"{what}: in_use[{unit}] is {p['in_use'].get(unit, 0)}, expected {n}")
            elif k == "epoch_at_least":
                if p["epoch"] < v:
                    fail(f"{what}: epoch {p['epoch']} < {v}")
            elif p[k] != v:
                fail(f"{what}: {k} is {p[k]!r}, expected {v!r}")

    def do_expect_order(self, b: Any, what: str) -> None:
        keys(b, what, ["started"], ["started"])
        with self.book.lock:
            starts = list(self.book.starts)
        idx = []
        for n in b["started"]:
            id = self.job_id({"job": n}, what)
            if id not in starts:
                fail(f"{what}: {n} never started")
            idx.append(starts.index(id))
        if idx != sorted(idx):
            fail(f"{what}: started in another order: {idx}")

    def do_expect_peak(self, b: Any, what: str) -> None:
        keys(b, what, ["queue", "at_most", "at_least"], ["queue"])
        with self.book.lock:
            peak = self.book.peak.get(b["queue"], 0)
        if "at_most" in b and peak > b["at_most"]:
            fail(f"{what}: peak {peak} > {b['at_most']}")
        if "at_least" in b and peak < b["at_least"]:
            fail(f"{what}: peak {peak} < {b['at_least']}")

    def teardown(self) -> None:
        self.book.fire_all()
        for w, _ in self.workers.values():
            w.stop()
        for _, t in self.workers.values():
            t.join(GUARD)


def _param(stem: str, s: Dict[str, Any]) -> Any:
    marks = []
    if s["name"] in KNOWN:
        marks.append(pytest.mark.xfail(strict=True, raises=(ScenarioError, jobplane.Error),
                                       reason="listed in known-failing-python.txt"))
    return pytest.param(s, id=f"{stem}::{s['name']}", marks=marks)


@pytest.mark.parametrize("scenario", [_param(stem, s) for stem, s in SCENARIOS])
def test_scenario(scenario: Dict[str, Any], addr: str) -> None:
    run = Run(addr)
    started = time.monotonic()
    try:
        if "setup" in scenario:
            run.setup(scenario["setup"])
        for i, step in enumerate(scenario["steps"]):
            run.step(i, step)
    finally:
        run.teardown()
    assert time.monotonic() - started < 120
