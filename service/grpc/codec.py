"""ModelInferRequest -> the model's input array, and logits -> ModelInferResponse.

The gRPC counterpart of service/v2codec.py, on the same checks (service/tensors.py), so the
same mistake gets the same message over either protocol. Inputs come as typed `contents`
(`fp32_contents` for FP32) or as `raw_input_contents` (one little-endian byte string per input,
in input order); outputs go out in `raw_output_contents`, which is what tritonclient.grpc reads
(the protocol has no way for a client to ask for typed output contents instead).
"""

from __future__ import annotations

import numpy as np

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service.errors import shown
from service.grpc import inference_pb2 as pb
from service.tensors import (
    SHARED_MEMORY,
    check_header,
    check_outputs_once,
    from_raw,
    from_values,
    refuse_shared_memory,
)

TYPED_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")  # fmt: skip
FIELD_OF = {"FP32": "fp32_contents"}  # the typed field that carries each datatype we take


def parameter(params, key: str, default: object = None) -> object:
    """The value of an InferParameter map entry, whatever its oneof member; default if absent."""
    if key not in params:
        return default
    entry = params[key]
    which = entry.WhichOneof("parameter_choice")
    return getattr(entry, which) if which else default


def variant_of(request: pb.ModelInferRequest) -> str:
    """parameters.variant (default folded); which variants exist is the model's to say."""
    variant = parameter(request.parameters, "variant", "folded")
    if not isinstance(variant, str):
        raise BadInput(f"parameters.variant must be a string, got {variant!r}")
    return variant


def input_array(request: pb.ModelInferRequest, spec: TensorSpec) -> np.ndarray:
    """The model's one input from the request, as an array of the declared shape."""
    inputs = request.inputs
    for i, tensor in enumerate(inputs):
        if SHARED_MEMORY in tensor.parameters:
            refuse_shared_memory("input", tensor.name)
        for j, d in enumerate(tensor.shape):
            if d < 0:
                raise BadInput(
                    f"invalid inference request: inputs.{i}.shape.{j}: Input should be greater "
                    "than or equal to 0"
                )
    tensor = inputs[0] if inputs else None
    datatype, shape = (tensor.datatype, list(tensor.shape)) if tensor else ("", [])
    check_header([t.name for t in inputs], datatype, shape, spec)
    assert tensor is not None
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise BadInput(
                f"raw_input_contents has {len(raw)} entries for {len(inputs)} input(s): send "
                "one per input, in input order"
            )
        if tensor.HasField("contents"):
            raise BadInput(
                f"input {tensor.name!r} has both contents and raw_input_contents: pick one"
            )
        return from_raw(tensor.name, datatype, shape, raw[0], "its raw_input_contents entry")
    field = FIELD_OF[datatype]
    others = [f for f in TYPED_FIELDS if f != field and len(getattr(tensor.contents, f))]
    if others:
        raise BadInput(
            f"input {tensor.name!r} is {datatype}: send its values in contents.{field} or "
            f"raw_input_contents, not contents.{others[0]}"
        )
    values = np.asarray(getattr(tensor.contents, field), dtype=np.float32)
    return from_values(tensor.name, datatype, shape, values, f"contents.{field}")


def requested_outputs(request: pb.ModelInferRequest, spec: TensorSpec) -> None:
    """Every output asked for must be the model's one output (all outputs when none are)."""
    check_outputs_once([out.name for out in request.outputs])
    for out in request.outputs:
        if SHARED_MEMORY in out.parameters:
            refuse_shared_memory("output", out.name)
        if out.name != spec.name:
            raise BadInput(
                f"unknown output {shown(out.name)}; this model has outputs [{spec.name!r}]"
            )
        if parameter(out.parameters, "classification"):
            raise BadInput(
                "the classification extension is not supported; request the logits "
                "or use POST /v1/models/{model}/predict"
            )


def infer_response(
    request: pb.ModelInferRequest, model: str, version: str, variant: str, output: str,
    logits: np.ndarray,
) -> pb.ModelInferResponse:  # fmt: skip
    """(N, classes) float32 logits as the model's one output, in raw_output_contents."""
    array = np.ascontiguousarray(logits, dtype="<f4")
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    response.parameters["variant"].string_param = variant
    response.outputs.add(name=output, datatype="FP32", shape=list(array.shape))
    response.raw_output_contents.append(array.tobytes())
    return response
