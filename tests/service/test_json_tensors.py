"""service/json_tensors.py: a large V2 JSON body's flat `data` read by simdjson gives the very
request pydantic's path gives (same float32 bits, same fields), and everything else is left to
that path, whose answer (values or message) the client then gets unchanged.

The reference is the pydantic path itself (`json_tensors.READ_FROM` set past every body), and
each body is also decoded with the simdjson path forced on (READ_FROM 0), so small bodies test
it too."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput
from service import json_tensors
from service.tensors import input_array
from service.v2codec import decode

SPEC = TensorSpec(name="input", shape=[-1, 4])


def outcome(body: bytes, fast: bool, spec: TensorSpec = SPEC) -> tuple:
    """What the data plane would get from this body: ('array', dtype, shape, bits, the
    request's other fields) or ('refused', message)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_tensors, "READ_FROM", 0 if fast else 2**62)
        try:
            request = decode(body, None, "m")
            x = input_array(request.inputs, spec)
        except BadInput as exc:
            return ("refused", exc.message)
    fields = (request.id, request.variant, request.parameters,
              [(o.name, o.parameters) for o in request.outputs])  # fmt: skip
    return ("array", x.dtype.str, x.shape, x.view(np.uint32).tobytes(), fields)


def body_of(data, shape=(1, 4), **extra) -> bytes:
    tensor = {"name": "input", "shape": list(shape), "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def text_body(numbers: list[str], shape=None) -> bytes:
    """A body whose data array is written exactly as `numbers` says."""
    shape = shape or [1, len(numbers)]
    data = ", ".join(numbers)
    return (b'{"inputs": [{"name": "input", "shape": %s, "datatype": "FP32", "data": [%s]}]}'
            % (json.dumps(shape).encode(), data.encode()))  # fmt: skip


FINITE = st.one_of(
    st.floats(-10, 10),
    st.floats(-1e7, 1e7),  # what images and features hold
    st.floats(allow_nan=False, allow_infinity=False),
)
WRITTEN = st.sampled_from([repr, "{:.9g}".format, "{:.17e}".format, "{:.3e}".format,
                           lambda v: str(int(v)) if abs(v) < 2**53 else repr(v)])  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FINITE, WRITTEN), min_size=4, max_size=4))
def test_numbers_read_by_simdjson_are_the_bits_pydantic_reads(values):
    """Any finite double, written as clients write numbers (shortest repr, 9 or 17 significant
    digits, exponent form, integers): the same float32 input, bit for bit."""
    numbers = [write(v) for v, write in values]
    assert_read_alike(text_body(numbers, [1, 4]))


def assert_read_alike(body: bytes) -> None:
    """Both paths give the same outcome; a body with every number under 2**53 in magnitude is
    the simdjson path's to read (a larger one is pydantic's, see the module)."""
    numbers = json.loads(body)["inputs"][0]["data"]
    if all(abs(v) < 2**53 for v in numbers):
        assert json_tensors.read(body) is not None
    else:
        assert json_tensors.read(body) is None
    assert outcome(body, True) == outcome(body, False)


@pytest.mark.parametrize(
    "numbers",
    [
        ["1", "2", "3", "4"],  # integers alone: numpy casts them from int64
        ["-0", "-0.0", "0", "0e0"],
        ["1e-46", "-1e-46", "1.401298464324817e-45", "3.4028235677973366e38"],  # float32's ends
        ["3.4028235677973366e+38", "3.5e38", "-1e39", "1e308"],  # past float32: Inf, refused
        ["0.1", "0.2", "0.30000000000000004", "16777217"],
        ["9007199254740991", "-9007199254740991", "1", "2"],  # 2**53 - 1: exact in both
        ["1.00000005960464477539062", "1.0000000596046448", "1.00000017881393432617188", "7"],
    ],
)
def test_edge_numbers_read_alike(numbers):
    assert_read_alike(text_body(numbers))


LEFT_TO_PYDANTIC = [
    body_of([[1, 2], [3, 4]], (4,)),  # nested deeper than the shape
    body_of([[1, 2], [3, 4]]),  # nested as [2, 2] under the shape [1, 4]
    body_of([[1, 2, 3], [4]], (2, 2)),  # ragged
    body_of([[[1, 2], [3, 4]], [[5, 6]]], (2, 2, 2)),  # ragged above the innermost lists
    body_of([[[1, 2], [3, 4]], [[5, 6], [7, 8], [9, 0]]], (2, 2, 2)),
    body_of([[1, 2], [3, [4]]], (2, 2)),  # a list where a number should be
    body_of([[[1, 2]], [[3, 4]]], (2, 2)),
    body_of([[1, 2], [3, 4]], (2, 2), name="in[put"),  # a bracket in a string, nested data
    body_of([1, [2], 3, 4]),  # a list among numbers (flattened, it would look flat)
    body_of([[1], 2, 3, 4]),
    body_of([[], [1, 2], 3, 4]),
    body_of([1, 2, 3, True]),
    body_of([1, 2, 3, None]),
    body_of([1, 2, 3, "4"]),
    body_of([1, 2, 3, {"a": 4}]),
    text_body(["1", "2", "3", "9007199254740993"]),  # 2**53 + 1: int64 -> float32 rounds once
    text_body(["1", "2", "3", "18446744073709551615"]),
    text_body(["1", "2", "3", "123456789012345678901234567890"]),  # beyond 64 bits
    text_body(["1", "2", "3", "1e400"]),  # beyond float64
    text_body(["1", "2", "3", "01"]),  # not JSON numbers
    text_body(["1", "2", "3", "+1"]),
    text_body(["1", "2", "3", ".5"]),
    text_body(["1", "2", "3", "NaN"]),
    text_body(["1", "2", "3", "4", ""]),  # a trailing comma
    body_of([1, 2, 3, 4], id="a[b"),  # a bracket in a string: the flatness count cannot tell
    body_of([1, 2, 3, 4], parameters={"variant[": "folded"}),
    body_of([1, 2, 3, 4])[:-1] + b',"inputs": []}',  # a key twice (pydantic keeps the last)
    body_of([1, 2, 3, 4], id="a")[:-1] + b', "id": "b"}',
    body_of([1, 2, 3, 4]).replace(b'"datatype"', b'"datatype": "FP16", "datatype"'),
    body_of([1, 2, 3, 4]).replace(b'"data"', b'"data": [9, 9, 9, 9], "data"'),
    b'{"inputs": [{"name": "\\ud800", "shape": [1, 4], "datatype": "FP32", "data": [1,2,3,4]}]}',
    b'{"inputs": [1]}',
    b'{"inputs": {}}',
    b"[]",
    b'{"inputs": [',
    b"",
]


@pytest.mark.parametrize("body", LEFT_TO_PYDANTIC)
def test_anything_else_is_left_to_pydantic_and_answered_as_before(body):
    assert json_tensors.read(body) is None
    assert outcome(body, True) == outcome(body, False)


NESTED_AS_ALLOWED = [
    body_of([[1, 2], [3, 4]], (2, 2)),
    body_of([[1, 2, 3, 4]]),  # the shape's first dimension, the rest flat inside
    body_of([[[1, 2], [3, 4]]], (1, 2, 2)),
    body_of([[1, 2, 3, 4]], (1, 2, 2)),  # [1, 4]: the last two dimensions flattened
    body_of([[[0.5, -1e-3]], [[3, 4]]], (2, 1, 2)),
]


@pytest.mark.parametrize("body", NESTED_AS_ALLOWED)
def test_data_nested_as_its_shape_allows_is_read_by_simdjson_alike(body):
    assert json_tensors.read(body) is not None
    assert outcome(body, True) == outcome(body, False)


SHAPES = st.lists(st.integers(1, 3), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(SHAPES, st.data())
def test_any_nesting_reads_alike_and_the_allowed_ones_by_simdjson(shape, data):
    """Random shapes, each nested at a random depth as the data plane accepts (the leading
    dimensions, the rest flat inside), then maybe spoiled (an element dropped, a number put in
    a list, a list emptied): the allowed ones are the simdjson path's, and every one gets the
    same outcome from both paths."""
    depth = data.draw(st.integers(1, len(shape)))
    dims = [*shape[: depth - 1], math.prod(shape[depth - 1 :])]
    values = data.draw(st.lists(NUMBER, min_size=math.prod(shape), max_size=math.prod(shape)))
    nested = np.array(values, dtype=object).reshape(dims).tolist()
    spoil = data.draw(st.sampled_from(["none", "drop", "wrap", "empty"]))
    if spoil != "none":
        inner = nested
        while inner and isinstance(inner[-1], list):
            inner = inner[-1]
        if spoil == "drop":
            inner.pop()
        elif spoil == "wrap":
            inner[-1] = [inner[-1]]
        else:
            inner.clear()
    tensor = {"name": "input", "shape": shape, "datatype": "FP32", "data": nested}
    body = json.dumps({"inputs": [tensor]}).encode()
    if spoil == "none" and all(abs(v) < 2**53 for v in values):
        assert json_tensors.read(body) is not None
    assert outcome(body, True) == outcome(body, False)


@pytest.mark.parametrize(
    "body",
    [
        body_of([1, 2, 3, 4], id="42", parameters={"variant": "unfolded", "x": [1, [2]]},
                outputs=[{"name": "logits", "parameters": {"classification": 2}}]),
        body_of([1, 2, 3, 4], id=7),  # refused by the same validation, with the same message
        body_of([1, 2, 3, 4])[:-1] + b', "parameters": {"variant": "unfolded", "variant": "x"}}',
        body_of([1, 2, 3, 4])[:-1] + b', "parameters": {"variant": "x", "variant": "unfolded"}}',
        body_of([1, 2, 3], (1, 4)),
        body_of([1, 2, 3, 4, 5, 6, 7, 8], (2, 4)),
        body_of([1, 2, 3, 4], (1, 2, 2)),
        body_of([], (0, 4)),
        body_of([1, 2, 3, 4], outputs=[{"name": "logits"}, {"name": "logits"}]),
        json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                "data": [1, 2, 3, 4]}, {"name": "input2", "shape": [1],
                                "datatype": "FP32", "data": [5]}]}).encode(),
        json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                "data": [1, 2, 3, 4], "parameters": {"binary_data_size": 16}}]}
                   ).encode(),
        json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP16",
                                "data": [1, 2, 3, 4]}]}).encode(),
        "{\"inputs\": [{\"name\": \"é\", \"shape\": [1, 4], \"datatype\": \"FP32\", "
        "\"data\": [1, 2, 3, 4]}], \"id\": \"😀\"}".encode(),
    ],
)  # fmt: skip
def test_the_rest_of_a_request_read_by_simdjson_is_validated_as_before(body):
    """Names, shapes, parameters and outputs go through the same pydantic model: the same
    fields, or the same refusal."""
    assert outcome(body, True) == outcome(body, False)


def test_a_large_request_is_read_by_simdjson_and_gives_the_same_input():
    """What READ_FROM is for: a 3x128x128 image as clients send it (float32 values written as
    their shortest float64 repr), read by simdjson without any fallback."""
    x = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    body = body_of(x.ravel().tolist(), x.shape)
    assert len(body) >= json_tensors.READ_FROM
    request = json_tensors.read(body)
    assert request is not None and request.inputs[0].data.dtype == np.float64
    spec = TensorSpec(name="input", shape=[-1, 3, 128, 128])
    fast, slow = outcome(body, True, spec), outcome(body, False, spec)
    assert fast[0] == "array" and fast == slow
    assert fast[3] == x.view(np.uint32).tobytes()  # float32 -> shortest repr -> float32: exact


def test_a_request_with_many_keys_or_inputs_is_left_to_pydantic():
    """Each key lookup in simdjson's object walks it, and each input is read through its
    objects: a request with more keys or inputs than a request for these models uses goes to
    pydantic, so a hostile one costs what it did before."""
    many = {f"k{i}": i for i in range(json_tensors.MAX_KEYS + 1)}
    assert json_tensors.read(body_of([1, 2, 3, 4], **many)) is None
    assert json_tensors.read(body_of([1, 2, 3, 4], **dict(list(many.items())[:10]))) is not None
    tensor = json.loads(body_of([1, 2, 3, 4]))["inputs"][0]
    for count, read in ((json_tensors.MAX_INPUTS, True), (json_tensors.MAX_INPUTS + 1, False)):
        body = json.dumps({"inputs": [tensor] * count}).encode()
        assert (json_tensors.read(body) is not None) is read


def test_reading_needs_no_python_float_per_element():
    """The point of the module: the numbers arrive as one float64 array."""
    request = json_tensors.read(body_of([0.5] * 4096, (1024, 4)))
    assert request is not None
    data = request.inputs[0].data
    assert isinstance(data, np.ndarray) and data.dtype == np.float64 and data.shape == (4096,)
    assert math.isclose(float(data.sum()), 2048.0)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), FINITE, st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
DATA = st.one_of(
    st.lists(FINITE, min_size=0, max_size=9),
    st.lists(st.one_of(FINITE, st.integers(-(2**64), 2**64)), max_size=9),
    st.lists(st.lists(FINITE, max_size=4), max_size=3),
    JSON_VALUES,
)
TENSOR = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "x", "in[put", 7]),
     "shape": st.one_of(st.just([1, 4]), st.just([2, 2]), st.lists(st.integers(-1, 5), max_size=3)),
     "datatype": st.sampled_from(["FP32", "FP16", "INT8", None]),
     "data": DATA},
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "a", "["]),
                                             SCALARS, max_size=2)},
)  # fmt: skip
NUMBER = st.one_of(FINITE, st.integers(-(2**60), 2**60))
GOOD_TENSOR = st.fixed_dictionaries(  # one the model takes, most of the time
    {"name": st.just("input"), "shape": st.sampled_from([[1, 4], [2, 4], [4]]),
     "datatype": st.just("FP32"), "data": st.lists(NUMBER, min_size=4, max_size=8)},
    optional={"parameters": st.dictionaries(st.sampled_from(["a", "b"]), SCALARS, max_size=2)},
)  # fmt: skip
REQUEST = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(GOOD_TENSOR, min_size=1, max_size=1),
                         st.lists(TENSOR, min_size=1, max_size=2), JSON_VALUES)},
    optional={"id": st.one_of(st.text(max_size=5), SCALARS),
              "parameters": st.dictionaries(st.sampled_from(["variant", "binary_data_output",
                                                             "x"]), SCALARS, max_size=2),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "p"])}),
                                  max_size=2),
              "extra": JSON_VALUES},
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(REQUEST)
def test_any_request_gets_the_same_answer_from_both_paths(request):
    """Requests of every shape (right and wrong types, nested or odd data, big integers,
    brackets in names, extra keys): the same input bits or the same refusal."""
    body = json.dumps(request).encode()
    assert outcome(body, True) == outcome(body, False)
