"""service/v2codec.py: V2 REST bodies <-> the one request type, the binary layout checked byte by
byte; with the rules every protocol's request follows (service/request.py, service/tensors.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service.request import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    answered_outputs,
)
from service.tensors import input_array
from service.v2codec import decode, encode, parse_request

INPUT = TensorSpec(name="input", shape=[-1, 1, 8, 8])
OUTPUT = TensorSpec(name="logits", shape=[-1, 10])


def array(body: bytes, length: int | None = None) -> np.ndarray:
    """The body's input tensor as the data plane turns it into the model's input."""
    return input_array(decode(body, length, "digits").inputs, INPUT)


def binary_outputs(body: bytes) -> list[tuple[str, bool]]:
    """(name, sent as binary) for each output the answer to this body would carry."""
    request = decode(body, None, "digits")
    outputs = answered_outputs(request.outputs, OUTPUT)
    logits = np.zeros((1, 10), np.float32)
    answer = InferResponse("digits", "1", None, "folded", [(o, logits) for o in outputs])
    content, length = encode(answer, request)
    header = json.loads(content[:length] if length else content)
    return [(out["name"], "parameters" in out) for out in header["outputs"]]


def json_body(data, shape, name="input", datatype="FP32", **extra) -> bytes:
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary_body(x: np.ndarray, **extra) -> tuple[bytes, int]:
    raw = x.astype("<f4").tobytes()
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
              "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    head = json.dumps({"inputs": [tensor], **extra}).encode()
    return head + raw, len(head)


def test_flat_and_nested_json_data_give_the_same_array():
    x = np.arange(128, dtype=np.float32).reshape(2, 1, 8, 8) / 7
    flat = array(json_body(x.ravel().tolist(), [2, 1, 8, 8]))
    nested = array(json_body(x.tolist(), [2, 1, 8, 8]))
    assert flat.dtype == np.float32 and np.array_equal(flat, x) and np.array_equal(nested, x)


def test_binary_input_is_read_as_little_endian_fp32():
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    body, length = binary_body(x)
    assert np.array_equal(array(body, length), x)


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b'{"inputs": [', None, "malformed JSON in the inference request: Invalid JSON: EOF"),
        (b'{"inputs": []}', None, "invalid inference request: inputs: List should have at least"),
        (json_body([1.0], [1]), 0, "Inference-Header-Content-Length is 0; it must be"),
        (json_body([1.0], [1]), 10**6, "Inference-Header-Content-Length is 1000000"),
        (json_body(None, [1]), None, "input 'input' has neither 'data' nor"),
        (json_body([[1, 2], [3]], [3]), None, "input 'input': nested data lists must all"),
        (json_body([1, "2"], [2]), None, "input 'input': data must hold only numbers (FP32)"),
        (json_body([True], [1]), None, "input 'input': data must hold only numbers"),
        (json_body([0.0] * 64, [1, 1, 8, 8], name="x"), None, "this model takes one input named"),
        (json_body([0] * 64, [1, 1, 8, 8], datatype="INT32"), None,
         "input 'input' has datatype INT32; this model takes FP32"),
        (json_body([0.0] * 63, [1, 1, 8, 8]), None,
         "input 'input' has shape [1, 1, 8, 8] (64 elements) but its data holds 63 elements"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_with_the_reason(body, length, message):
    with pytest.raises(BadInput) as info:
        array(body, length)
    assert info.value.message.startswith(message)


def test_binary_sizes_must_add_up():
    x = np.zeros((1, 1, 8, 8), np.float32)
    body, length = binary_body(x)
    with pytest.raises(BadInput, match="carries 260 bytes of binary tensor data after the JSON"):
        parse_request(body + b"\0\0\0\0", length)
    head = json.loads(body[:length])
    head["inputs"][0]["shape"] = [2, 1, 8, 8]
    head = json.dumps(head).encode()
    with pytest.raises(BadInput, match=r"\(128 elements, 512 bytes of FP32\) but binary_data_size"):
        array(head + body[length:], len(head))


def test_outputs_default_to_json_and_follow_binary_data_flags():
    assert binary_outputs(json_body([0.0] * 64, [1, 1, 8, 8])) == [("logits", False)]
    body = json_body([0.0], [1], parameters={"binary_data_output": True})
    assert binary_outputs(body) == [("logits", True)]
    outputs = [{"name": "logits", "parameters": {"binary_data": False}}]
    body = json_body([0.0], [1], parameters={"binary_data_output": True}, outputs=outputs)
    assert binary_outputs(body) == [("logits", False)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"outputs": [{"name": "probs"}]}, "unknown output 'probs'; this model has outputs"),
        ({"parameters": {"binary_data_output": "yes"}}, "must be true or false, got 'yes'"),
        ({"outputs": [{"name": "logits", "parameters": {"classification": 0}}]},
         "parameters.classification must be a whole number of classes, at least 1, got 0"),
        ({"outputs": [{"name": "logits", "parameters": {"classification": "3"}}]},
         "parameters.classification must be a whole number of classes, at least 1, got '3'"),
    ],
)  # fmt: skip
def test_bad_output_requests_are_refused(extra, message):
    with pytest.raises(BadInput, match=message):
        binary_outputs(json_body([0.0], [1], **extra))


def test_binary_response_layout_is_json_header_then_raw_fp32():
    logits = np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32)
    binary = RequestedOutput("logits", {"binary_data": True})
    answer = InferResponse("digits", "1", "abc", "folded", [(binary, logits)])
    body, length = encode(answer, InferRequest("digits"))
    header = json.loads(body[:length])
    assert header == {
        "model_name": "digits",
        "model_version": "1",
        "parameters": {"variant": "folded"},
        "id": "abc",
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 10],
                     "parameters": {"binary_data_size": 80}}],
    }  # fmt: skip
    assert body[length:] == struct.pack("<20f", *logits.ravel())


def test_json_response_round_trips_fp32_exactly():
    logits = np.random.default_rng(2).standard_normal((3, 10)).astype(np.float32)
    answer = InferResponse("digits", "1", None, "folded", [(RequestedOutput("logits"), logits)])
    body, length = encode(answer, InferRequest("digits"))
    assert length is None
    out = json.loads(body)["outputs"][0]
    assert out["shape"] == [3, 10]
    assert np.array_equal(np.asarray(out["data"], np.float32).reshape(3, 10), logits)


def _large_body(shape: list[int], count: int) -> bytes:
    values = np.linspace(-2, 2, count, dtype=np.float32).tolist()
    return json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                   "data": values}]}).encode()  # fmt: skip


def test_a_large_body_holding_more_than_the_model_accepts_is_refused_before_its_parse():
    """Over what max_rows inputs of the model hold: the declared shape and the data's text are
    read first (the parse of 200,000 numbers would cost 60-100 times their text)."""
    from service.v2codec import check_declared_shapes

    digits = TensorSpec(name="input", shape=[-1, 1, 8, 8])
    body = _large_body([1, 1, 8, 8], 200_000)
    with pytest.raises(BadInput, match="data holds more than 64 elements"):
        check_declared_shapes(body, None, digits, 32)


def test_a_large_body_within_what_the_model_accepts_is_left_to_the_parse():
    """Within max_rows inputs' numbers, the careful reading (as dear as the parse itself) is
    skipped; a wrong element count is still refused, by the decode."""
    from service.v2codec import check_declared_shapes

    heavy = TensorSpec(name="input", shape=[-1, 3, 128, 128])
    good = _large_body([1, 3, 128, 128], 3 * 128 * 128)
    check_declared_shapes(good, None, heavy, 32)
    spec = TensorSpec(name="input", shape=[-1, 3, 128, 128])
    assert input_array(decode(good, None, "heavy").inputs, spec).shape == (1, 3, 128, 128)
    wrong = _large_body([2, 3, 128, 128], 3 * 128 * 128)
    check_declared_shapes(wrong, None, heavy, 32)  # within the bound: the parse decides
    with pytest.raises(BadInput, match="98304 elements"):
        input_array(decode(wrong, None, "heavy").inputs, spec)


@pytest.mark.parametrize(
    "disguise",
    [
        lambda body: body.replace(b"]}]}", b", null]}]}"),  # a null among the numbers
        lambda body: body.replace(b'"data"', b'"d\\u0061ta"'),  # the key escaped
        lambda body: body[:-2],  # malformed: the closing brackets cut off
    ],
    ids=["null-in-data", "escaped-key", "malformed"],
)
def test_a_large_body_whose_values_the_cheap_reading_cannot_see_is_refused_before_its_parse(
    disguise,
):
    """More numbers than max_rows inputs hold, written so that the `data` reading misses them:
    the full parse would build them all (a 9 MB body cost 230 MB) only to fail. Refused first,
    with what to send; without the model's spec the parse decides as before."""
    from service.v2codec import check_declared_shapes

    digits = TensorSpec(name="input", shape=[-1, 1, 8, 8])
    body = disguise(_large_body([1, 1, 8, 8], 200_000))
    with pytest.raises(BadInput, match="malformed JSON|not all of them numbers"):
        check_declared_shapes(body, None, digits, 32)
    check_declared_shapes(body, None, None, 32)  # no spec: left to the parse
    with pytest.raises(BadInput):  # what the full parse and the data plane say of it
        input_array(decode(body, None, "digits").inputs, digits)


def test_a_large_valid_body_with_the_data_key_last_or_first_is_still_read():
    """The reading follows `data` wherever the key sits in its tensor."""
    from service.v2codec import check_declared_shapes

    heavy = TensorSpec(name="input", shape=[-1, 3, 128, 128])
    values = np.zeros(3 * 128 * 128).tolist()
    for tensor in (
        {"data": values, "name": "input", "shape": [1, 3, 128, 128], "datatype": "FP32"},
        {"name": "input", "shape": [1, 3, 128, 128], "datatype": "FP32", "data": values},
    ):
        body = json.dumps({"id": "a,b,c", "inputs": [tensor]}).encode()
        check_declared_shapes(body, None, heavy, 1)  # 1 row allowed: the bound is its size
