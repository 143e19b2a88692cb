"""V2 infer without FastAPI's routing and dependency machinery: the one hot route, direct.

Under load the REST worker's event loop is the bottleneck, and a third of its time per V2
infer call went to FastAPI and Starlette between our guards and the endpoint (route matching
over every route, the exception and exit-stack middlewares, parameter solving). This pure-ASGI
layer sits inside our guards (body limits, access record, last-resort 500) and answers a
`POST /v2/models/{model}[/versions/{version}]/infer` itself, through the same
`v2.infer_response` and the same error table as the route. Anything it is not sure of
(another path or method, a malformed or repeated Inference-Header-Content-Length) goes to the
app, whose route answers it, error messages included, exactly as before.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from bnfold.errors import BnfoldError
from service.api import v2
from service.api.middleware import error_response
from service.errors import wire_error
from service.v2codec import HEADER_LENGTH, plain_length

INFER = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
HEADER = HEADER_LENGTH.lower().encode("latin-1")


class V2InferFastPath:
    """Answers V2 infer calls itself; everything else (and anything unusual) to `app`."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        by_path = {getattr(r, "path", None): r for r in routes}
        self.routes = {
            False: by_path["/v2/models/{model}/infer"],
            True: by_path["/v2/models/{model}/versions/{version}/infer"],
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        values = [v for k, v in scope["headers"] if k == HEADER]
        if len(values) > 1 or (values and not _positive_int(values[0])):
            return await self.app(scope, receive, send)  # the route's validation answers
        header_length = int(values[0]) if values else None
        name, version = match["model"], match["version"]
        scope["route"] = self.routes[version is not None]  # what the access record names
        scope["path_params"] = {"model": name, **({"version": version} if version else {})}
        request = Request(scope, receive)
        try:
            response = await v2.infer_response(request, name, version, header_length)
        except BnfoldError as exc:  # the app's handler for these, the same table
            wire = wire_error(exc)
            response = error_response(wire.http_status, wire.message, wire.headers or None)
        await response(scope, receive, send)


def _positive_int(value: bytes) -> bool:
    """What the route's `int, ge=1` header accepts, restricted to plain lengths (longer or
    odder ones go to the route, whose validation answers 400)."""
    length = plain_length(value)
    return length is not None and length >= 1
