"""Clients at the edges of HTTP, on the real server process: bytes that are not HTTP get the
API's JSON 400 (uvicorn's own answer is plain text), and a client that half-closes its side
after sending a whole request (shutdown(SHUT_WR), as `nc -N` or some proxies do) gets its
answer; asyncio closed such a connection unanswered. The server serves on after each.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from service.shutdown import MALFORMED
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
PNG = (REPO / "examples" / "digit-3.png").read_bytes()


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(server, data: bytes, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send `data` on a new connection (then SHUT_WR, if told) and read until the server
    closes it."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def predict_request(body: bytes = PNG, length: int | None = None) -> bytes:
    head = (
        "POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize(
    "junk",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_bytes_that_are_not_http_get_a_json_400_and_the_server_serves_on(start_server, junk):
    server = start_server()
    status, headers, body = split(exchange(server, junk))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body) == {"error": MALFORMED}
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def test_a_half_closed_client_gets_its_answer(start_server):
    server = start_server()
    status, headers, body = split(exchange(server, predict_request(), half_close=True))
    assert status == 200, body
    assert json.loads(body)["predictions"][0]["label"] == "3"
    assert headers["connection"] == "close"
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _, body = split(exchange(server, get, half_close=True))
    assert status == 200 and json.loads(body) == {"live": True}


def test_a_half_close_before_the_body_is_whole_closes_the_connection(start_server):
    """Nothing more can come: the request is dropped (the route sees a disconnect), the
    connection closes at once instead of waiting out the request timeout."""
    server = start_server(request_timeout_s=60)
    cut = predict_request(PNG[:50], length=len(PNG))
    assert exchange(server, cut, half_close=True, timeout=10) == b""
    r = httpx.post(
        f"{server.url}/v1/models/digits/predict",
        content=PNG,
        headers={"content-type": "image/png"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "3"
