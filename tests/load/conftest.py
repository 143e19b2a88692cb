"""Real `bnfold-serve` processes for the load and fault suite: started on free loopback ports
with the settings a test needs, optionally slowed (slow_serve.py), always stopped (SIGTERM, then
SIGKILL after 10 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.pinned import THREADS, pinned_direct
from tests.servers import free_port, stop, wait_ready
from tests.service.conftest import client, copy_bundle, serve, settings  # noqa: F401 (fixtures)

PREDICT = "/v1/models/digits/predict"


@pytest.fixture(scope="session")
def direct(bundle_src: Path):
    """The reference at the servers' intra-op thread count (tests/pinned.py)."""
    return pinned_direct(bundle_src)


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log: Path
    grpc_port: int = 0

    @property
    def grpc(self) -> str:
        """host:port of the gRPC server (tritonclient.grpc's url)."""
        return f"127.0.0.1:{self.grpc_port}"

    def memory_kib(self, field: str = "VmRSS") -> int:
        """VmRSS (resident now) or VmHWM (peak resident) of the process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text


@pytest.fixture
def start_server(models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(slow_run_s=0, slow_import_s=0, **settings) -> a ready server (slowed as in
    slow_serve.py), each setting passed as BNFOLD_<NAME>; stopped after the test if it still
    runs (a test that stops it itself checks the exit code)."""
    started: list[ServerProcess] = []

    def start(slow_run_s: float = 0.0, slow_import_s: float = 0.0, **overrides) -> ServerProcess:
        port = free_port()
        chosen = {"provider": "cpu", "log_level": "warning", "models_dir": models_dir,
                  "grpc_port": free_port(), "workers": 1, "threads": THREADS}  # fmt: skip
        chosen.update(overrides)
        env = {f"BNFOLD_{k.upper()}": str(v) for k, v in chosen.items()}
        env = {**os.environ, **env, "SLOW_SERVE_RUN_S": str(slow_run_s),
               "SLOW_SERVE_IMPORT_S": str(slow_import_s)}  # fmt: skip
        log = tmp_path / f"server-{port}.log"
        command = [sys.executable, "-m", "tests.load.slow_serve", "--host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
        server = ServerProcess(proc, f"http://127.0.0.1:{port}", log, int(chosen["grpc_port"]))
        started.append(server)
        wait_ready(server.url, proc, log)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            stop(server.proc, timeout=10)  # SIGTERM: a supervisor stops its workers too


def png_request(digits, indices: list[int]) -> dict:
    """httpx kwargs for a multipart predict of these digits, named by their index."""
    return {"files": [("files", (f"{i}.png", digits[i].png, "image/png")) for i in indices]}


def whole_lines(log_text: str) -> list[str]:
    """The lines of a running server's log written whole so far: a process may be writing
    the last one now."""
    return log_text[: log_text.rfind("\n") + 1].splitlines()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
