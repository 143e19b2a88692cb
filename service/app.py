"""`create_app(settings)`: the FastAPI application, its lifespan and its error handling.

Sessions load in the lifespan, never at import. Errors: a `BnfoldError` answers its own status
(and headers, such as Retry-After); request validation and routing errors answer 4xx; anything
else is logged with its traceback and answered 500. Every error body is {"error": "..."}.
The outermost middleware gives every request an id, an access log line and its metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from bnfold.errors import BnfoldError, validation_message
from service.api import operations, page, repository, v1, v2
from service.api.access import AccessMiddleware
from service.api.fastpath import FastPath
from service.api.middleware import BodyLimitMiddleware, InternalErrorMiddleware, error_response
from service.api.openapi import install_docs, install_openapi
from service.config import Settings
from service.dataplane import Runner
from service.errors import MAX_SHOWN, wire_error
from service.metadata import server_version
from service.process import Core

DESCRIPTION = """
Serves batch-normalized CNNs whose BatchNorm layers were folded into the weights, next to the
unfolded originals, so the two can be compared live.

* **/v2**: the Open Inference Protocol (KServe V2), JSON and binary tensors (`tritonclient` works).
* **/v1**: image predictions, model details, and folded-vs-unfolded equivalence.

Every error answers `{"error": "..."}`: 400 bad input, 401/403 missing or wrong admin token,
404 unknown model, 413 over a limit, 415 wrong Content-Type or image format, 503 not ready, busy
or shutting down (with `Retry-After` when busy), 504 past the request timeout. Every response
carries `X-Request-ID`. The same API is served over gRPC (`inference.GRPCInferenceService`, port
8001 by default).

Operations: `GET /metrics` (Prometheus); the model repository extension (`/v2/repository/...`:
index, load, unload; load and unload, like `POST /v1/models/{model}/reload`, need
`Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`).
"""


def create_app(
    settings: Settings | None = None, runner: Runner | None = None, core: Core | None = None
) -> FastAPI:
    """The REST application over `core` (built here when not given; `runner` replaces how
    batches reach sessions, default batching). The lifespan loads the bundles."""
    core = core or Core.build(settings or Settings(), runner)  # ready answers 503 until started
    settings = core.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await core.start()
        try:
            yield
        finally:
            await core.aclose()

    app = FastAPI(
        title="bnfold",
        version=server_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # install_docs serves /docs from local assets, not a CDN
        redoc_url=None,
    )
    app.state.core = core
    app.include_router(v2.router)
    app.include_router(v1.router)
    app.include_router(repository.router)
    app.include_router(operations.router)
    app.include_router(page.router)
    _add_error_handlers(app)
    app.add_middleware(FastPath, routes=[*v2.router.routes, *v1.router.routes])  # innermost
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(AccessMiddleware, core=core)  # added last: outermost
    install_openapi(app)
    install_docs(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BnfoldError, _bnfold_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)


async def _bnfold_error(request: Request, exc: Exception) -> JSONResponse:
    """Every data-plane error, through the one table REST and gRPC share."""
    assert isinstance(exc, BnfoldError)
    wire = wire_error(exc)
    return error_response(wire.http_status, wire.message, wire.headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, f"invalid request: {validation_message(list(exc.errors()))}")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        path = request.url.path
        if len(path) > MAX_SHOWN:  # a 50 KB unknown path is not echoed whole
            path = f"{path[:MAX_SHOWN]}... ({len(path)} characters)"
        message = f"no route {request.method} {path}; the API is listed at /docs"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    return error_response(exc.status_code, message, exc.headers)
