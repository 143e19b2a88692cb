"""Running out of file descriptors is no longer silent: connections are capped below the limit.

At RLIMIT_NOFILE 1024, 3,000 idle connections made the server's accept fail: new clients were
disconnected without an answer and nothing was logged. Here the real server process runs with
an open-files limit of 128 (soft and hard, so it cannot raise it) and 160 idle connections are
opened: a new client is still answered, because the longest idle connection is closed to make
room, and the log says so once (not once per connection). With every connection busy instead, a
new one gets 503 and a message.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.load.conftest import PREDICT
from tests.pinned import THREADS
from tests.servers import free_port, stop, wait_ready

pytestmark = pytest.mark.e2e
FILES = 128


def _low_files_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


@contextmanager
def server_with_files_limit(models_dir: Path, log: Path, **settings) -> Iterator[str]:
    """The real server (single process) under an open-files limit of FILES; stopped after."""
    port = free_port()
    chosen = {"provider": "cpu", "log_level": "warning", "models_dir": models_dir,
              "grpc_port": free_port(), "workers": 1, "threads": THREADS, **settings}  # fmt: skip
    env = {**os.environ, **{f"BNFOLD_{k.upper()}": str(v) for k, v in chosen.items()}}
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out,
                                preexec_fn=_low_files_limit)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log)
        yield url
    finally:
        stop(proc, timeout=10)


def connect(url: str, count: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    return [socket.create_connection((host, int(port)), timeout=30) for _ in range(count)]


def test_idle_connections_past_the_files_limit_make_room_for_new_clients(models_dir, tmp_path):
    log = tmp_path / "server.log"
    with server_with_files_limit(models_dir, log, header_timeout_s=60) as url:
        idle = connect(url, FILES + 32)  # more than the server has descriptors for
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                for _ in range(3):  # each new connection takes an idle one's place
                    answer = client.get("/v2/health/ready", headers={"Connection": "close"})
                    assert answer.status_code == 200, answer.text
        finally:
            for sock in idle:
                sock.close()
    text = log.read_text()
    assert text.count("connection limit reached") == 1, text[-3000:]
    assert f"open-files limit {FILES}" in text


def test_a_new_connection_when_every_one_is_busy_gets_503(models_dir, tmp_path):
    log = tmp_path / "server.log"
    with server_with_files_limit(models_dir, log, max_connections=3, body_grace_s=60) as url:
        busy = connect(url, 3)
        head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        for sock in busy:  # a request in progress on each: its body still on its way
            sock.sendall(f"{head}Content-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode())
        for sock in busy:  # the server is reading each body: it asked for it
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        try:
            with httpx.Client(base_url=url, timeout=30) as client:
                answer = client.get("/v2/health/live")
            assert answer.status_code == 503
            assert "BNFOLD_MAX_CONNECTIONS" in answer.json()["error"]
        finally:
            for sock in busy:
                sock.close()
    assert "connection limit reached" in log.read_text()
