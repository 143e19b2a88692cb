"""The server's processes on the real process tree: no worker outlives its supervisor, and no
test leaves a process behind (the check in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.supervisor import check_port_free
from tests.conftest import REPO, run_processes
from tests.load.conftest import wait_for
from tests.load.test_workers import worker_pids

pytestmark = pytest.mark.e2e


def descendants(pid: int) -> set[int]:
    procs = run_processes()
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, proc in procs.items() if proc.ppid in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def test_kill_9_of_the_supervisor_ends_every_worker_and_frees_the_ports(start_server):
    server = start_server(workers=2, log_level="info")
    port = int(server.url.rsplit(":", 1)[1])
    workers = worker_pids(server)
    children = descendants(server.proc.pid)
    assert len(workers) == 2 and workers <= children  # and multiprocessing's resource tracker

    os.kill(server.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    server.proc.wait()
    deadline = killed + 60  # generous: each worker drains (nothing in flight) and exits
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, [p for p in children if alive(p)]
        time.sleep(0.05)
    took = time.monotonic() - killed
    print(f"every worker gone {took:.2f} s after kill -9 of the supervisor")
    assert check_port_free("127.0.0.1", port) is None
    assert check_port_free("127.0.0.1", server.grpc_port) is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v2/health/live", timeout=5)


LEAKY_TEST = """
import subprocess

def test_leaves_a_sleeper():
    subprocess.Popen(["sleep", "300"])
"""


def test_the_suite_fails_a_test_that_leaves_a_process_behind(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    env = {**os.environ, "BNFOLD_TEST_LEAK_GRACE_S": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-p", "tests.conftest", "--rootdir", str(tmp_path), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 passed, 1 error" in out, out
    assert "test_leaves_a_sleeper left 1 process(es) running" in out, out
    assert "sleep 300" in out, out


def ready_status(url: str) -> int:
    """Readiness on a new connection; 0 when it is not answered within 2 s (a connection the
    kernel queued for a stopped worker waits until that worker is killed, then is reset)."""
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code
    except httpx.TransportError:
        return 0


def test_a_worker_slow_to_start_is_not_killed_for_a_late_health_answer(start_server):
    # Each worker sleeps before it can answer the supervisor at all, longer than uvicorn's
    # 5 s health check timeout: a starting worker is waited for, not killed.
    server = start_server(workers=2, log_level="info", slow_import_s=8)
    victim = min(worker_pids(server))
    os.kill(victim, signal.SIGKILL)  # its replacement is as slow to start
    wait_for(lambda: "starting a new one" in server.log.read_text(), timeout=30)
    wait_for(lambda: ready_status(server.url) == 200, timeout=120)
    log = server.log.read_text()
    assert "did not answer its health check" not in log, log
    assert log.count("starting a new one") == 1, log
    assert len(worker_pids(server)) == 3, log


def test_a_stopped_worker_reads_not_ready_then_is_replaced(start_server):
    server = start_server(workers=2, log_level="info")
    victim = min(worker_pids(server))
    ready = f"(pid {victim}) ready: health checks apply"
    wait_for(lambda: ready in server.log.read_text(), timeout=60)  # no longer "starting"
    os.kill(victim, signal.SIGSTOP)  # hung: alive, answering nothing
    stopped = time.monotonic()
    seen = []
    try:
        wait_for(lambda: seen.append(ready_status(server.url)) or seen[-1] == 503, timeout=60)
        not_ready_after = time.monotonic() - stopped
        wait_for(lambda: f"(pid {victim}) did not answer" in server.log.read_text(), timeout=60)
        replaced_after = time.monotonic() - stopped
    except AssertionError:
        raise AssertionError(f"readiness answers {seen}:\n{server.log.read_text()}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and reaped: gone
            os.kill(victim, signal.SIGCONT)
    print(f"not ready after {not_ready_after:.1f} s, replaced after {replaced_after:.1f} s")
    wait_for(lambda: ready_status(server.url) == 200, timeout=120)
    log = server.log.read_text()
    assert f"(pid {victim}) has not answered its health check" in log, log
    assert not alive(victim)
