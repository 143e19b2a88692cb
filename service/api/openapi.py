"""OpenAPI for routes that read their own bodies (binary tensors, raw images, multipart).

FastAPI documents only bodies it parses itself; these routes parse by Content-Type, so their
request bodies are declared here and the models they reference are added to the components.
Validation errors answer 400 {"error"} here, so FastAPI's default 422 entries are removed.
`/docs` (Swagger UI) loads its JavaScript and CSS from this server, taken from the fastapi-offline
distribution, so it works offline, in air-gapped clusters and under a strict CSP. (No ReDoc page:
ReDoc fetches its logo from its own CDN whatever the options.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.schemas import ErrorResponse

_BODY_MODELS: list[type[BaseModel]] = []

BINARY = {"type": "string", "format": "binary"}
MULTIPART = {
    "type": "object",
    "properties": {"files": {"type": "array", "items": BINARY, "description": "Image files."}},
    "required": ["files"],
}
IMAGE_BODY = {
    "multipart/form-data": MULTIPART,
    "image/png": BINARY,
    "image/jpeg": BINARY,
    "application/octet-stream": BINARY,
}
ERROR_TEXT = {
    400: "Bad input: undecodable image, wrong tensor, malformed JSON, bad parameter.",
    404: "Unknown model, version or route.",
    413: "Body, image or image count over a configured limit.",
    415: "Unsupported Content-Type or image format.",
    503: "Not ready (still loading, the bundle failed to load, or shutting down: the reason "
    "is given), or busy: the model's queue is full (see the Retry-After header).",
    504: "Not answered within the request timeout; the queued work was dropped.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries documenting {"error"} bodies for these status codes."""
    return {code: {"model": ErrorResponse, "description": ERROR_TEXT[code]} for code in codes}


def request_body(content: dict[str, type[BaseModel] | dict], description: str) -> dict:
    """`openapi_extra=` declaring a body by media type: a pydantic model or a raw schema."""
    spec = {}
    for media, schema in content.items():
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            if schema not in _BODY_MODELS:
                _BODY_MODELS.append(schema)
            schema = {"$ref": f"#/components/schemas/{schema.__name__}"}
        spec[media] = {"schema": schema}
    return {"requestBody": {"required": True, "description": description, "content": spec}}


def install_openapi(app: FastAPI) -> None:
    """Replace app.openapi with a generator that adds the declared body models."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema(
            [(m, "validation") for m in _BODY_MODELS], ref_template="#/components/schemas/{model}"
        )
        components.update(defs.get("$defs", {}))
        _drop_default_422(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_default_422(schema: dict[str, Any]) -> None:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


DOCS_ASSETS = "/docs-assets"  # swagger-ui-bundle.js, swagger-ui.css, favicon.png


def install_docs(app: FastAPI) -> None:
    """/docs with its assets served from the installed package, no CDN."""
    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )
