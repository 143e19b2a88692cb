"""Slow clients cannot hold connections: headers are due within BNFOLD_HEADER_TIMEOUT_S.

uvicorn itself has no header timer: a connection that sends nothing, or a header a byte at a time
(slowloris), stayed open for ever and a few hundred of them exhaust a server's descriptors. The
real server process here closes such connections once the timeout has passed, while a client
that sends its request normally on the same kind of connection is served.
"""

from __future__ import annotations

import http.client
import socket
import time

import pytest

pytestmark = pytest.mark.e2e
TIMEOUT_S = 1.0


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (recv returns b'' or resets) in time."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_and_trickling_connections_are_closed_a_normal_one_is_served(start_server):
    server = start_server(header_timeout_s=TIMEOUT_S, keep_alive_timeout_s=30)
    host, port = server.url.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    trickle = socket.create_connection((host, int(port)))
    trickle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    started = time.monotonic()
    # Both are closed by the server, after the timeout and not before it.
    assert closed_within(silent, 20 * TIMEOUT_S) and closed_within(trickle, 20 * TIMEOUT_S)
    assert time.monotonic() - started >= TIMEOUT_S * 0.9
    # A client that sends its headers in time is served, even when it is slower than the
    # timeout overall (an idle keep-alive connection answers within the keep-alive timeout).
    normal = http.client.HTTPConnection(host, int(port), timeout=10)
    normal.request("GET", "/v2/health/live")
    assert normal.getresponse().read() and normal.sock is not None
    first = normal.sock
    time.sleep(2 * TIMEOUT_S)  # past the header timeout: the kept-alive connection stays open
    normal.request("GET", "/v2/health/live")
    response = normal.getresponse()
    assert response.status == 200 and response.read()
    assert normal.sock is first  # the same connection, not a reconnect
    for sock in (silent, trickle):
        sock.close()
    normal.close()
