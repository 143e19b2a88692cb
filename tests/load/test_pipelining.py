"""Pipelined HTTP/1.1 on the real server: answered in order, and a client that pipelines
without reading its answers cannot grow the worker's memory (the server stops reading from a
connection while too many of its requests wait for their turn)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.load.test_shutdown import connected, predict_request

pytestmark = pytest.mark.e2e
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """(status, body) of the next `count` responses on `sock` (each with Content-Length)."""
    stream = sock.makefile("rb")
    answers = []
    for _ in range(count):
        status = int(stream.readline().split()[1])
        length = 0
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answers.append((status, stream.read(length)))
    return answers


def test_pipelined_requests_are_answered_in_order(start_server, digits):
    server = start_server()
    port = int(server.url.rsplit(":", 1)[1])
    sock = connected(port)
    wire = []
    for i in range(3):  # predicts among many small requests, bodies split across reads
        wire += [LIVE * 100, *predict_request(digits[i].png, f"p{i}", f"h:{port}")]
    sock.sendall(b"".join(wire))
    answers = read_answers(sock, 303)
    assert [status for status, _ in answers] == [200] * 303
    labels = [answers[101 * i + 100][1] for i in range(3)]
    for i, body in enumerate(labels):
        assert f'"label":"{digits[i].label}"' in body.decode().replace(" ", ""), body
    sock.close()


def test_a_client_that_pipelines_without_reading_cannot_grow_the_worker(start_server):
    server = start_server()
    port = int(server.url.rsplit(":", 1)[1])
    httpx.get(f"{server.url}/v2/health/live")  # the first request's own allocations
    before = server.memory_kib()
    sock = connected(port)
    sock.setblocking(False)
    batch, pending, sent = LIVE * 50, b"", 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # 50 requests per write, never reading an answer
        pending = pending or batch
        try:
            n = sock.send(pending)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        pending, sent = pending[n:], sent + n
    grown_mib = (server.memory_kib() - before) / 1024
    print(f"{sent // len(LIVE)} requests written, worker memory +{grown_mib:.1f} MiB")
    assert grown_mib < 64, f"{sent // len(LIVE)} requests written: +{grown_mib:.0f} MiB"
    answer = httpx.get(f"{server.url}/v2/health/live", timeout=10)  # others are served
    assert answer.status_code == 200
    sock.setblocking(True)
    sock.settimeout(30)
    assert [status for status, _ in read_answers(sock, 200)] == [200] * 200
    sock.close()
