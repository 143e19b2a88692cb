"""Load a user's ONNX file and refuse, with one actionable sentence, what bnfold cannot take.

Not ONNX, truncated, failing onnx.checker, external data missing or short, over protobuf's 2 GB,
an opset onnxruntime cannot run. Every refusal is a `ModelImportError` (a BnfoldError), which
the CLI prints as one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper as ext

from bnfold.bundle import sha256_file
from bnfold.errors import BnfoldError
from bnfold.toolchain.graph import infer_shapes_light

MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one serialized ModelProto


class ModelImportError(BnfoldError):
    """The model (or an option given for it) cannot be imported; the message says why."""

    status_code = 400


@dataclass
class LoadedOnnx:
    """A validated model with its external data in memory, and where it came from."""

    path: Path
    model: onnx.ModelProto
    sha256: str
    external_files: list[str] = field(default_factory=list)  # relative to the model's folder


def load_onnx(path: Path) -> LoadedOnnx:
    """Parse, attach external data, and run onnx.checker (full check); refuse clearly."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelImportError(
            f"{path}: not a readable ONNX model: the file is not an ONNX protobuf, or it is "
            f"truncated or corrupt ({exc})"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelImportError(f"{path}: not an ONNX model (no graph with nodes in the file)")
    _check_node_count(model, path)
    files = _attach_external_data(model, path)
    _check(path)
    _check_tensor_sizes(model, path)
    return LoadedOnnx(path=path, model=model, sha256=sha256_file(path), external_files=files)


def _attach_external_data(model: onnx.ModelProto, path: Path) -> list[str]:
    """Check every external tensor's file and byte range, then load them into the model."""
    tensors = [t for t in ext._get_all_tensors(model) if ext.uses_external_data(t)]
    if not tensors:
        _check_size(model, path, 0)
        return []
    base = path.parent
    files: dict[str, int] = {}
    for t in tensors:
        info = ext.ExternalDataInfo(t)
        where = base / info.location
        if Path(info.location).is_absolute() or not where.resolve().is_relative_to(base.resolve()):
            raise ModelImportError(
                f"{path}: the weights of {t.name!r} point to {info.location!r}, outside the "
                "model's folder: external data must be a file next to the model"
            )  # checked before looking at it: a model file cannot probe other files
        if not where.is_file():
            raise ModelImportError(
                f"{path}: the weights of {t.name!r} are stored in {info.location!r}, which is "
                f"missing next to the model: copy that file into {base}"
            )
        size = files.setdefault(info.location, where.stat().st_size)
        need = (info.offset or 0) + (info.length if info.length is not None else 0)
        if need > size:
            raise ModelImportError(
                f"{path}: {info.location!r} is {size} bytes but {t.name!r} needs bytes up to "
                f"{need}: the external data file is truncated"
            )
    _check_size(model, path, sum(files.values()))
    try:
        ext.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelImportError(f"{path}: cannot read its external data: {exc}") from None
    return sorted(files)


def _check_size(model: onnx.ModelProto, path: Path, external_bytes: int) -> None:
    """A bundle holds single-file ONNX models: refuse what protobuf cannot serialize."""
    total = model.ByteSize() + external_bytes
    if total > MAX_PROTO_BYTES:
        raise ModelImportError(
            f"{path}: the model and its weights are {total / 2**30:.1f} GiB, over protobuf's "
            "2 GiB limit for one ONNX file; bnfold bundles hold single-file models"
        )


# Budgets, so that a small hostile or broken file cannot take the machine: the published CNN
# families have a few hundred to a few thousand nodes and no tensor near 2^28 values per image.
MAX_NODES = 20_000
MAX_TENSOR_VALUES = 2**28  # 1 GiB of float32 for one input; every image's tensors add up


def _check_node_count(model: onnx.ModelProto, path: Path) -> None:
    n = len(model.graph.node)
    if n > MAX_NODES:
        raise ModelImportError(
            f"{path}: {n} nodes, over the {MAX_NODES} this tool folds and proves (the published "
            "CNN families have a few thousand at most)"
        )


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a graph whose shapes, as onnx infers them for one input (a variable dim counted as
    1), make a tensor of more than MAX_TENSOR_VALUES values: the reference and onnxruntime would
    allocate it for every input."""
    try:
        inferred = infer_shapes_light(model, data_prop=True)
    except Exception:  # the checker passed; shapes it cannot infer stay unknown
        return
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        values = math.prod(max(1, d) for d in dims)
        if values > MAX_TENSOR_VALUES:
            raise ModelImportError(
                f"{path}: tensor {vi.name!r} would hold {values:.3g} values ({dims}) for one "
                f"input, over the {MAX_TENSOR_VALUES:.3g} this tool allows"
            )


def _check(path: Path) -> None:
    """The full check of the file itself (the checker reads it, external data included, with no
    copy serialized here: seconds for a 500 MB model)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if len(text) > 300:  # the checker may append a whole node dump
            text = text[:300] + " ..."
        raise ModelImportError(f"{path}: fails onnx.checker: {text}") from None


def ort_message(exc: Exception) -> str:
    """onnxruntime's error without its C++ source location and signature."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    # "/onnxruntime_src/...h:46 void onnxruntime::f(args...) Sentence." -> "Sentence."
    return re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\) ?", "", text)


def ort_session(model: onnx.ModelProto | bytes, path: Path, variant: str = "unfolded"):
    """An onnxruntime session for the model, or the reason onnxruntime cannot run it."""
    import onnxruntime as ort

    from bnfold.toolchain.sessions import make_session

    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return make_session(data, variant)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        opsets = ", ".join(
            f"{o.domain or 'ai.onnx'} {o.version}"
            for o in (model.opset_import if isinstance(model, onnx.ModelProto) else [])
        )
        raise ModelImportError(
            f"{path}: onnxruntime {ort.__version__} cannot run this model (opsets: {opsets}): "
            f"{ort_message(exc)}"
        ) from None


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller must feed (old IR versions also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """Static sizes as ints, symbolic ones as their name, unknown ones as None."""
    shape = vi.type.tensor_type.shape
    out: list[int | str | None] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        else:
            out.append(d.dim_param or None)
    return out


def has_shape(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")


def elem_type_name(vi: onnx.ValueInfoProto) -> str:
    if not vi.type.HasField("tensor_type"):
        return "a non-tensor value"
    return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()


def run_zeros(session, input_name: str, shape: list[int]) -> list[np.ndarray]:
    """Every output of the session for one all-zero input batch (a shape probe)."""
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure is reported by the caller, not logged to stderr
    return session.run(None, {input_name: np.zeros(shape, dtype=np.float32)}, quiet)
