"""ModelInferRequest -> `InferRequest`, and `InferResponse` -> ModelInferResponse; the model
configuration and statistics dicts (Triton's JSON, the REST answers) -> their protobuf messages.

The gRPC counterpart of service/v2codec.py: both decode into the one request type
(service/request.py), and the data plane checks its tensors the same way whichever protocol
carried them (service/tensors.py), so the same mistake gets the same message over either.
Inputs come as typed `contents` (`fp32_contents` for FP32) or as `raw_input_contents` (one
little-endian byte string per input, in input order); outputs go out in `raw_output_contents`,
which is what tritonclient.grpc reads (the protocol has no way for a client to ask for typed
output contents instead).
"""

from __future__ import annotations

from google.protobuf import json_format

from bnfold.errors import BadInput
from service.grpc import inference_pb2 as pb
from service.request import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
    raw_bytes,
    variant_of,
)
from service.tensors import SHARED_MEMORY, InputTensor, check_count, refuse_shared_memory

FIELD_OF = {"FP32": "fp32_contents"}  # the typed field that carries each datatype we take


def parameters(params) -> dict[str, object]:
    """An InferParameter map as plain values, whatever each entry's oneof member."""
    out: dict[str, object] = {}
    for key, entry in params.items():
        which = entry.WhichOneof("parameter_choice")
        if which:
            out[key] = getattr(entry, which)
    return out


def decode(request: pb.ModelInferRequest) -> InferRequest:
    """The request as the one request type; INVALID_ARGUMENT for what gRPC alone can get
    wrong (raw and typed contents mixed up, a negative dimension)."""
    params = parameters(request.parameters)
    return InferRequest(
        model=request.model_name,
        version=request.model_version or None,
        id=request.id,
        variant=variant_of(params),
        parameters=params,
        outputs=[RequestedOutput(out.name, parameters(out.parameters)) for out in request.outputs],
        inputs=_inputs(request),
        nbytes=request.ByteSize(),
    )


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    inputs, raw = request.inputs, request.raw_input_contents
    for i, tensor in enumerate(inputs):
        if SHARED_MEMORY in tensor.parameters:
            refuse_shared_memory("input", tensor.name)
        for j, d in enumerate(tensor.shape):
            if d < 0:
                raise BadInput(
                    f"invalid inference request: inputs.{i}.shape.{j}: Input should be greater "
                    "than or equal to 0"
                )
    if raw and len(raw) != len(inputs):
        raise BadInput(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} input(s): send "
            "one per input, in input order"
        )
    return [_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(inputs)]


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise BadInput(f"input {name!r} has both contents and raw_input_contents: pick one")
        return InputTensor(name, datatype, shape, raw=raw, where="its raw_input_contents entry")
    field = FIELD_OF.get(datatype)
    if field is None:  # a datatype no model here takes: the data plane says so
        return InputTensor(name, datatype, shape, values=[], where="contents")
    others = [d.name for d, _ in tensor.contents.ListFields() if d.name != field]  # set ones
    if others:
        raise BadInput(
            f"input {name!r} is {datatype}: send its values in contents.{field} or "
            f"raw_input_contents, not contents.{others[0]}"
        )
    values = getattr(tensor.contents, field)
    where = f"contents.{field}"
    check_count(name, shape, len(values), where)  # before a list of them is built
    packed = _packed_fp32(tensor.contents, len(values)) if field == "fp32_contents" else None
    if packed is not None:
        return InputTensor(name, datatype, shape, raw=packed, where=where)
    return InputTensor(name, datatype, shape, values=values, where=where)


FP32_TAG = (pb.InferTensorContents.DESCRIPTOR.fields_by_name["fp32_contents"].number << 3) | 2


def _packed_fp32(contents: pb.InferTensorContents, count: int) -> bytes | None:
    """The values of `contents.fp32_contents` as their little-endian bytes, when that packed
    field is all the message holds: protobuf's Python API reads a repeated field one number at
    a time (2.5 ms for a 128x128 RGB image), and its wire form is already those bytes
    (tag, length, then 4 bytes per float)."""
    data = contents.SerializeToString()
    if not count or not data or data[0] != FP32_TAG:
        return None
    length, start = 0, 1
    for shift in range(0, 35, 7):  # the length, a base-128 varint
        if start >= len(data):
            return None
        byte = data[start]
        start += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    if length != 4 * count or start + length != len(data):
        return None
    return data[start:]


def encode(answer: InferResponse) -> pb.ModelInferResponse:
    """Each output in raw_output_contents: the logits (FP32), or the classification strings
    (BYTES, each element length-prefixed, as tritonclient reads them)."""
    response = pb.ModelInferResponse(
        model_name=answer.model, model_version=answer.version or "", id=answer.id or ""
    )
    response.parameters["variant"].string_param = answer.variant
    for out, array in answer.outputs:
        response.outputs.add(name=out.name, datatype=datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(raw_bytes(array))
    return response


def model_config(config: dict) -> pb.ModelConfigResponse:
    """The model configuration (service/metadata.py's dict, Triton's JSON) as protobuf."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))


def model_statistics(report: dict) -> pb.ModelStatisticsResponse:
    """The statistics answer (service/statistics.py's dict, Triton's JSON) as protobuf."""
    return json_format.ParseDict(report, pb.ModelStatisticsResponse())
