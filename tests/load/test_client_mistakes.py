"""A client's mistakes are the client's: a 4xx (or 499), no traceback, and no echo of its bytes.

On the real server process: a client that goes away mid-body, or breaks the chunk framing, was
logged as a server error with a ClientDisconnect traceback and counted as a 500; a too-long
static file name was a 500 (File name too long); a load body nested 1,000 deep was a 500
(RecursionError); a 1 MB flag value, a 1 MB parameter name or a 50 KB Content-Type came back
whole in the error message; a newline in a bundle's version forged a log line; the repository
index answered 400 for a body over the limit, after reading all of it.
"""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest

from tests.load.conftest import PREDICT, wait_for

pytestmark = pytest.mark.e2e
TOKEN = "t" * 24
LIMIT = 3_000_000
INFER = "/v2/models/digits/infer"
SMALL = 2_000  # bytes: an error answer never needs more
FORGED = "1\n2026-01-01 00:00:00,000 ERROR service.registry [-]: forged line"


@pytest.fixture
def server(start_server, copy_bundle):
    bundle = copy_bundle("digits")
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["version"] = FORGED
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return start_server(models_dir=bundle.parent, admin_token=TOKEN, max_body_bytes=LIMIT,
                        log_level="info")  # fmt: skip


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def counted(metrics: str, code: int) -> float:
    pattern = rf'bnfold_requests_total\{{[^}}]*code="{code}"[^}}]*\}} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, metrics))


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_disconnects_and_broken_framing_are_not_server_errors(server):
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    with socket.create_connection(address(server), timeout=30) as sock:  # gone mid-body
        sock.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
    wait_for(lambda: counted(server.metrics(), 499) == 1, timeout=20)
    with socket.create_connection(address(server), timeout=30) as sock:  # bad chunk framing
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nzz\r\n".encode())
        assert read_all(sock).startswith(b"HTTP/1.1 400")
    wait_for(lambda: counted(server.metrics(), 499) == 2, timeout=20)
    assert counted(server.metrics(), 500) == 0
    log = server.log.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log


def test_mistakes_get_4xx_with_short_messages(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.get(f"/static/{'a' * 300}.js")
        assert answer.status_code == 404 and len(answer.content) < SMALL
        nested = '{"parameters": ' + "[" * 1000 + "]" * 1000 + "}"
        answer = client.post("/v2/repository/models/digits/load", content=nested, headers=auth)
        assert answer.status_code == 400, answer.text
        flag = {"inputs": [tensor], "parameters": {"binary_data_output": "x" * 1_000_000}}
        answer = client.post(INFER, json=flag)
        assert answer.status_code == 400 and len(answer.content) < SMALL, answer.text[:300]
        name = {"inputs": [tensor], "parameters": {"p" * 900_000: [1]}}
        answer = client.post(INFER, json=name)
        assert answer.status_code == 400 and len(answer.content) < SMALL, answer.text[:300]
        for header in ("Content-Type", "Content-Encoding"):
            value = "application/" + "x" * 50_000
            answer = client.post(INFER, content=b"{}", headers={header: value})
            assert answer.status_code == 415 and len(answer.content) < SMALL, answer.text[:300]
        assert counted(client.get("/metrics").text, 500) == 0
    log = server.log.read_text()
    assert "forged line" in log and not re.search(r"^\S+ \S+ ERROR .*forged line", log, re.M)
    assert "Traceback" not in log


def test_repository_index_over_the_limit_is_413_before_reading_it_all(server):
    """A chunked body (no Content-Length) that passes the limit: 413 once it does, and the
    connection closed; the rest of the body is never read."""
    with socket.create_connection(address(server), timeout=30) as sock:
        head = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        sock.sendall(head + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b" " * 65536
        for _ in range(LIMIT // len(piece) + 1):
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        response = read_all(sock)  # the server closes the connection after its answer
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"BNFOLD_MAX_BODY_BYTES" in response
