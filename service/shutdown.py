"""The HTTP side of a graceful shutdown: every request on an accepted connection is answered.

uvicorn's own shutdown closes every connection that has no response in progress at the moment
it runs. A client that sent its request a moment before (still in the socket buffer, or headers
half parsed), or that reuses a keep-alive connection right after, sees the connection reset:
its request is lost. Here, instead:

- connections the kernel had already accepted, still waiting in the listen backlog, are taken
  in before the listening socket closes (`adopt_backlog`); only connections that arrive after
  it closes are refused;
- every request on an open connection is served to the end, slow bodies included, and its
  response carries `Connection: close` (uvicorn then closes the connection after it);
- a connection idle at SIGTERM may still bring one more request within the keep-alive timeout;
  it is closed once idle that long, as it would have been anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.v2codec import plain_length

log = logging.getLogger(__name__)
MAX_PIPELINED = 32  # requests of one connection waiting for their turn, past the running one
FEED_BYTES = 4096  # received bytes are parsed this many at a time, to stop at MAX_PIPELINED
CONNECTIONS_LOG_EVERY_S = 10.0  # the connection cap's log line, at most this often
MALFORMED = (
    "malformed HTTP request: the request line or a header could not be parsed; send HTTP/1.1 "
    "(RFC 9112)"
)


class PipelineFlowControl(FlowControl):
    """uvicorn's flow control for one connection, except that reading stays paused while the
    connection has `MAX_PIPELINED` requests waiting or received bytes not parsed yet.

    uvicorn resumes reading after every response, and parses everything a read brings: a client
    that pipelines requests without reading the answers had thousands of requests queued on its
    connection after each response (a worker grew by 760 MiB in 10 s). Here the requests
    waiting on a connection are bounded, then the kernel's buffers, then the client blocks."""

    def __init__(self, transport: asyncio.Transport, protocol: DrainingHttpProtocol) -> None:
        super().__init__(transport)
        self.protocol = protocol

    def resume_reading(self) -> None:
        if self.protocol.backlogged():
            self.protocol.feed_later()  # resumes reading once the held bytes are parsed
        else:
            super().resume_reading()


class DrainingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with `shutdown()` that finishes what the client sent, and a
    header timeout: a connection that sends no request, or whose headers do not complete within
    `header_timeout_s`, is closed (uvicorn has no such timer, so a slowloris client kept its
    connection forever). Also: bytes that are not HTTP get the API's JSON 400, not uvicorn's
    plain text; a client that half-closes its side after a whole request (shutdown(SHUT_WR),
    as `nc -N` does) is answered before the connection closes, where asyncio closed it; at most
    `MAX_PIPELINED` pipelined requests wait on one connection (`PipelineFlowControl`).

    At most `max_connections` connections are open in this worker (`ConnectionCap`): past it, a
    new connection takes the place of the longest idle one, or is answered 503 when none is
    idle; at the open-files limit the kernel's accept would otherwise fail, and the event loop
    dropped new connections unanswered and unlogged.

    uvicorn makes one per connection with its own arguments: `protocol_factory` binds
    `header_timeout_s` (BNFOLD_HEADER_TIMEOUT_S) and `cap`."""

    draining = False
    _partial = False  # a request has begun (bytes parsed) but its headers are not complete
    _header_timer: asyncio.TimerHandle | None = None
    _held = memoryview(b"")  # received, not parsed yet: parsing waits for the pipeline
    _body_left = 0  # bytes of the current request's body (Content-Length) not parsed yet
    _feed_scheduled = False
    idle_since = 0.0  # loop time of the last response completed (or of the connection)

    def __init__(
        self,
        *args: Any,
        header_timeout_s: float = 10.0,
        cap: ConnectionCap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.cap = cap

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = PipelineFlowControl(transport, self)
        self.idle_since = self.loop.time()
        if self.cap is not None and not self.cap.admit(self):
            return  # answered 503 and closed
        self._arm_header_timer()  # the first request's headers are due within the timeout

    def on_response_complete(self) -> None:
        self.idle_since = self.loop.time()
        super().on_response_complete()

    def refuse_busy(self, message: str) -> None:
        """Answer 503 before any request was read, and close."""
        self._answer_and_close(b"503 Service Unavailable", message, [b"retry-after: 1\r\n"])

    def _answer_and_close(self, status: bytes, message: str, extra: list[bytes]) -> None:
        """Write {"error": message} with `status` outside any request cycle, then close."""
        body = json.dumps({"error": message}).encode()
        head = [b"HTTP/1.1 " + status + b"\r\n"]
        head += [k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            *extra,
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._held = memoryview(b"")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        held = self._held
        self._held = memoryview(bytes(held) + data if held else data)
        self._feed()

    def backlogged(self) -> bool:
        """Too many requests waiting, or bytes held back: read nothing more for now."""
        return bool(self._held) or len(self.pipeline) >= MAX_PIPELINED

    def feed_later(self) -> None:
        """Parse the held bytes on the loop's next turn (not inside uvicorn's own callback)."""
        if not self._feed_scheduled:
            self._feed_scheduled = True
            self.loop.call_soon(self._feed, True)

    def _feed(self, resume: bool = False) -> None:
        """Parse the held bytes while fewer than `MAX_PIPELINED` requests wait; then pause
        reading if some are left, else (`resume`: uvicorn asked for it meanwhile) resume it."""
        self._feed_scheduled = False
        while self._held and len(self.pipeline) < MAX_PIPELINED:
            if self.parser is None or self.transport.is_closing():
                self._held = memoryview(b"")  # closed (or upgraded): nothing more to parse
                return
            # A body is parsed in one piece, up to its end: uvicorn adds each piece of it to
            # the bytes it holds for the app (`body += piece`, a copy of all it holds), so 4 KB
            # pieces copied a 1 MB body about 30 times over (2.3 ms); past the body, the next
            # requests are parsed FEED_BYTES at a time again, to stop at MAX_PIPELINED.
            size = max(FEED_BYTES, self._body_left)
            piece, self._held = self._held[:size], self._held[size:]
            super().data_received(piece)  # type: ignore[arg-type]
        if self.backlogged():
            self.flow.pause_reading()
        elif resume:
            FlowControl.resume_reading(self.flow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._partial = True
        self._body_left = 0
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._partial = False
        self._body_left = _content_length(self.headers)
        self._disarm_header_timer()
        if self.draining and self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def on_body(self, body: bytes) -> None:
        self._body_left = max(0, self._body_left - len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_left = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """The request line or a header could not be parsed: {"error"} like every other 4xx."""
        self._answer_and_close(b"400 Bad Request", MALFORMED, [])

    def eof_received(self) -> bool | None:
        """The client closed its sending side. With a whole request received and not yet
        answered, keep the connection open to write the answer, then close it (True); else
        close now (None: asyncio's default), which a request still missing its body sees as
        a disconnect. A client that closed both ways looks the same from here: its answer is
        computed as before (no route stops work on a disconnect) and written into a socket
        the kernel then resets."""
        if self._held:
            return True  # requests still to parse: answered, then closed when idle
        received = self.cycle is not None and not self.cycle.more_body
        if received and not self.cycle.response_complete and not self._partial:
            self.cycle.keep_alive = False  # closed once the response is written
            return True
        return None

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        """Nothing sent since the connection opened, or headers still incomplete: close it."""
        self._header_timer = None
        waiting = self.cycle is None or self._partial
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def idle(self) -> bool:
        """No request in progress: nothing parsed since the last response completed."""
        return (self.cycle is None or self.cycle.response_complete) and not self._partial

    def shutdown(self) -> None:
        """SIGTERM: the request in progress (or the next one) is the connection's last."""
        self.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif self.idle():  # a request may be on its way: give it the keep-alive timeout
            self.loop.call_later(self.timeout_keep_alive, self.close_if_idle)

    def close_if_idle(self) -> None:
        if self.idle() and not self.transport.is_closing():
            self.transport.close()

    def close_now(self) -> bool:
        """Drain timeout: close the connection; True when that cut a request off."""
        cut = not self.idle()
        if not self.transport.is_closing():
            self.transport.close()
        return cut


class ConnectionCap:
    """At most `limit` open HTTP connections in this worker, kept below the open-files limit.

    A connection past the cap closes the longest idle one (no request in progress: a client
    that sent nothing yet, or a kept-alive connection between requests) to take its place;
    when every connection has a request in progress, the new one is answered 503 and closed.
    Either is logged, at most once every CONNECTIONS_LOG_EVERY_S, with the counts since."""

    def __init__(self, limit: int, fd_limit: int | None = None) -> None:
        self.limit = limit
        self.fd_limit = fd_limit
        self.evicted = self.refused = 0
        self._logged_at = -CONNECTIONS_LOG_EVERY_S

    def admit(self, new: DrainingHttpProtocol) -> bool:
        connections = new.connections
        if len(connections) <= self.limit:
            return True
        oldest = None
        for other in connections:
            if other is new or not isinstance(other, DrainingHttpProtocol) or not other.idle():
                continue
            if other.transport.is_closing():
                continue
            if oldest is None or other.idle_since < oldest.idle_since:
                oldest = other
        if oldest is not None:
            oldest.transport.close()
            connections.discard(oldest)  # gone now for the count (connection_lost follows)
            self.evicted += 1
            self._log(len(connections))
            return True
        self.refused += 1
        self._log(len(connections))
        new.refuse_busy(
            f"server busy: {self.limit} connections open, each with a request in progress "
            "(BNFOLD_MAX_CONNECTIONS); retry later"
        )
        connections.discard(new)
        return False

    def _log(self, open_now: int) -> None:
        now = time.monotonic()
        if now - self._logged_at < CONNECTIONS_LOG_EVERY_S:
            return
        self._logged_at = now
        files = f", open-files limit {self.fd_limit}" if self.fd_limit else ""
        log.warning(
            "connection limit reached: %d open (BNFOLD_MAX_CONNECTIONS %d%s); so far %d idle "
            "connection(s) closed to make room and %d new one(s) answered 503",
            open_now,
            self.limit,
            files,
            self.evicted,
            self.refused,
        )


def adopt_backlog(servers: Iterable[asyncio.AbstractServer]) -> list[socket.socket]:
    """Accept every connection already waiting in the listen backlog (without blocking).

    The kernel completed these handshakes before the listener closed: their clients have sent,
    or are sending, a request. Call `serve_adopted` on the result after closing the servers.
    """
    accepted: list[socket.socket] = []
    for server in servers:
        for listener in server.sockets or ():
            # A duplicate of the listening descriptor, non-blocking, closed before the server
            # closes its own: otherwise the socket would go on listening.
            dup = socket.socket(fileno=os.dup(listener.fileno()))
            dup.setblocking(False)
            try:
                while True:
                    try:
                        conn, _ = dup.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    accepted.append(conn)
            finally:
                dup.close()
    return accepted


async def serve_adopted(
    accepted: list[socket.socket], factory: Callable[[], asyncio.Protocol]
) -> None:
    """Hand each adopted socket to a new protocol instance on this loop."""
    loop = asyncio.get_running_loop()
    for conn in accepted:
        try:
            await loop.connect_accepted_socket(factory, conn)
        except OSError as exc:  # the client gave up meanwhile
            log.debug("adopted connection lost: %s", exc)
            with contextlib.suppress(OSError):
                conn.close()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The request's Content-Length when it has exactly one of plain digits, else 0 (chunked,
    absent, or odd: the parser decides, and the body goes in FEED_BYTES pieces)."""
    values = [v for k, v in headers if k == b"content-length"]
    length = plain_length(values[0]) if len(values) == 1 else None
    return length or 0
