"""What the server says about itself and its models, the same over REST and gRPC: name,
version, extensions, platform, each model's tensors. Each protocol only encodes these."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from service.schemas import ModelMetadata, ServerMetadata, TensorMetadata

if TYPE_CHECKING:
    from service.registry import LoadedModel

SERVER_NAME = "bnfold"
PLATFORM = "onnxruntime_onnx"  # the Open Inference Protocol's platform name for ONNX models
MODEL_REPOSITORY = "model_repository"
# The binary tensor data extension is REST's; gRPC carries raw tensors anyway.
EXTENSIONS = {"rest": ["binary_tensor_data", MODEL_REPOSITORY], "grpc": [MODEL_REPOSITORY]}


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
