"""bnfold's own API: model listing and details, image predictions, folded-vs-unfolded checks."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from bnfold.bundle import EquivalenceReport
from bnfold.toolchain.sessions import GRAPH_OPT
from service import v2codec
from service.api.bodies import JSON_TYPE, media_type, read_json_or_binary, read_uploads
from service.api.openapi import IMAGE_BODY, errors, request_body
from service.api.repository import ADMIN_ERRORS, check_admin
from service.api.state import ModelName, get_core
from service.registry import LoadedModel
from service.request import InferRequest
from service.schemas import (
    CompareResponse,
    FoldSummary,
    InferenceRequest,
    ModelDetail,
    ModelFile,
    ModelList,
    ModelSummary,
    PredictResponse,
    VariantEngine,
)

router = APIRouter(prefix="/v1", tags=["bnfold"])

VARIANT = "folded"  # the variant a request gets when it names none
TOP_K, MAX_TOP_K = 3, 1000  # classes ranked when the request does not say, and at most
VariantQuery = Query(
    VARIANT,
    description="A variant the bundle holds: 'folded' (served), 'unfolded' (BN executed), "
    "'int8' (quantized from folded, when the bundle has it), 'bf16' (folded computed in "
    "bfloat16, on a CPU that computes it natively), or another file it lists "
    "(GET /v1/models/{model}).",
)
TopK = Query(
    TOP_K, ge=1, le=MAX_TOP_K, description="How many classes to rank (clamped to the classes)."
)


def _summary(model: LoadedModel) -> dict:
    m = model.manifest
    return {
        "name": model.name,
        "version": model.version,
        "status": "ready" if model.ready else "failed",
        "error": model.error,
        "classes": m.classes if m else None,
        "variants": model.variants,
        "variant_errors": model.variant_errors,
    }


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Every bundle found, with its status and, for a failed one, the reason."""
    models = get_core(request).registry.models.values()
    return ModelList(models=[ModelSummary(**_summary(m)) for m in models])


@router.get("/models/{model}", response_model=ModelDetail, responses=errors(404))
async def model_detail(model: ModelName, request: Request) -> ModelDetail:
    """The manifest a client needs: classes, input spec, provider, fold summary, checksums."""
    loaded = get_core(request).registry.get(model)
    m = loaded.manifest
    if m is None:  # bundle.json itself was unreadable: only the status and reason are known
        return ModelDetail(**_summary(loaded))
    return ModelDetail(
        **_summary(loaded),
        created=m.created,
        input=m.input,
        output=m.output,
        providers=loaded.providers,
        files={v: ModelFile(**f.model_dump(), graph_optimization=GRAPH_OPT[v].name)
               for v, f in m.files.items()},
        fold_summary=FoldSummary(folded=sum(r.folded for r in m.fold_report),
                                 refused=sum(not r.folded for r in m.fold_report),
                                 layers=m.fold_report),
        equivalence_passed=m.equivalence.passed,
        per_layer_available=loaded.ready and loaded.probe_error is None,
        per_layer_note=loaded.probe_error,
        versions=m.versions,
        training=m.training,
        imported=m.imported,
        engines={v: VariantEngine(engine=e.engine, precision=e.precision,
                                  cpu_features=list(e.cpu_features))
                 for v, e in loaded.engines.items()},
        unavailable_variants=loaded.unavailable,
        bn_statistics=m.bn_statistics,
        recalibration=m.recalibration,
    )  # fmt: skip


@router.get(
    "/models/{model}/equivalence", response_model=EquivalenceReport, responses=errors(404, 503)
)
async def equivalence(model: ModelName, request: Request) -> EquivalenceReport:
    """Folded vs unfolded (and each vs float64) as measured at export, from the manifest."""
    manifest = get_core(request).registry.get_ready(model).manifest
    assert manifest is not None  # a ready model has one
    return manifest.equivalence


@router.post(
    "/models/{model}/predict",
    response_model=PredictResponse,
    responses=errors(400, 404, 413, 415, 503, 504),
    openapi_extra=request_body(IMAGE_BODY, "One or more images (multipart), or one raw image."),
)
async def predict(
    model: ModelName, request: Request, variant: str = VariantQuery, top_k: int = TopK
) -> Response:
    """Classify images; `predictions` come in request order."""
    return await predict_response(request, model, variant, top_k)


async def predict_response(request: Request, model: str, variant: str, top_k: int) -> Response:
    """The answer to a predict call (the route's and service/api/fastpath.py's)."""
    core = get_core(request)
    async with core.admission.admit(model) as loaded:
        loaded.check_variant(variant)  # before reading the body
        limit = core.settings.max_images_per_request
        uploads = await read_uploads(request, limit, core.threads)
        call = InferRequest(model, variant=variant, uploads=uploads)
        answer = await core.plane.predict(loaded, call, top_k)
    # Serialized here: FastAPI would validate the model it was just built from once more.
    return Response(answer.model_dump_json(), media_type="application/json")


COMPARE_BODY = {**IMAGE_BODY, JSON_TYPE: InferenceRequest}


@router.post(
    "/models/{model}/compare",
    response_model=CompareResponse,
    responses=errors(400, 404, 413, 415, 503, 504),
    openapi_extra=request_body(COMPARE_BODY, "Images as for predict, or a V2 JSON tensor."),
)
async def compare(model: ModelName, request: Request, top_k: int = TopK) -> CompareResponse:
    """Run folded and unfolded now on the same inputs; diff logits and per-layer outputs."""
    core = get_core(request)
    async with core.admission.admit(model) as loaded:
        if media_type(request) == JSON_TYPE:
            body = await read_json_or_binary(request)
            call = await core.threads.offload(v2codec.decode, body, None, model, nbytes=len(body))
        else:
            also = "; or a V2 JSON tensor with Content-Type application/json"
            limit = core.settings.max_images_per_request
            uploads = await read_uploads(request, limit, core.threads, also)
            call = InferRequest(model, uploads=uploads)
        return await core.plane.compare(loaded, call, top_k)


@router.post(
    "/models/{model}/reload",
    response_model=ModelSummary,
    responses={**errors(400, 404), **ADMIN_ERRORS},
)
async def reload(model: ModelName, request: Request) -> ModelSummary:
    """POST /v2/repository/models/{model}/load for a model already served: re-verify the
    bundle's files and swap the new sessions in; a bundle that fails verification is not served
    (400) and the version loaded before stays. Needs the admin token."""
    check_admin(request)
    loaded = await get_core(request).registry.reload(model)
    return ModelSummary(**_summary(loaded))
