"""service/grpc/codec.py's reading of typed FP32 contents: the packed field's own bytes read
at once give the same float32 array as reading the repeated field number by number (the
reference), and anything else (a count the shape does not take, other fields set) goes the
number-by-number way with its messages."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service.grpc import codec
from service.grpc import inference_pb2 as pb
from service.tensors import from_values, input_array


def _request(values, shape) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return pb.ModelInferRequest.FromString(request.SerializeToString())  # as received


@pytest.mark.parametrize("count", [1, 3, 31, 32, 33, 64, 3 * 128 * 128])
def test_packed_fp32_contents_read_at_once_equal_the_numbers_read_one_by_one(count):
    rng = np.random.default_rng(count)
    x = (rng.standard_normal(count) * 10 ** rng.uniform(-40, 38, count)).astype(np.float32)
    x[:3] = np.array([-0.0, 1e-45, 3.4e38], np.float32)[: min(3, count)]  # sign, subnormal, max
    request = _request(x.tolist(), [1, count])
    got = codec.decode(request).inputs[0]
    assert got.raw is not None  # the packed bytes were taken
    spec = TensorSpec(name="input", shape=[-1, count])
    fast = input_array([got], spec)
    tensor = request.inputs[0]
    reference = from_values("input", "FP32", [1, count], tensor.contents.fp32_contents, "c")
    np.testing.assert_array_equal(fast.view(np.uint32), reference.view(np.uint32))


def test_a_count_the_shape_does_not_take_keeps_its_message():
    request = _request([1.0, 2.0, 3.0], [1, 4])
    got = codec.decode(request).inputs[0]
    assert got.raw is None
    with pytest.raises(BadInput, match=r"\(4 elements\) but its contents.fp32_contents holds 3"):
        input_array([got], TensorSpec(name="input", shape=[-1, 4]))


def test_other_typed_fields_beside_fp32_are_refused_as_before():
    request = _request([1.0, 2.0], [1, 2])
    request.inputs[0].contents.int_contents.extend([1, 2])
    with pytest.raises(BadInput, match="not contents.int_contents"):
        codec.decode(request)
