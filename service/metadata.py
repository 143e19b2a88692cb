"""What the server says about itself, the same over REST and gRPC: name, version, platform."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SERVER_NAME = "bnfold"
PLATFORM = "onnxruntime_onnx"  # the Open Inference Protocol's platform name for ONNX models


def server_version() -> str:
    try:
        return version("bnfold")
    except PackageNotFoundError:
        return "0.0.0"
