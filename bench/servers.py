"""Start each HTTP target as its own process (group) on a free loopback port; stop it.

The peers run one uvicorn worker unless told otherwise (the minimal handler also runs with as
many uvicorn workers as bnfold has); bnfold runs its own default, one worker per usable core
(BNFOLD_WORKERS). Every server runs uvicorn with its defaults (uvloop and httptools when
installed), logs at
warning (no access log) into the work folder, and is started in its own process group so that
stopping it also stops the worker processes it spawned (LitServe's inference worker).

Only the target being measured may use the CPU: the others are paused (SIGSTOP to their group)
once they have finished the work left over from their last run (`settle`). Idle LitServe polls
its queues at about 12% of a core; a thread pool still clearing 64 abandoned requests takes
far more. Either would be charged to whichever target came next.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90.0


@dataclass
class Server:
    name: str
    port: int
    ready_path: str
    proc: subprocess.Popen
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def uvicorn_cmd(app: str, port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def bnfold_server(models_dir: Path, log_dir: Path, settings: dict | None = None) -> Server:
    """`bnfold-serve` (python -m service) as a user starts it, with `settings` (BNFOLD_*) added."""
    port = free_port()
    env = {
        "BNFOLD_GRPC_PORT": str(free_port()),  # not 8001: another server may hold it
        **(settings or {}),
        "BNFOLD_MODELS_DIR": str(models_dir),
        "BNFOLD_HOST": HOST,
        "BNFOLD_PORT": str(port),
        "BNFOLD_LOG_LEVEL": "warning",
    }
    return _start(
        "bnfold", [sys.executable, "-m", "service"], env, port, "/v2/health/ready", log_dir
    )


def bare_server(log_dir: Path) -> Server:
    port = free_port()
    return _start("bare", uvicorn_cmd("bench.peers.bare:app", port), {}, port, "/health", log_dir)


def minimal_server(bundle: Path, log_dir: Path, workers: int = 1) -> Server:
    """The minimal handler; `workers` > 1 runs it under `uvicorn --workers N`, onnxruntime
    with one intra-op thread per worker (as bnfold's workers get their share of the cores)."""
    port = free_port()
    cmd = uvicorn_cmd("bench.peers.minimal:app", port, workers)
    env = {"BENCH_BUNDLE": str(bundle)}
    if workers > 1:
        env["BENCH_THREADS"] = "1"
    name = "minimal" if workers == 1 else f"minimal-x{workers}"
    return _start(name, cmd, env, port, "/health", log_dir)


def group_rss_kib(pgid: int) -> int:
    """Resident memory (VmRSS) summed over every live process of one process group: a server
    with its worker processes, whole."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:  # the process ended meanwhile
            continue
    return total


def litserve_server(bundle: Path, max_batch: int, timeout_s: float, log_dir: Path) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.litserve_server",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch),
        "--batch-timeout",
        str(timeout_s),
    ]
    return _start("litserve", cmd, {}, port, "/health", log_dir)


def _start(
    name: str, cmd: list[str], env: dict, port: int, ready_path: str, log_dir: Path
) -> Server:
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, port, ready_path, proc, log_path)


def wait_ready(server: Server, timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll the server's health path until 200; seconds it took. Raises with the log's tail."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode} during start-up:\n"
                f"{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url(server.ready_path), timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by every live process of one process group."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime stime
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(server: Server, window_s: float = 0.2, idle: float = 0.3, max_s: float = 10.0) -> float:
    """Wait until the group uses under `idle` of a core over a window; seconds waited.

    Leftover work keeps a core near 100% busy; an idle LitServe polls at about 12%.
    """
    start = time.monotonic()
    before = group_cpu_seconds(server.proc.pid)
    while time.monotonic() - start < max_s:
        time.sleep(window_s)
        now = group_cpu_seconds(server.proc.pid)
        if now - before < idle * window_s:
            break
        before = now
    return time.monotonic() - start


def pause(server: Server) -> None:
    _signal_group(server.proc.pid, signal.SIGSTOP)


def resume(server: Server) -> None:
    _signal_group(server.proc.pid, signal.SIGCONT)


def stop(server: Server, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's own process group, SIGKILL after the grace period."""
    if server.proc.poll() is not None:
        return
    resume(server)  # a stopped process would not act on SIGTERM
    _signal_group(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=grace_s)
    _signal_group(server.proc.pid, signal.SIGKILL)  # LitServe's worker, if it outlived the parent


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
