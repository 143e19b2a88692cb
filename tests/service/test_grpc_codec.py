"""service/grpc/codec.py's reading of typed FP32 contents: the packed field's own bytes read
at once give the same float32 array as reading the repeated field number by number (the
reference), and anything else (a count the shape does not take, other fields set) goes the
number-by-number way with its messages.

Run in a child process of this module's own, as tests/service/test_grpc_servicer.py explains:
the server's generated code and tritonclient's (the e2e tests' client, in this pytest process)
define the same `inference.*` protobuf symbols. The child returns plain data."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()
        yield pool


def _request(values, shape, int_values=()):
    from service.grpc import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    tensor.contents.int_contents.extend(int_values)
    return pb.ModelInferRequest.FromString(request.SerializeToString())  # as received


def _read(values: list[float], shape: list[int], int_values=()) -> tuple:
    """(took the packed bytes, the array or the refusal, the number-by-number reference)."""
    from bnfold.bundle import TensorSpec
    from bnfold.errors import BadInput
    from service.grpc import codec
    from service.tensors import from_values, input_array

    request = _request(values, shape, int_values)
    try:
        got = codec.decode(request).inputs[0]
        array = input_array([got], TensorSpec(name="input", shape=[-1, *shape[1:]]))
    except BadInput as exc:
        return None, exc.message, None
    field = request.inputs[0].contents.fp32_contents
    reference = from_values("input", "FP32", shape, field, "contents.fp32_contents")
    return got.raw is not None, array, reference


@pytest.mark.parametrize("count", [1, 3, 31, 32, 33, 64, 3 * 128 * 128])
def test_packed_fp32_contents_read_at_once_equal_the_numbers_read_one_by_one(child, count):
    rng = np.random.default_rng(count)
    x = (rng.standard_normal(count) * 10 ** rng.uniform(-40, 38, count)).astype(np.float32)
    x[:3] = np.array([-0.0, 1e-45, 3.4e38], np.float32)[: min(3, count)]  # sign, subnormal, max
    packed, array, reference = child.submit(_read, x.tolist(), [1, count]).result(timeout=120)
    assert packed  # the packed bytes were taken
    np.testing.assert_array_equal(array.view(np.uint32), reference.view(np.uint32))
    np.testing.assert_array_equal(array.ravel().view(np.uint32), x.view(np.uint32))


def test_a_count_the_shape_does_not_take_keeps_its_message(child):
    _, message, _ = child.submit(_read, [1.0, 2.0, 3.0], [1, 4]).result(timeout=120)
    assert "(4 elements) but its contents.fp32_contents holds 3" in message


def test_other_typed_fields_beside_fp32_are_refused_as_before(child):
    _, message, _ = child.submit(_read, [1.0, 2.0], [1, 2], [1, 2]).result(timeout=120)
    assert "not contents.int_contents" in message


def _decode_message(count: int, shape: list[int]) -> str | None:
    from bnfold.errors import BadInput
    from service.grpc import codec

    try:
        codec.decode(_request(np.zeros(count, np.float32), shape))
    except BadInput as exc:
        return exc.message
    return None


def test_a_count_the_shape_does_not_take_is_refused_by_the_decode_itself(child):
    """2.5 million numbers for 64: refused as the message is read, before a list of them is
    built (the data plane's reading took a second of the event loop and 30 MB per call)."""
    message = child.submit(_decode_message, 2_500_000, [1, 1, 8, 8]).result(timeout=120)
    assert message is not None
    assert "(64 elements) but its contents.fp32_contents holds 2500000 elements" in message
