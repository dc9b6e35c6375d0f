"""Fixtures: a real `jobplane serve` on 127.0.0.1:0 (metrics on 127.0.0.1:0 too) with a fresh
SQLite database per test."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List, Mapping, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


def jobplane_bin() -> str:
    """The service binary: $JOBPLANE_BIN, else the workspace's debug build."""
    explicit = os.environ.get("JOBPLANE_BIN")
    if explicit:
        return explicit
    path = ROOT / "target" / "debug" / "jobplane"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build -p jobplane-server --bin jobplane`")
    return str(path)


class Server:
    """A `jobplane serve` process; ``env`` adds to (or, with None values, removes from) the
    environment it inherits."""

    def __init__(self, tmp: Path, env: Optional[Mapping[str, Optional[str]]] = None) -> None:
        environ = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        for k, v in (env or {}).items():
            if v is None:
                environ.pop(k, None)
            else:
                environ[k] = v
        self.proc = subprocess.Popen(
            [jobplane_bin(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--db", f"sqlite://{tmp / 'jobplane.db'}"],
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
        if not found.wait(30):
            self.proc.kill()
            raise RuntimeError("jobplane serve did not start:\n" + "".join(self.lines))

    def cli(self, *args: str) -> "subprocess.CompletedProcess[str]":
        """Runs a `jobplane` client command against this service."""
        return subprocess.run([jobplane_bin(), *args, "--addr", self.addr], capture_output=True,
                              text=True, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
