"""The real `bnfold-serve` process on a free loopback port, started once for the e2e tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port, stop, wait_ready

MAX_BODY_BYTES = 1_000_000  # small, so the 413 test sends little


def serve_command(port: int, models_dir: Path) -> list[str]:
    exe = shutil.which("bnfold-serve", path=str(Path(sys.executable).parent))
    base = [exe] if exe else [sys.executable, "-m", "service"]
    return [*base, "--host", "127.0.0.1", "--port", str(port), "--models-dir", str(models_dir)]


@dataclass
class Served:
    """A running bnfold-serve: REST base URL, gRPC host:port, the process and its log."""

    url: str
    grpc: str
    proc: subprocess.Popen
    log: Path


@contextmanager
def serving(models_dir: Path, log: Path, **settings: object) -> Iterator[Served]:
    """The real `bnfold-serve` on free loopback ports, REST and gRPC (never the defaults, which
    another server on this machine may hold), each setting passed as BNFOLD_<NAME>; ready when
    yielded, stopped with SIGTERM afterwards (the caller checks the exit code and the log)."""
    port, grpc_port = free_port(), free_port()
    chosen = {"provider": "cpu", "log_level": "warning", "grpc_port": grpc_port, **settings}
    env = {**os.environ, **{f"BNFOLD_{k.upper()}": str(v) for k, v in chosen.items()}}
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_command(port, models_dir), env=env, stdout=out, stderr=out)
    served = Served(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc, log)
    try:
        wait_ready(served.url, proc, log)
        yield served
    finally:
        stop(proc, timeout=10)


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running server; stopped with SIGTERM after the module, exiting 0.
    Module-scoped: the check that no test leaves a process behind (tests/conftest.py) sees
    which fixture started a process through a hook pytest calls for fixtures of a module or
    narrower, not for session fixtures."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    # BNFOLD_THREADS as the bit-for-bit references use (tests/pinned.py).
    with serving(models_dir, log, max_body_bytes=MAX_BODY_BYTES, threads=1) as served:
        yield served.url
    assert served.proc.returncode == 0, f"exit {served.proc.returncode}:\n{log.read_text()}"
    assert "Traceback" not in log.read_text()
