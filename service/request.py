"""One inference request and its answer, whatever protocol carried them.

REST (service/api/v2.py, service/api/v1.py) and gRPC (service/grpc/servicer.py) each decode
their wire format into an `InferRequest`, hand it to the data plane (service/dataplane.py)
with the model admission gave them, and encode the `InferResponse` it returns. The rules every
request follows whatever its protocol (the variant parameter, which outputs may be asked for,
the classification extension's top-k strings and how an answered tensor goes on the wire)
live here, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service.errors import shown
from service.images import Upload
from service.tensors import SHARED_MEMORY, InputTensor, check_outputs_once, refuse_shared_memory

DEFAULT_VARIANT = "folded"
CLASSIFICATION = "classification"  # an output parameter: the classification extension


@dataclass
class RequestedOutput:
    """An output the client asked for, with its parameters (REST's `binary_data` among them)."""

    name: str
    parameters: Mapping[str, object] = field(default_factory=dict)


@dataclass
class InferRequest:
    """What a client asked of a model: tensors (`inputs`) or images (`uploads`), the variant
    to run them on and the outputs to answer. `nbytes`: the size of the request as received,
    which decides whether turning its tensors into an array is worth a trip to a thread."""

    model: str
    version: str | None = None
    id: str | None = None
    variant: str = DEFAULT_VARIANT
    parameters: Mapping[str, object] = field(default_factory=dict)  # the request's, as sent
    outputs: list[RequestedOutput] = field(default_factory=list)
    inputs: list[InputTensor] = field(default_factory=list)
    uploads: list[Upload] | None = None
    nbytes: int = 0


@dataclass
class InferResponse:
    """The model's answer to an InferRequest: each requested output with its values."""

    model: str
    version: str | None
    id: str | None
    variant: str
    outputs: list[tuple[RequestedOutput, np.ndarray]]


def variant_of(parameters: Mapping[str, object] | None) -> str:
    """The request's `parameters.variant` (default folded); which variants exist is the
    model's to say (LoadedModel.check_variant, in the data plane)."""
    variant = (parameters or {}).get("variant", DEFAULT_VARIANT)
    if not isinstance(variant, str):
        raise BadInput(f"parameters.variant must be a string, got {shown(variant)}")
    return variant


def answered_outputs(
    requested: Sequence[RequestedOutput], spec: TensorSpec
) -> list[RequestedOutput]:
    """The outputs to answer: those asked for, each the model's one output and named once;
    the model's output when none are."""
    if not requested:
        return [RequestedOutput(spec.name)]
    check_outputs_once([out.name for out in requested])
    for out in requested:
        if SHARED_MEMORY in out.parameters:
            refuse_shared_memory("output", out.name)
        if out.name != spec.name:
            raise BadInput(
                f"unknown output {shown(out.name)}; this model has outputs [{spec.name!r}]"
            )
        class_count(out)  # refused here, before any inference, when it is not a count
    return list(requested)


def class_count(out: RequestedOutput) -> int | None:
    """The output's `classification` parameter (the classification extension): how many of the
    highest-valued classes to answer instead of the tensor; None when not asked for."""
    count = out.parameters.get(CLASSIFICATION)
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BadInput(
            f"output {shown(out.name)}: parameters.classification must be a whole number of "
            f"classes, at least 1, got {shown(count)}"
        )
    return count


def classify(scores: np.ndarray, count: int, labels: Sequence[str] | None) -> np.ndarray:
    """The classification extension's answer for (N, classes) scores: a BYTES tensor (N, k),
    k = min(count, classes) (a larger count is clamped, as Triton does), each row's k
    highest-valued classes, highest first (ties: the lower index first), each element
    "<value>:<index>[:<label>]" with the value as C's "%f" prints it (Triton's
    std::to_string) and the label omitted when the model has none."""
    k = min(count, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty(order.shape, dtype=object)
    for i, row in enumerate(order):
        for j, index in enumerate(row):
            label = f":{labels[index]}" if labels else ""
            out[i, j] = f"{float(scores[i, index]):f}:{index}{label}".encode()
    return out


def output_array(
    out: RequestedOutput, logits: np.ndarray, labels: Sequence[str] | None
) -> np.ndarray:
    """What answers `out`: the logits, or their top-k strings when it asks for classification."""
    count = class_count(out)
    return logits if count is None else classify(logits, count, labels)


def is_bytes(array: np.ndarray) -> bool:
    return array.dtype == object


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of an answered output: BYTES (classification) or FP32 (logits)."""
    return "BYTES" if is_bytes(array) else "FP32"


def raw_bytes(array: np.ndarray) -> bytes:
    """An answered output as the protocol's raw tensor bytes (REST's binary tensor data,
    gRPC's raw_output_contents): FP32 little-endian, or each BYTES element as a 4-byte
    little-endian length and its bytes, row-major."""
    if not is_bytes(array):
        return np.ascontiguousarray(array, dtype="<f4").tobytes()
    return b"".join(len(b).to_bytes(4, "little") + b for b in array.ravel())


def json_values(array: np.ndarray) -> list:
    """An answered output's flattened values as JSON carries them: numbers, or strings for
    BYTES (float32 values are exact as JSON doubles)."""
    if is_bytes(array):
        return [b.decode() for b in array.ravel()]
    return np.asarray(array, dtype=np.float32).ravel().tolist()
