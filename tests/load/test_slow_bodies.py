"""Slow request bodies hold connections, never a model's queue slots, and are cut off.

A client that sends a predict's headers and then its body a byte at a time used to take one of
the model's BNFOLD_MAX_QUEUE_SIZE slots for the whole request timeout: a few hundred such
connections and every legitimate request got 503. On the real server process here, with two
slots and three trickling bodies, a normal predict is answered 200 meanwhile, and each trickling
body is answered 408 (its own status, counted) once it falls under the minimum rate, and its
connection is closed.
"""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest

from tests.conftest import REPO
from tests.load.conftest import PREDICT

pytestmark = pytest.mark.e2e
PNG = (REPO / "examples" / "digit-3.png").read_bytes()
GRACE_S = 3.0


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def trickling(server) -> socket.socket:
    """A connection that sent a predict's headers and one byte of its 1000-byte body."""
    sock = socket.create_connection(address(server), timeout=30)
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    sock.sendall(head.encode() + PNG[:1])
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def counted(metrics: str, code: int) -> float:
    pattern = rf'bnfold_requests_total\{{[^}}]*code="{code}"[^}}]*\}} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, metrics))


def test_trickling_bodies_take_no_queue_slot_and_are_cut_off_with_408(start_server):
    server = start_server(max_queue_size=2, body_grace_s=GRACE_S, min_body_rate_bytes_s=1000,
                          request_timeout_s=60)  # fmt: skip
    slow = [trickling(server) for _ in range(3)]
    try:
        # Their headers are in: before, each had taken a slot (both slots, and the third a 503).
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(3):
                answer = client.post(PREDICT, content=PNG, headers={"Content-Type": "image/png"})
                assert answer.status_code == 200, answer.text
            assert 'bnfold_queue_depth{model="digits"} 0.0' in client.get("/metrics").text
        for sock in slow:  # each cut off (not after the 60 s request timeout), then closed
            response = read_all(sock)
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), response[:300]
            assert b"connection: close" in head.lower()
            assert "request body too slow" in json.loads(body)["error"]
    finally:
        for sock in slow:
            sock.close()
    metrics = server.metrics()
    assert counted(metrics, 408) == 3 and counted(metrics, 503) == 0
    assert "Traceback" not in server.log.read_text()
