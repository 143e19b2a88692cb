"""Graceful shutdown of the real process: SIGTERM with requests on the wire in every state.

Every onnxruntime run takes RUN_S (slow_serve.py), so requests are still queued when SIGTERM
lands. Before SIGTERM: 16 ordinary predicts are sent whole, 16 slow ones send their headers and
half their body, and 4 keep-alive connections have been answered once and sit idle. After
SIGTERM (once new connections are refused): the slow ones send the rest, and each keep-alive
connection sends one more predict. Every one of the 36 must be answered 200 with its own digit
and `Connection: close`; readiness answers 503 on an open connection; the process exits 0.
Raw sockets, so the test controls exactly which bytes reach the server before SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import time

import httpx
import pytest

from tests.load.conftest import PREDICT, wait_for

pytestmark = pytest.mark.e2e
ORDINARY, SLOW, KEEP_ALIVE = 16, 16, 4
RUN_S = 1.5  # long enough that all are admitted before the first run ends, even on a busy CI
DRAIN_TIMEOUT_S = 20.0
BOUNDARY = "bnfold-shutdown-test"


def queue_depth(metrics_text: str) -> float:
    match = re.search(r'^bnfold_queue_depth\{model="digits"\} (\S+)$', metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def in_flight(metrics_text: str) -> float:
    """Requests being answered, the /metrics request that reads it included."""
    match = re.search(r"^bnfold_requests_in_flight (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def predict_request(png: bytes, request_id: str, host: str) -> tuple[bytes, bytes]:
    """(head, body) of a multipart predict of one PNG, as raw HTTP/1.1 bytes."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="{request_id}.png"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()
    body += png + f"\r\n--{BOUNDARY}--\r\n".encode()  # fmt: skip
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: {request_id}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    return head, body


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()  # type: ignore[attr-defined]
    return response


def connected(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def new_connections_until_refused(url: str, within_s: float = 5.0) -> list[int]:
    """Readiness on new connections until they are refused (the listener closes within a tick
    of SIGTERM); returns the statuses answered before that."""
    statuses, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            statuses.append(httpx.get(f"{url}/v2/health/ready", timeout=2).status_code)
        except httpx.ConnectError:
            return statuses
        time.sleep(0.02)
    raise AssertionError(f"new connections still accepted {within_s} s after SIGTERM")


def test_sigterm_serves_every_request_on_open_connections_then_exits_0(start_server, digits):
    server = start_server(slow_run_s=RUN_S, drain_timeout_s=DRAIN_TIMEOUT_S,
                          keep_alive_timeout_s=60, log_format="json", log_level="info")  # fmt: skip
    port = int(server.url.rsplit(":", 1)[1])
    host = f"127.0.0.1:{port}"
    png = {i: digits[i % 10].png for i in range(ORDINARY + SLOW + KEEP_ALIVE)}
    label = {i: str(digits[i % 10].label) for i in png}

    # Keep-alive connections: answered once, then idle (keep-alive timeout 60 s).
    keep = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(KEEP_ALIVE)]
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for conn in [*keep, probe]:
        conn.request("GET", "/v2/health/live")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("connection") != "close"
        response.read()
    # Slow bodies first (in flight, waiting for the rest of the body: admitted only once it has
    # arrived), then ordinary ones (admitted, queued behind the slow runs).
    slow = {}
    for i in range(ORDINARY, ORDINARY + SLOW):
        head, body = predict_request(png[i], f"req-{i}", host)
        slow[i] = (connected(port), body[len(body) // 2 :])
        slow[i][0].sendall(head + body[: len(body) // 2])
    wait_for(lambda: in_flight(server.metrics()) == SLOW + 1)
    ordinary = {}
    for i in range(ORDINARY):
        ordinary[i] = connected(port)
        ordinary[i].sendall(b"".join(predict_request(png[i], f"req-{i}", host)))
    wait_for(lambda: queue_depth(server.metrics()) == ORDINARY)
    assert in_flight(server.metrics()) == ORDINARY + SLOW + 1

    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    refused_after = new_connections_until_refused(server.url)
    probe.request("GET", "/v2/health/ready")  # on a connection accepted before SIGTERM
    not_ready = probe.getresponse()
    not_ready_body = json.loads(not_ready.read())
    for sock, rest in slow.values():
        sock.sendall(rest)
    for k, conn in enumerate(keep):
        i = ORDINARY + SLOW + k
        head, body = predict_request(png[i], f"req-{i}", host)
        conn.request("POST", PREDICT, body, {"X-Request-ID": f"req-{i}",
                     "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})  # fmt: skip
    answers = {i: read_response(sock) for i, sock in {**ordinary, **dict(
        (i, s) for i, (s, _) in slow.items())}.items()}  # fmt: skip
    for k, conn in enumerate(keep):
        response = conn.getresponse()
        response.body = response.read()  # type: ignore[attr-defined]
        answers[ORDINARY + SLOW + k] = response
    code = server.proc.wait(timeout=DRAIN_TIMEOUT_S + 5)
    elapsed = time.monotonic() - sent
    log = server.log.read_text()

    assert set(refused_after) <= {503}, (refused_after, log)  # never ready again
    assert not_ready.status == 503 and not_ready.getheader("connection") == "close"
    assert not_ready_body == {"error": "not ready: shutting down: finishing the requests in flight"}
    statuses = {i: r.status for i, r in answers.items()}
    assert statuses == {i: 200 for i in png}, log
    for i, r in answers.items():
        assert json.loads(r.body)["predictions"][0]["label"] == label[i]  # its own answer
        assert r.getheader("x-request-id") == f"req-{i}"
        assert r.getheader("connection") == "close", i
    for sock in [*ordinary.values(), *(s for s, _ in slow.values())]:
        assert sock.recv(1) == b""  # the server closed the connection after its answer
        sock.close()
    assert code == 0, log
    assert elapsed < DRAIN_TIMEOUT_S  # drained by the work, not by the timeout
    lines = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    access = {a["request_id"]: a["status"] for a in lines if a["logger"] == "service.access"}
    assert all(access[f"req-{i}"] == 200 for i in png)
    assert not [a for a in lines if a["level"] in ("error", "critical")]


def test_the_drain_timeout_cuts_a_request_off_and_exits_1(start_server, digits):
    server = start_server(slow_run_s=4, drain_timeout_s=1)
    port = int(server.url.rsplit(":", 1)[1])
    sock = connected(port)
    sock.sendall(b"".join(predict_request(digits[0].png, "cut", f"127.0.0.1:{port}")))
    wait_for(lambda: queue_depth(server.metrics()) == 1)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=20)
    assert code == 1
    assert sock.recv(1) == b""  # closed without an answer
    assert "drain timeout (1 s) exceeded: 1 request(s) cut off" in server.log.read_text()


def test_an_idle_connection_does_not_hold_the_drain_past_the_keep_alive_timeout(start_server):
    server = start_server(keep_alive_timeout_s=1, drain_timeout_s=20)
    port = int(server.url.rsplit(":", 1)[1])
    idle = connected(port)  # accepted, never sends a byte
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0
    assert time.monotonic() - sent < 10  # the keep-alive timeout (1 s), not the drain timeout
    assert idle.recv(1) == b""
