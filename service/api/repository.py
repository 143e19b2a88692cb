"""The Open Inference Protocol's model repository extension over REST, as Triton serves it.

`POST /v2/repository/index` lists the bundles (open, like GET /v1/models); `POST
/v2/repository/models/{m}/load` verifies a bundle written or changed on disk and swaps it in
(requests in flight finish on the old sessions); `.../unload` takes a model out of service.
Load and unload (and /v1/models/{m}/reload) need the admin token (service/admin.py).
tritonclient.http's get_model_repository_index, load_model and unload_model work against these.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from bnfold.errors import BadInput
from service.api.openapi import errors
from service.api.state import ModelName, get_core
from service.registry import check_load_parameters, check_repository
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v2/repository", tags=["Model repository"])
ADMIN_ERRORS = {
    401: {"model": ErrorResponse, "description": "No (or a malformed) Bearer admin token."},
    403: {
        "model": ErrorResponse,
        "description": "Wrong admin token, or admin calls are off (BNFOLD_ADMIN_TOKEN unset).",
    },  # fmt: skip
}


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    ready: bool = Field(False, description="Only the models that are ready.")
    repository_name: str = Field("", description="Empty: this server has one repository.")


class IndexRow(BaseModel):
    name: str
    version: str = Field(description="Empty for a bundle on disk that is not loaded.")
    state: str = Field(description="READY or UNAVAILABLE.")
    reason: str = Field(description="Why it is unavailable (load failure, or 'not loaded').")


class RepositoryChange(BaseModel):
    name: str
    state: str = Field(description="READY after a load, UNLOADED after an unload.")
    version: str | None = None


def check_admin(request: Request) -> None:
    get_core(request).admin.check(request.headers.get("authorization"))


@router.post("/index", response_model=list[IndexRow])
async def index(request: Request, body: IndexRequest | None = None) -> list[IndexRow]:
    """Every bundle in the models folder with its state; `{"ready": true}`: ready ones only."""
    check_repository(body.repository_name if body else "")
    rows = get_core(request).registry.index(ready_only=bool(body and body.ready))
    return [IndexRow(**vars(r)) for r in rows]


@router.post(
    "/models/{model}/load",
    response_model=RepositoryChange,
    responses={**errors(400, 404, 503), **ADMIN_ERRORS},
)
async def load(model: ModelName, request: Request) -> RepositoryChange:
    """Verify the bundle on disk, then serve it in place of the loaded one (if any); a bundle
    that fails verification is not served (400, the old version stays)."""
    check_admin(request)
    check_load_parameters(await _load_parameters(request))
    loaded = await get_core(request).registry.load(model)
    return RepositoryChange(name=model, state="READY", version=loaded.version)


@router.post(
    "/models/{model}/unload",
    response_model=RepositoryChange,
    responses={**errors(404), **ADMIN_ERRORS},
)
async def unload(model: ModelName, request: Request) -> RepositoryChange:
    """Stop serving the model (requests already admitted finish); load brings it back."""
    check_admin(request)
    get_core(request).registry.unload(model)
    return RepositoryChange(name=model, state="UNLOADED")


async def _load_parameters(request: Request) -> list[str]:
    """The names in the body's `parameters` ({} or none: no body). Read whatever the
    Content-Type: tritonclient.http sends its JSON without one."""
    raw = await request.body()
    if not raw.strip():
        return []
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's recursion limit
        body = None
    parameters = body.get("parameters") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(parameters or {}, dict):
        raise BadInput('the load request body must be JSON: {} or {"parameters": {...}}')
    return list(parameters or {})
