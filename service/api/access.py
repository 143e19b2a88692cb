"""The outermost middleware: a request id, one access line, metrics (service/calls.py).

Pure ASGI like the guards in middleware.py, so it sees every answer, the 413s and 500s those
guards send included, and adds the X-Request-ID header to each.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.calls import CallLog
from service.process import Core

REQUEST_ID_HEADER = b"x-request-id"
# Status recorded for a request that got no answer: cut off by the drain timeout, or its client
# went away mid-body (or broke the chunk framing): the client's doing, never counted as a 500.
CANCELLED = 499
MAX_LOGGED_PATH = 256  # characters of a request's path an access line repeats
log = logging.getLogger(__name__)


def printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped (a newline as '\\n'):
    a client's percent-encoded path must not start a forged line in a text log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def clipped(text: str, limit: int = MAX_LOGGED_PATH) -> str:
    """`text` cut after `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def incoming_request_id(scope: Scope) -> str | None:
    """The client's X-Request-ID header, if it sent one."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return value.decode("latin-1")
    return None


class AccessMiddleware:
    """Every HTTP request recorded as a call (service/calls.py: its id, metrics and access
    line), and its id sent back in the X-Request-ID header of whatever answers it."""

    def __init__(self, app: ASGIApp, core: Core) -> None:
        self.app = app
        self.calls: CallLog = core.calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        call = self.calls.begin(incoming_request_id(scope))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER, call.id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        except ClientDisconnect:
            status = CANCELLED
            log.info("client disconnected before its request body arrived")
        finally:
            self._end(call, scope, status)

    def _end(self, call, scope: Scope, status: int) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        model = scope.get("path_params", {}).get("model", "")

        def describe() -> tuple[str, dict[str, object]]:
            client = scope.get("client")
            fields = {"method": scope["method"], "path": clipped(scope["path"]),
                      "endpoint": endpoint, "client": client[0] if client else None}  # fmt: skip
            return f"{scope['method']} {printable(clipped(scope['path']))}", fields

        self.calls.end(call, "rest", endpoint, model, status, describe)
