"""The Open Inference Protocol (KServe V2) REST endpoints, with the binary tensor extension.

`tritonclient.http` works against these with its defaults (binary inputs and outputs) and with
`binary_data=False` (JSON). The variant to run is chosen by the request's
`parameters.variant` ('folded' by default).
"""

from __future__ import annotations

from fastapi import APIRouter, Header, Request, Response

from service import metadata, v2codec
from service.api.bodies import read_json_or_binary
from service.api.openapi import BINARY, errors, request_body
from service.api.state import ModelName, ModelVersion, get_core
from service.errors import ServiceUnavailable
from service.schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from service.v2codec import HEADER_LENGTH

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])


@router.get("/health/live", response_model=ServerLive)
async def live() -> ServerLive:
    """200 while the process runs."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses=errors(503))
async def ready(request: Request) -> ServerReady:
    """200 once every bundle loaded and verified; 503 with the reason until then."""
    reason = get_core(request).not_ready_reason()
    if reason:
        raise ServiceUnavailable(f"not ready: {reason}")
    return ServerReady(ready=True)


# Load balancers often probe with HEAD; same answers, kept out of the OpenAPI schema.
router.add_api_route("/health/live", live, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/health/ready", ready, methods=["HEAD"], include_in_schema=False)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return metadata.server_metadata("rest")


# Before /models/{model}: 'stats' is this route, not a model's metadata.
@router.get("/models/stats", response_model=dict)
async def all_model_statistics(request: Request) -> dict:
    """The statistics extension for every ready model: counts and times, this process's."""
    core = get_core(request)
    return core.plane.statistics.answer(core.registry)


@router.get("/models/{model}/stats", response_model=dict, responses=errors(404, 503))
async def model_statistics(model: ModelName, request: Request) -> dict:
    """Inference and execution counts, success/fail, queue and compute times (Triton's
    statistics extension), kept by this server process."""
    core = get_core(request)
    return core.plane.statistics.answer(core.registry, model)


@router.get(
    "/models/{model}/versions/{version}/stats", response_model=dict, responses=errors(404, 503)
)
async def model_version_statistics(
    model: ModelName, version: ModelVersion, request: Request
) -> dict:
    core = get_core(request)
    return core.plane.statistics.answer(core.registry, model, version)


@router.get("/models/{model}/config", response_model=dict, responses=errors(404, 503))
async def model_config(model: ModelName, request: Request) -> dict:
    """The model's configuration as Triton reports it (the model configuration extension)."""
    core = get_core(request)
    return metadata.model_config(core.registry.get_ready(model), core.settings)


@router.get(
    "/models/{model}/versions/{version}/config", response_model=dict, responses=errors(404, 503)
)
async def model_version_config(model: ModelName, version: ModelVersion, request: Request) -> dict:
    core = get_core(request)
    return metadata.model_config(core.registry.get_ready(model, version), core.settings)


@router.get("/models/{model}", response_model=ModelMetadata, responses=errors(404, 503))
async def model_metadata(model: ModelName, request: Request) -> ModelMetadata:
    return metadata.model_metadata(get_core(request).registry.get_ready(model))


@router.get(
    "/models/{model}/versions/{version}", response_model=ModelMetadata, responses=errors(404, 503)
)
async def model_version_metadata(
    model: ModelName, version: ModelVersion, request: Request
) -> ModelMetadata:
    return metadata.model_metadata(get_core(request).registry.get_ready(model, version))


@router.get("/models/{model}/ready", response_model=ModelReady, responses=errors(404, 503))
async def model_ready(model: ModelName, request: Request) -> ModelReady:
    """200 when the model can answer; 503 with its load failure when it cannot."""
    get_core(request).registry.get_ready(model)
    return ModelReady(name=model, ready=True)


@router.get(
    "/models/{model}/versions/{version}/ready",
    response_model=ModelReady,
    responses=errors(404, 503),
)
async def model_version_ready(
    model: ModelName, version: ModelVersion, request: Request
) -> ModelReady:
    get_core(request).registry.get_ready(model, version)
    return ModelReady(name=model, ready=True)


INFER_DOC = {
    "responses": {
        200: {
            "model": InferenceResponse,
            "content": {"application/octet-stream": {"schema": BINARY}},
            "description": "JSON, or with binary outputs: JSON header + raw little-endian "
            "tensors, its length in the Inference-Header-Content-Length response header.",
        },
        **errors(400, 404, 413, 415, 503, 504),
    },
    "openapi_extra": request_body(
        {"application/json": InferenceRequest, "application/octet-stream": BINARY},
        "JSON tensors, or the binary tensor extension: JSON header, then raw tensors.",
    ),
}
HeaderLength = Header(
    None, alias=HEADER_LENGTH, ge=1, description="Byte length of the JSON header (binary bodies)."
)


@router.post("/models/{model}/infer", **INFER_DOC)
async def infer(model: ModelName, request: Request, header_length: int | None = HeaderLength):
    """Run the model on V2 tensors; `parameters.variant` picks folded (default) or unfolded."""
    return await infer_response(request, model, None, header_length)


@router.post("/models/{model}/versions/{version}/infer", **INFER_DOC)
async def infer_version(
    model: ModelName,
    version: ModelVersion,
    request: Request,
    header_length: int | None = HeaderLength,
):
    return await infer_response(request, model, version, header_length)


async def infer_response(
    request: Request, name: str, version: str | None, header_length: int | None
) -> Response:
    """The answer to a V2 infer call (the routes' and service/api/fastpath.py's)."""
    core = get_core(request)
    async with core.admission.admit(name, version) as model:
        body = await read_json_or_binary(request)
        call = await core.threads.offload(
            v2codec.decode, body, header_length, name, version, nbytes=len(body)
        )
        answer = await core.plane.infer(model, call)
    content, json_length = v2codec.encode(answer, call)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(json_length)},
    )
