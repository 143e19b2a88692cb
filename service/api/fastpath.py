"""The hot routes without FastAPI's routing and dependency machinery: V2 infer and predict.

Under load the REST worker's event loop is the bottleneck, and a third of its time per call went
to FastAPI and Starlette between our guards and the endpoint (route matching over every route,
the exception and exit-stack middlewares, parameter solving). This pure-ASGI layer sits inside
our guards (body limits, access record, last-resort 500) and answers
`POST /v2/models/{model}[/versions/{version}]/infer` and `POST /v1/models/{model}/predict`
itself, through the same `v2.infer_response` and `v1.predict_response` and the same error
table as the routes. Anything it is not sure of (another path or method, a malformed or
repeated Inference-Header-Content-Length, a predict query string other than plain `variant`
and `top_k`, each at most once) goes to the app, whose route answers it, error messages
included, exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from bnfold.errors import BnfoldError
from service.api import v1, v2
from service.api.middleware import error_response
from service.errors import wire_error
from service.v2codec import HEADER_LENGTH, plain_length

INFER = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
PREDICT = re.compile(r"/v1/models/(?P<model>[^/]+)/predict")
HEADER = HEADER_LENGTH.lower().encode("latin-1")


class FastPath:
    """Answers V2 infer and predict calls itself; everything else (and anything unusual) to
    `app`."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        by_path = {getattr(r, "path", None): r for r in routes}
        self.infer_routes = {
            False: by_path["/v2/models/{model}/infer"],
            True: by_path["/v2/models/{model}/versions/{version}/infer"],
        }
        self.predict_route = by_path["/v1/models/{model}/predict"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        match = INFER.fullmatch(path)
        if match is not None:
            return await self._infer(match, scope, receive, send)
        match = PREDICT.fullmatch(path)
        if match is not None:
            return await self._predict(match, scope, receive, send)
        return await self.app(scope, receive, send)

    async def _infer(self, match: re.Match, scope: Scope, receive: Receive, send: Send) -> None:
        values = [v for k, v in scope["headers"] if k == HEADER]
        if len(values) > 1 or (values and not _positive_int(values[0])):
            return await self.app(scope, receive, send)  # the route's validation answers
        header_length = int(values[0]) if values else None
        name, version = match["model"], match["version"]
        params = {"model": name, **({"version": version} if version else {})}
        await _answer(
            scope, receive, send, self.infer_routes[version is not None], params,
            lambda request: v2.infer_response(request, name, version, header_length),
        )  # fmt: skip

    async def _predict(self, match: re.Match, scope: Scope, receive: Receive, send: Send) -> None:
        query = _predict_query(scope["query_string"])
        if query is None:
            return await self.app(scope, receive, send)  # the route's validation answers
        name, (variant, top_k) = match["model"], query
        await _answer(
            scope, receive, send, self.predict_route, {"model": name},
            lambda request: v1.predict_response(request, name, variant, top_k),
        )  # fmt: skip


async def _answer(
    scope: Scope,
    receive: Receive,
    send: Send,
    route: BaseRoute,
    params: dict[str, str],
    respond: Callable[[Request], Awaitable[Response]],
) -> None:
    """The endpoint's answer, or its error as the app's handler for it would answer."""
    scope["route"] = route  # what the access record names
    scope["path_params"] = params
    try:
        response = await respond(Request(scope, receive))
    except BnfoldError as exc:  # the app's handler for these, the same table
        wire = wire_error(exc)
        response = error_response(wire.http_status, wire.message, wire.headers or None)
    await response(scope, receive, send)


def _positive_int(value: bytes) -> bool:
    """What the route's `int, ge=1` header accepts, restricted to plain lengths (longer or
    odder ones go to the route, whose validation answers 400)."""
    length = plain_length(value)
    return length is not None and length >= 1


def _predict_query(raw: bytes) -> tuple[str, int] | None:
    """(variant, top_k) when the query string (read as Starlette reads it) names at most
    `variant` and a `top_k` of plain digits within the route's bounds, each once; else None."""
    given: dict[str, str] = {}
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key not in ("variant", "top_k") or key in given:
            return None
        given[key] = value
    text = given.get("top_k", str(v1.TOP_K))
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(v1.MAX_TOP_K))):
        return None
    top_k = int(text)
    if not 1 <= top_k <= v1.MAX_TOP_K:
        return None
    return given.get("variant", v1.VARIANT), top_k
