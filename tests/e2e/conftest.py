"""The real `bnfold-serve` process on a free loopback port, started once for the e2e tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, stop, wait_ready

MAX_BODY_BYTES = 1_000_000  # small, so the 413 test sends little


def serve_command(port: int, models_dir: Path) -> list[str]:
    exe = shutil.which("bnfold-serve", path=str(Path(sys.executable).parent))
    base = [exe] if exe else [sys.executable, "-m", "service"]
    return [*base, "--host", "127.0.0.1", "--port", str(port), "--models-dir", str(models_dir)]


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running server; stopped with SIGTERM after the session, exiting 0."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # BNFOLD_THREADS as the bit-for-bit references use (tests/pinned.py).
    env = {**os.environ, "BNFOLD_PROVIDER": "cpu", "BNFOLD_LOG_LEVEL": "warning",
           "BNFOLD_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
           "BNFOLD_GRPC_PORT": str(free_port()), "BNFOLD_THREADS": "1"}  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_command(port, models_dir), env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop(proc, timeout=10)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{log.read_text()}"  # drained
    assert "Traceback" not in log.read_text()
