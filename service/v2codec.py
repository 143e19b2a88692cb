"""Open Inference Protocol (V2) bodies <-> numpy, with the binary tensor data extension.

HTTP-free: the route hands over the body bytes and the `Inference-Header-Content-Length` header
value, and gets back tensors or response bytes. A binary body is the JSON header followed by
each binary input's raw little-endian bytes, in input order, sized by its
`parameters.binary_data_size`. A binary response mirrors it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput, validation_message
from service.errors import shown
from service.schemas import InferenceRequest, Parameters, RequestInput
from service.tensors import (
    SHARED_MEMORY,
    check_header,
    check_outputs_once,
    from_raw,
    from_values,
    refuse_shared_memory,
)

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class DecodedRequest:
    """A parsed inference request and the raw bytes of each binary input (by input index)."""

    request: InferenceRequest
    binary: dict[int, bytes]


def parse_request(body: bytes, header_length: int | None = None) -> DecodedRequest:
    """Split and validate a JSON or binary-extension body; 400 with the reason otherwise."""
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise BadInput(
            f"{HEADER_LENGTH} is {header_length}; it must be the byte length of the JSON "
            f"header, between 1 and the body length {len(body)}"
        )
    request = _validate_header(body[:header_length])
    return DecodedRequest(request, _split_binary(request, body[header_length:]))


def _validate_header(raw: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise BadInput(f"malformed JSON in the inference request: {errors[0]['msg']}") from None
        raise BadInput(
            f"invalid inference request: {validation_message(_parameter_errors(errors))}"
        ) from None


PARAMETER_TYPES = ("bool", "int", "float", "str")  # the members of schemas.ParameterValue


def _parameter_errors(errors: list) -> list:
    """A parameter value that is no string, number or boolean fails each member of the union
    (four lines: '.bool: Input should be a valid boolean; .int: ...'): one line says it."""
    answer, seen = [], set()
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if len(loc) < 3 or loc[-1] not in PARAMETER_TYPES or "parameters" not in loc:
            answer.append(err)
        elif loc[:-1] not in seen:
            seen.add(loc[:-1])
            message = "must be a string, a number or a boolean (a parameter value)"
            answer.append({**err, "loc": loc[:-1], "msg": message})
    return answer


def _split_binary(request: InferenceRequest, tail: bytes) -> dict[int, bytes]:
    chunks, offset = {}, 0
    for i, tensor in enumerate(request.inputs):
        if SHARED_MEMORY in (tensor.parameters or {}):
            refuse_shared_memory("input", tensor.name)
        size = _binary_size(tensor)
        if size is None:
            if tensor.data is None:
                raise BadInput(
                    f"input {tensor.name!r} has neither 'data' nor parameters.binary_data_size"
                )
            continue
        if tensor.data is not None:
            raise BadInput(f"input {tensor.name!r} has both 'data' and binary_data_size: pick one")
        chunks[i] = tail[offset : offset + size]
        offset += size
    if offset != len(tail):
        raise BadInput(
            f"the body carries {len(tail)} bytes of binary tensor data after the JSON header, "
            f"but the inputs' binary_data_size add up to {offset}"
        )
    return chunks


def _binary_size(tensor: RequestInput) -> int | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadInput(f"input {tensor.name!r}: binary_data_size must be a byte count >= 0")
    return size


def parse_tensor_request(
    body: bytes, spec: TensorSpec, header_length: int | None = None
) -> tuple[DecodedRequest, np.ndarray]:
    """parse_request then input_array: CPU work for a worker thread, so a large JSON tensor is
    turned into an array off the event loop (np.array over nested lists is the slow part)."""
    decoded = parse_request(body, header_length)
    return decoded, input_array(decoded, spec)


def input_array(decoded: DecodedRequest, spec: TensorSpec) -> np.ndarray:
    """The model's one input as an array of the declared shape (model shape checked later)."""
    inputs = decoded.request.inputs
    tensor = inputs[0] if inputs else None
    datatype, shape = (tensor.datatype, tensor.shape) if tensor else ("", [])
    check_header([t.name for t in inputs], datatype, shape, spec)
    assert tensor is not None
    raw = decoded.binary.get(0)
    if raw is not None:
        return from_raw(tensor.name, datatype, shape, raw, "binary_data_size")
    return from_values(tensor.name, datatype, shape, tensor.data, "data")


def variant_of(parameters: Parameters | None) -> str:
    """The request's `parameters.variant` (default folded); which variants exist is the
    model's to say (LoadedModel.check_variant, in the data plane)."""
    variant = (parameters or {}).get("variant", "folded")
    if not isinstance(variant, str):
        raise BadInput(f"parameters.variant must be a string, got {variant!r}")
    return variant


def requested_outputs(request: InferenceRequest, spec: TensorSpec) -> list[tuple[str, bool]]:
    """(name, as_binary) for each output to answer; all outputs when none are named."""
    default_binary = _flag(request.parameters, "binary_data_output", "request")
    if not request.outputs:
        return [(spec.name, default_binary)]
    check_outputs_once([out.name for out in request.outputs])
    answer = []
    for out in request.outputs:
        if SHARED_MEMORY in (out.parameters or {}):
            refuse_shared_memory("output", out.name)
        if out.name != spec.name:
            raise BadInput(
                f"unknown output {shown(out.name)}; this model has outputs [{spec.name!r}]"
            )
        if (out.parameters or {}).get("classification"):
            raise BadInput(
                "the classification extension is not supported; request the logits "
                "or use POST /v1/models/{model}/predict"
            )
        binary = (out.parameters or {}).get("binary_data", default_binary)
        answer.append((out.name, _flag({"binary_data": binary}, "binary_data", out.name)))
    return answer


def _flag(parameters: Parameters | None, key: str, where: str) -> bool:
    value = (parameters or {}).get(key, False)
    if not isinstance(value, bool):
        raise BadInput(f"{where}: parameters.{key} must be true or false, got {value!r}")
    return value


def encode_response(
    header: dict, outputs: list[tuple[str, bool, np.ndarray]]
) -> tuple[bytes, int | None]:
    """Response body and, when any output is binary, the JSON header length to send."""
    described, blobs = [], []
    for name, binary, array in outputs:
        array = np.ascontiguousarray(array, dtype=np.float32)
        out = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            raw = array.astype("<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = array.ravel().tolist()  # float32 values are exact as JSON doubles
        described.append(out)
    head = json.dumps({**header, "outputs": described}).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
