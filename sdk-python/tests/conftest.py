"""Fixtures: a real `jobplane serve` on 127.0.0.1:0 (metrics on 127.0.0.1:0 too) with a fresh
database per test: SQLite in the test's temp directory, or with JOBPLANE_TEST_BACKEND=postgres a
database of its own (`jp_e2e_<uuid>`, made and dropped with the `psql` CLI) on the server
JOBPLANE_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432/test). When that server cannot
be reached the test is skipped, except under CI=true, where it fails.

A server is ready once the standard gRPC health service (through grpcio, raw bytes) reports every
jobplane.v1 service SERVING: it listens, and logs its ports, before it has recovered from the
database (and on PostgreSQL taken the lead), answering UNAVAILABLE "starting" until then."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Mapping, NoReturn, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND = os.environ.get("JOBPLANE_TEST_BACKEND") or "sqlite"
POSTGRES = os.environ.get("JOBPLANE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
if BACKEND not in ("sqlite", "postgres"):
    raise RuntimeError(f"JOBPLANE_TEST_BACKEND={BACKEND!r}: expected `sqlite` or `postgres`")


def jobplane_bin() -> str:
    """The service binary: $JOBPLANE_BIN, else the workspace's debug build."""
    explicit = os.environ.get("JOBPLANE_BIN")
    if explicit:
        return explicit
    path = ROOT / "target" / "debug" / "jobplane"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build -p jobplane-server --bin jobplane`")
    return str(path)


def database_url(server: str, database: str) -> str:
    """``server`` (a postgres:// URL) with its database replaced by ``database``."""
    base, sep, query = server.partition("?")
    authority = base.find("://") + 3 if "://" in base else 0
    path = base.find("/", authority)
    return f"{base if path < 0 else base[:path]}/{database}{sep}{query}"


def psql(sql: str) -> None:
    """Runs one statement on the JOBPLANE_TEST_POSTGRES server; skips the test when the server
    cannot be reached (fails under CI=true)."""
    try:
        done = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", POSTGRES, "-c", sql],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PGCONNECT_TIMEOUT="5"))
    except FileNotFoundError:
        unreachable("the psql command is not installed")
    # psql exits with 2 when it cannot connect (or lost the connection), 3 when the SQL failed.
    if done.returncode == 2:
        unreachable(done.stderr.strip())
    if done.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")


def unreachable(why: str) -> NoReturn:
    what = (f"JOBPLANE_TEST_BACKEND=postgres but no PostgreSQL at {POSTGRES} ({why}); start it, "
            "set JOBPLANE_TEST_POSTGRES, or unset JOBPLANE_TEST_BACKEND")
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run under CI=true: {what}")
    pytest.skip(what)


SERVICES = ("jobplane.v1.JobService", "jobplane.v1.WorkerService", "jobplane.v1.AdminService")


def wait_serving(addr: str, timeout: float) -> bool:
    """Waits (on the health Watch streams) until ``addr`` serves every jobplane.v1 service;
    False if it does not within ``timeout`` seconds."""
    import grpc  # the suite's dependency (scripts/test.sh installs it), needed only here

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr.removeprefix("http://")) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")  # bytes in, bytes out
        for service in SERVICES:
            name = service.encode()
            request = b"\x0a" + bytes([len(name)]) + name  # HealthCheckRequest.service
            try:
                for status in watch(request, timeout=max(deadline - time.monotonic(), 0.1)):
                    if status == b"\x08\x01":  # HealthCheckResponse.status = SERVING
                        break
                else:
                    return False
            except grpc.RpcError:
                return False
    return True


class Database:
    """The database of one server: a file in ``tmp`` (SQLite), or a PostgreSQL database of its
    own that :meth:`drop` drops (``WITH (FORCE)``)."""

    def __init__(self, tmp: Path) -> None:
        self.name: Optional[str] = None
        if BACKEND == "sqlite":
            self.url = f"sqlite://{tmp / 'jobplane.db'}"
            return
        name = f"jp_e2e_{uuid.uuid4().hex}"
        psql(f"CREATE DATABASE {name}")
        self.name = name
        self.url = database_url(POSTGRES, name)

    def drop(self) -> None:
        if self.name is not None:
            name, self.name = self.name, None
            psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Server:
    """A `jobplane serve` process on a fresh database, ready (see the module's docstring); ``env``
    adds to (or, with None values, removes from) the environment it inherits."""

    def __init__(self, tmp: Path, env: Optional[Mapping[str, Optional[str]]] = None) -> None:
        self.db = Database(tmp)
        try:
            self._start(env)
        except BaseException:
            self.db.drop()
            raise

    def _start(self, env: Optional[Mapping[str, Optional[str]]]) -> None:
        environ = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        for k, v in (env or {}).items():
            if v is None:
                environ.pop(k, None)
            else:
                environ[k] = v
        self.proc = subprocess.Popen(
            [jobplane_bin(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--db", self.db.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environ,
            text=True,
        )
        self.lines: List[str] = []
        found = threading.Event()
        self.addr = ""
        self.metrics = ""

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                line = re.sub(r"\x1b\[[0-9;]*m", "", line)
                if not found.is_set() and "jobplane serving" in line and "listen=" in line:
                    self.addr = "http://" + line.split("listen=")[1].split()[0]
                    self.metrics = "http://" + line.split("metrics=")[1].split()[0]
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(30) or not wait_serving(self.addr, 30):
            self.proc.kill()
            raise RuntimeError("jobplane serve did not start:\n" + "".join(self.lines))

    def cli(self, *args: str) -> "subprocess.CompletedProcess[str]":
        """Runs a `jobplane` client command against this service."""
        return subprocess.run([jobplane_bin(), *args, "--addr", self.addr], capture_output=True,
                              text=True, timeout=60)

    def stop(self) -> None:
        """Stops the process (SIGTERM, then SIGKILL after 10 s) and drops its database."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.db.drop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def addr(server: Server) -> str:
    return server.addr
