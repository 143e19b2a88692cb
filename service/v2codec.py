"""Open Inference Protocol (V2) REST bodies <-> `InferRequest` / `InferResponse`, with the
binary tensor data extension.

HTTP-free: the route hands over the body bytes and the `Inference-Header-Content-Length` header
value, and gets back the request (service/request.py), or response bytes for the data plane's
answer. A binary body is the JSON header followed by each binary input's raw little-endian
bytes, in input order, sized by its `parameters.binary_data_size`. A binary response mirrors it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from pydantic import ValidationError

from bnfold.errors import BadInput, validation_message
from service import json_tensors
from service.errors import shown
from service.request import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
    json_values,
    raw_bytes,
    variant_of,
)
from service.schemas import InferenceRequest, Parameters, RequestInput
from service.tensors import (
    SHARED_MEMORY,
    InputTensor,
    TensorSpec,
    check_declared,
    dims,
    refuse_shared_memory,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_OUTPUT = "binary_data_output"  # the request's default for outputs it does not name
MAX_DIGITS = 18  # any body length fits; Python refuses int() of over 4,300 digits


def plain_length(value: str | bytes) -> int | None:
    """An Inference-Header-Content-Length value as a number when it is plain ASCII digits, at
    most MAX_DIGITS of them; else None (the route's validation answers it)."""
    plain = value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS
    return int(value) if plain else None


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
    if header_length == len(body) and len(body) >= json_tensors.READ_FROM:
        request = json_tensors.read(body)  # the numbers straight to arrays; None: not here
        if request is not None:
            return DecodedRequest(request, _split_binary(request, b""))
    request = _validate_header(body[:header_length])
    return DecodedRequest(request, _split_binary(request, body[header_length:]))


CHECK_FROM = 64 * 1024  # JSON headers from this size have their declared shapes checked first
# A `data` array as clients send it: numbers, commas, brackets and whitespace only.
DATA_ARRAY = re.compile(rb'"data"\s*:\s*(\[[-+0-9.eE\s,\[\]]*)')


@dataclass
class _DataText:
    """What a `data` array's text says about it without parsing it."""

    least: int  # fewest elements it can hold: commas + 1 - lists (a comma may part lists)
    lists: int  # how many lists (brackets) it opens


def check_declared_shapes(
    body: bytes, header_length: int | None, spec: TensorSpec | None, max_rows: int
) -> None:
    """A large JSON body's declared input shapes against the limits, before its `data` lists
    are built (Python's numbers and lists cost 60-100 times their JSON text): 413 for more rows
    than `max_rows`, 400 for a shape the model (`spec`, when known) does not take, or for
    `data` that holds more elements or lists than its shape allows. Every such body would be
    refused after the full parse anyway; this refuses it first, so the memory one request's
    parse may take is bounded by what its model can accept.

    A body that holds more numbers and lists than `max_rows` inputs of the model must hold them
    in `data` arrays of plain numbers, which this reads; one whose values are elsewhere or
    otherwise written (a `null` among the numbers, an escaped key, malformed JSON) is refused
    here too: its parse would cost as much (a 9 MB body 230 MB) and could only fail. Without
    the model's input spec, a body this cannot read is left to the full parse."""
    raw = body if header_length is None else body[:header_length]
    bound = _bound(spec, max_rows)
    if len(raw) < CHECK_FROM or _within_model(raw, bound):
        return
    texts: list[_DataText] = []

    def stand_in(match: re.Match) -> bytes:
        array = match.group(1).rstrip(b" \t\r\n,")
        opened = array.count(b"[")
        if not array.endswith(b"]") or opened != array.count(b"]"):
            raise _Unread
        texts.append(_DataText(array.count(b",") + 1 - opened, opened))
        return b'"data": ' + str(len(texts) - 1).encode() + match.group(1)[len(array) :]

    bounded = bound is not None  # the model's size is known
    try:
        skeleton_text = DATA_ARRAY.sub(stand_in, raw)
        if bounded and not _within_model(skeleton_text, bound):
            raise _Unread  # the values are not all in `data` arrays of plain numbers
        skeleton = json.loads(skeleton_text)
    except _Unread:
        if not bounded:
            return
        raise BadInput(
            f"the request holds more values than {max_rows} inputs of this model, not all of "
            'them numbers in "data" arrays: send each input\'s values as one JSON array of '
            'numbers under "data" (flat or nested as its shape), or use the binary tensor '
            "extension"
        ) from None
    except (ValueError, RecursionError) as exc:
        if not bounded:
            return
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise BadInput(f"malformed JSON in the inference request: {why}") from None
    inputs = skeleton.get("inputs") if isinstance(skeleton, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("shape"), list):
            continue
        name, shape, data = tensor.get("name", ""), tensor["shape"], tensor.get("data")
        count = check_declared(str(name), shape, spec, max_rows)
        if isinstance(data, int) and not isinstance(data, bool) and 0 <= data < len(texts):
            text = texts[data]
            if text.least > max(count, 1):
                raise BadInput(
                    f"input {shown(name)} has shape {dims(shape)} ({count} elements) but its "
                    f"data holds more than {count} elements"
                )
            if text.lists > (len(shape) + 1) * max(count, 1) + 1:
                raise BadInput(
                    f"input {shown(name)}: data is nested deeper than the shape {dims(shape)}: "
                    "nest it as the shape (row-major), or send it flat"
                )


def _bound(spec: TensorSpec | None, max_rows: int) -> int | None:
    """The most numbers `max_rows` inputs of the model hold; None when the spec is unknown or
    has a variable dimension besides the batch."""
    if spec is None or any(d < 1 for d in spec.shape[1:]):
        return None
    return max_rows * math.prod(spec.shape[1:])


def _within_model(raw: bytes, bound: int | None) -> bool:
    """Fewer numbers and lists than `bound` (`_bound`: what `max_rows` inputs of the model
    hold): whatever the body declares, its parse is no larger than an accepted request's, and
    the full parse's checks answer it. Two byte counts, unless the body is shorter than the
    bound: on the event loop they cost 2 ms a MB, as much as the parse."""
    if bound is None:
        return False
    if len(raw) < bound:  # fewer bytes than that: fewer commas and brackets too, uncounted
        return True
    return raw.count(b",") < bound and raw.count(b"[") < bound


class _Unread(Exception):
    """A `data` array the cheap reading cannot take: the full parse decides."""


def _validate_header(raw: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise BadInput(f"malformed JSON in the inference request: {errors[0]['msg']}") from None
        raise BadInput(
            f"invalid inference request: {validation_message(_clipped(_parameter_errors(errors)))}"
        ) from None


def _clipped(errors: list) -> list:
    """Each error's location with a client's long key (a 1 MB parameter name) cut short."""
    return [{**e, "loc": tuple(_part(p) for p in e.get("loc", ()))} for e in errors]


def _part(part: object) -> object:
    return shown(part) if isinstance(part, str) and len(repr(part)) > 80 else part


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
                    f"input {shown(tensor.name)} has neither 'data' nor parameters.binary_data_size"
                )
            continue
        if tensor.data is not None:
            raise BadInput(
                f"input {shown(tensor.name)} has both 'data' and binary_data_size: pick one"
            )
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
        raise BadInput(f"input {shown(tensor.name)}: binary_data_size must be a byte count >= 0")
    return size


def decode(
    body: bytes, header_length: int | None, model: str, version: str | None = None
) -> InferRequest:
    """A JSON or binary-extension body as the request for `model` (the URL's); 400 with the
    reason when it is not a valid one. CPU work: a large body is decoded in a thread."""
    decoded = parse_request(body, header_length)
    request = decoded.request
    inputs = [
        InputTensor(t.name, t.datatype, t.shape, raw=decoded.binary[i], where="binary_data_size")
        if i in decoded.binary
        else InputTensor(t.name, t.datatype, t.shape, values=t.data, where="data")
        for i, t in enumerate(request.inputs)
    ]
    return InferRequest(
        model=model,
        version=version,
        id=request.id,
        variant=variant_of(request.parameters),
        parameters={**(request.parameters or {}), BINARY_OUTPUT: _binary_output(request)},
        outputs=_outputs(request),
        inputs=inputs,
        nbytes=len(body),
    )


def _outputs(request: InferenceRequest) -> list[RequestedOutput]:
    """The outputs asked for, each with its `binary_data` flag settled (the request's
    `binary_data_output` when the output names none); the flags are REST's alone."""
    default = _binary_output(request)
    outputs = []
    for out in request.outputs or []:
        parameters = dict(out.parameters or {})
        binary = parameters.get("binary_data", default)
        parameters["binary_data"] = _flag({"binary_data": binary}, "binary_data", out.name)
        outputs.append(RequestedOutput(out.name, parameters))
    return outputs


def _binary_output(request: InferenceRequest) -> bool:
    return _flag(request.parameters, BINARY_OUTPUT, "request")


def _flag(parameters: Parameters | None, key: str, where: str) -> bool:
    value = (parameters or {}).get(key, False)
    if not isinstance(value, bool):
        raise BadInput(
            f"{shown_name(where)}: parameters.{key} must be true or false, got {shown(value)}"
        )
    return value


def shown_name(where: str) -> str:
    """'request', or an output's name as sent (cut when long)."""
    return where if len(where) <= 80 else shown(where)


def encode(answer: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header length to send."""
    binary_output = request.parameters.get(BINARY_OUTPUT, False)
    header: dict = {
        "model_name": answer.model,
        "model_version": answer.version,
        "parameters": {"variant": answer.variant},
    }
    if answer.id is not None:
        header["id"] = answer.id
    described, blobs = [], []
    for out, array in answer.outputs:  # FP32 logits, or BYTES (classification strings)
        tensor = {"name": out.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if out.parameters.get("binary_data", binary_output):
            raw = raw_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = json_values(array)
        described.append(tensor)
    head = json.dumps({**header, "outputs": described}).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
