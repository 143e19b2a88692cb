"""Two pure-ASGI guards around the app: the body-size limit and the last-resort 500.

Pure ASGI, not BaseHTTPMiddleware, so the body stream passes through untouched and can be
counted as it arrives.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bnfold.errors import PayloadTooLarge
from service.api.access import printable

log = logging.getLogger(__name__)


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


def too_large(limit: int, size: str) -> str:
    return f"request body is {size}, over the limit of {limit} bytes (BNFOLD_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """413 for bodies over `limit` bytes: on Content-Length up front, then on the bytes that
    actually arrive (chunked uploads, or a Content-Length that lies)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            message = too_large(self.limit, f"{declared} bytes")
            return await send_json(send, 413, {"error": message})
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised inside the route: its handler answers 413
                raise PayloadTooLarge(too_large(self.limit, f"more than {self.limit} bytes"))
            return message

        await self.app(scope, counting_receive, send)


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
        except Exception:
            path = printable(scope.get("path", ""))
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            if started:  # too late for a clean answer; the server closes the connection
                raise
            await send_json(send, 500, {"error": "internal server error"})
