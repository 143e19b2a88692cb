"""What the server says about itself and its models, the same over REST and gRPC: name,
version, extensions, platform, each model's tensors, and each model's configuration as Triton
reports it (the model configuration extension). Each protocol only encodes these."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from service.schemas import ModelMetadata, ServerMetadata, TensorMetadata

if TYPE_CHECKING:
    from service.config import Settings
    from service.registry import LoadedModel

SERVER_NAME = "bnfold"
PLATFORM = "onnxruntime_onnx"  # the Open Inference Protocol's platform name for ONNX models
MODEL_REPOSITORY = "model_repository"
# Triton's names. The binary tensor data extension is REST's; gRPC carries raw tensors anyway.
SHARED = [MODEL_REPOSITORY, "classification", "statistics", "model_configuration"]
EXTENSIONS = {"rest": ["binary_tensor_data", *SHARED], "grpc": SHARED}
BACKEND = "onnxruntime"
CONFIG_TYPES = {"FP32": "TYPE_FP32"}  # V2 datatype -> Triton's model configuration DataType


def server_version() -> str:
    try:
        return version("bnfold")
    except PackageNotFoundError:
        return "0.0.0"


def server_metadata(protocol: str) -> ServerMetadata:
    """The server's name, version and the extensions `protocol` ('rest', 'grpc') serves."""
    return ServerMetadata(name=SERVER_NAME, version=server_version(),
                          extensions=EXTENSIONS[protocol])  # fmt: skip


def model_metadata(model: LoadedModel) -> ModelMetadata:
    """A ready model's name, version, platform and its input and output tensors."""
    m = model.manifest
    assert m is not None
    return ModelMetadata(
        name=model.name,
        versions=[m.version],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=m.input.name, datatype=m.input.datatype, shape=m.input.shape)],
        outputs=[TensorMetadata(name=m.output.name, datatype=m.output.datatype,
                                shape=m.output.shape)],
    )  # fmt: skip


def model_config(model: LoadedModel, settings: Settings) -> dict:
    """A ready model's configuration as Triton's GET /v2/models/{model}/config answers it (and,
    through the same dict, gRPC's ModelConfig): the largest batch one request may carry
    (max_batch_size: BNFOLD_MAX_IMAGES_PER_REQUEST), the tensors without their batch dimension,
    the input's layout (NCHW, as Triton's image clients expect it said), the dynamic batcher
    (BNFOLD_MAX_BATCH_SIZE rows at most per run, waiting BNFOLD_MAX_DELAY_MS for companions;
    absent when batching is off) and one instance per worker process, on the CPU or the GPU."""
    m = model.manifest
    assert m is not None
    gpu = any(p.startswith("CUDA") for p in model.providers)
    config: dict = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": settings.max_images_per_request,
        "input": [{"name": m.input.name, "data_type": CONFIG_TYPES[m.input.datatype],
                   "format": "FORMAT_NCHW", "dims": m.input.shape[1:]}],
        "output": [{"name": m.output.name, "data_type": CONFIG_TYPES[m.output.datatype],
                    "dims": m.output.shape[1:]}],
        "instance_group": [{"name": model.name, "kind": "KIND_GPU" if gpu else "KIND_CPU",
                            "count": max(1, settings.workers)}],
    }  # fmt: skip
    if settings.max_batch_size > 1:
        config["dynamic_batching"] = {
            "preferred_batch_size": [settings.max_batch_size],
            "max_queue_delay_microseconds": round(settings.max_delay_ms * 1000),
        }
    return config
