"""The outermost middleware: a request id, one access line, metrics.

Pure ASGI like the guards in middleware.py, so it sees every answer, the 413s and 500s those
guards send included, and adds the X-Request-ID header to each.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import Core
from service.logs import request_id, request_id_for

REQUEST_ID_HEADER = b"x-request-id"
CANCELLED = 499  # status recorded for a request cut off by the drain timeout (no answer sent)

access_log = logging.getLogger("service.access")


def printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped (a newline as '\\n'):
    a client's percent-encoded path must not start a forged line in a text log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def choose_request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is sane, else a new random one."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return request_id_for(value.decode("latin-1"))
    return request_id_for(None)


class AccessMiddleware:
    """Every HTTP request: its id (header and logs), the access line and the request
    metrics (count by endpoint/model/code, latency by endpoint, in flight)."""

    def __init__(self, app: ASGIApp, core: Core) -> None:
        self.app = app
        self.registry = core.registry
        self.metrics = core.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = choose_request_id(scope)
        token = request_id.set(rid)
        status, started = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        model = scope.get("path_params", {}).get("model", "")
        if model and model not in self.registry.models:
            model = "unknown"  # label values stay bounded whatever names clients send
        m = self.metrics
        m.child(m.requests, "rest", endpoint, model, str(status)).inc()
        m.child(m.request_seconds, "rest", endpoint).observe(seconds)
        if not access_log.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        fields = {
            "protocol": "rest",
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "endpoint": endpoint,
            "client": client[0] if client else None,
        }
        access_log.info(
            "%s %s %d %.1f ms", scope["method"], printable(scope["path"]), status, seconds * 1000,
            extra={"fields": fields},
        )  # fmt: skip
