"""Two pure-ASGI guards around the app: the request body's limits and the last-resort 500.

Pure ASGI, not BaseHTTPMiddleware, so the body stream passes through untouched and can be
counted as it arrives.
"""

from __future__ import annotations

import json
import logging
import time

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bnfold.errors import PayloadTooLarge
from service.api.access import clipped, printable
from service.config import Settings

log = logging.getLogger(__name__)
TIMEOUT = 408  # a body that did not arrive at the minimum rate


async def send_json(
    send: Send, status: int, body: dict, extra_headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error the app answers: {"error": message} (the handlers' and the fast path's)."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def too_large(limit: int, size: str) -> str:
    return f"request body is {size}, over the limit of {limit} bytes (BNFOLD_MAX_BODY_BYTES)"


CLOSE = {"Connection": "close"}  # the rest of the body is not read: the connection ends


class BodyLimitMiddleware:
    """A request's body, read whole before the app sees the request, so a request takes a
    model's queue slot (service/admission.py) only once its body has arrived:

    - 413 for a body over `limit` bytes: on Content-Length up front, then on the bytes that
      actually arrive (chunked uploads, or a Content-Length that lies), without reading more;
    - 408 for a body slower than BNFOLD_MIN_BODY_RATE_BYTES_S after BNFOLD_BODY_GRACE_S (one
      body byte every 2 s held a queue slot for the whole request timeout);
    - 503 with Retry-After when the bodies being received in this worker would pass
      BNFOLD_MAX_PENDING_BODY_BYTES (reading before admission must not lift the memory bound
      the queue gave);
    - a client that disconnects mid-body (or breaks the chunk framing) raises
      `ClientDisconnect`, which the access middleware records as 499, not as a server error.

    Each of these answers closes the connection. The settings are the app's (its core's);
    `limit` is the body limit the app was built with."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.pending = 0  # bytes of bodies being received now, not yet handed to the app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            message = too_large(self.limit, f"{declared} bytes")
            return await send_json(send, 413, {"error": message}, CLOSE)
        if not declared and not _chunked(scope):  # no body: nothing to wait for
            return await self.app(scope, self._counting(receive), send)
        settings = _settings(scope)
        budget = settings.max_pending_body_bytes or settings.max_queue_size * self.limit
        if declared is not None and self.pending + declared > budget:
            retry = {"Retry-After": str(settings.retry_after_s), **CLOSE}
            return await send_json(send, 503, {"error": _busy(budget, settings)}, retry)
        reserved = declared or 0
        self.pending += reserved
        try:
            body = await self._read(receive, settings, budget, reserved)
        except _Refused as refused:
            return await send_json(send, refused.status, {"error": refused.message},
                                   {**refused.headers, **CLOSE})  # fmt: skip
        finally:
            self.pending -= reserved
        await self.app(scope, _replay(body, receive), send)

    async def _read(
        self, receive: Receive, settings: Settings, budget: int, reserved: int
    ) -> bytes:
        """The whole body, at the minimum rate, within the limits (`reserved` bytes of the
        pending budget are already this body's)."""
        rate, grace = settings.min_body_rate_bytes_s, settings.body_grace_s
        started = time.monotonic()
        chunks: list[bytes] = []
        received = extra = 0
        try:
            while True:
                wait = started + grace + received / rate - time.monotonic()
                with anyio.move_on_after(max(wait, 0.0)) as timer:
                    message = await receive()
                if timer.cancelled_caught:
                    raise _Refused(TIMEOUT, _too_slow(received, time.monotonic() - started,
                                                      settings))  # fmt: skip
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.limit:
                    raise _Refused(413, too_large(self.limit, f"more than {self.limit} bytes"))
                if received > reserved + extra:  # chunked, or more than declared
                    grow = received - reserved - extra
                    if self.pending + grow > budget:
                        raise _Refused(503, _busy(budget, settings),
                                       {"Retry-After": str(settings.retry_after_s)})  # fmt: skip
                    self.pending += grow
                    extra += grow
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.pending -= extra

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised inside the route: its handler answers 413
                raise PayloadTooLarge(too_large(self.limit, f"more than {self.limit} bytes"))
            return message

        return counting_receive


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the connection's own messages (a disconnect)."""
    sent = False

    async def replaying_receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying_receive


def _settings(scope: Scope) -> Settings:
    app = scope.get("app")
    core = getattr(getattr(app, "state", None), "core", None)
    return core.settings if core is not None else Settings()


def _too_slow(received: int, seconds: float, settings: Settings) -> str:
    return (
        f"request body too slow: {received} bytes in {seconds:.1f} s, under the minimum of "
        f"{settings.min_body_rate_bytes_s} bytes/s after {settings.body_grace_s:g} s "
        "(BNFOLD_MIN_BODY_RATE_BYTES_S); send the whole body at once"
    )


def _busy(budget: int, settings: Settings) -> str:
    return (
        f"server busy receiving request bodies ({budget} bytes at once, "
        f"BNFOLD_MAX_PENDING_BODY_BYTES); retry after {settings.retry_after_s} s"
    )


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class InternalErrorMiddleware:
    """Anything no handler claimed: log the traceback, answer a plain 500 {"error"}."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:  # the client's doing: recorded as 499 (access.py), no trace
            raise
        except Exception:
            path = printable(clipped(scope.get("path", "")))
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            if started:  # too late for a clean answer; the server closes the connection
                raise
            await send_json(send, 500, {"error": "internal server error"})
