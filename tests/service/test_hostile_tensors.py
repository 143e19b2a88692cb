"""V2 tensors a hostile or careless client sends: each is a 4xx with the reason, never a 500, and
the server answers the next ordinary request as before.

Found by sending them to a running `bnfold-serve`; each case here failed (500, or a silently
wrong answer) before its fix.
"""

from __future__ import annotations

import numpy as np
import pytest

INFER = "/v2/models/digits/infer"
ZERO = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}


def infer(client, **tensor):
    return client.post(INFER, json={"inputs": [{**ZERO, **tensor}]})


def assert_still_serving(client, direct):
    r = infer(client)
    assert r.status_code == 200
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    assert np.array_equal(got, direct.logits(np.zeros((1, 1, 8, 8), np.float32)))


@pytest.mark.parametrize(
    ("shape", "shown"),
    [
        # more dimensions than numpy has (64); a long shape comes back cut
        ([1] * 100, "[1, 1, 1, 1, 1, 1, 1, 1, ... (100 in all)]"),
        # 0 elements, but no array of that shape can exist
        ([2**31 - 1] * 3 + [0], "[2147483647, 2147483647, 2147483647, 0]"),
        ([2**31 - 1] * 40 + [0], "[" + "2147483647, " * 8 + "... (41 in all)]"),
    ],
)
def test_shapes_no_array_can_have_are_400_naming_the_models_shape(client, direct, shape, shown):
    data = [0.0] * (0 if 0 in shape else 1)
    r = infer(client, shape=shape, data=data)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"input 'input' must have shape ['N', 1, 8, 8], got {shown}"
    assert_still_serving(client, direct)


def test_binary_data_with_an_impossible_empty_shape_is_400(client, direct):
    head = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2147483647, 2147483647,'
    head += b' 2147483647, 0], "parameters": {"binary_data_size": 0}}]}'
    r = client.post(
        INFER, content=head, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("input 'input' must have shape ['N', 1, 8, 8], got [")
    assert_still_serving(client, direct)


def test_data_nested_otherwise_than_the_shape_is_400_not_reshaped(client, direct):
    """An NHWC-nested image ([1, 8, 8, 1]) under an NCHW shape has the right element count:
    reshaping it would answer for other pixels than the client meant."""
    nhwc = np.zeros((1, 8, 8, 1)).tolist()
    r = infer(client, data=nhwc)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == (
        "input 'input': data is nested as [1, 8, 8, 1] but the shape is [1, 1, 8, 8]: nest it "
        "as the shape (row-major), or send it flat"
    )
    assert_still_serving(client, direct)


@pytest.mark.parametrize("nesting", [(64,), (1, 64), (1, 1, 64), (1, 1, 8, 8)])
def test_data_flat_or_nested_as_the_leading_dimensions_is_served(client, direct, nesting):
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    r = infer(client, data=x.reshape(nesting).tolist())
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    assert np.array_equal(got, direct.logits(x))


def test_a_long_model_name_comes_back_cut(client):
    """Errors repeat what the client sent, cut after 80 characters (see the gRPC corpus: a
    status message past the client's 8 KiB metadata limit never arrives)."""
    long = "m" * 10000
    r = client.post(f"/v2/models/{long}/infer", json={"inputs": [ZERO]})
    assert r.status_code == 404
    assert r.json()["error"] == (
        f"unknown model '{long[:79]}... (10000 characters); models served here: digits"
    )
    r = client.post(INFER, json={"inputs": [ZERO], "parameters": {"variant": long}})
    assert r.status_code == 400
    assert r.json()["error"].startswith(f"unknown variant '{long[:79]}... (10000 characters); use")


SHM_IN = (
    "input 'input' names a shared memory region; this server has no shared memory extension: "
    "send it as data or binary tensor data"
)
SHM_OUT = (
    "output 'logits' names a shared memory region; this server has no shared memory extension: "
    "leave its shared_memory_region out: outputs come back in the response"
)


def test_shared_memory_tensors_are_refused_not_ignored(client, direct):
    """tritonclient's set_shared_memory: an input was 'neither data nor binary_data_size';
    an output region was ignored and answered in the body, the client reading its region."""
    region = {"shared_memory_region": "out0", "shared_memory_byte_size": 40}
    r = client.post(
        INFER, json={"inputs": [ZERO], "outputs": [{"name": "logits", "parameters": region}]}
    )
    assert r.status_code == 400 and r.json() == {"error": SHM_OUT}
    shm_input = {k: v for k, v in ZERO.items() if k != "data"}
    shm_input["parameters"] = {"shared_memory_region": "in0", "shared_memory_byte_size": 256}
    r = client.post(INFER, json={"inputs": [shm_input]})
    assert r.status_code == 400 and r.json() == {"error": SHM_IN}
    assert_still_serving(client, direct)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"parameters": {"headers": {"a": 1}}, "inputs": [ZERO]}, "parameters.headers"),
        ({"inputs": [{**ZERO, "parameters": {"x": None}}]}, "inputs.0.parameters.x"),
        ({"inputs": [ZERO], "outputs": [{"name": "logits", "parameters": {"b": [1]}}]},
         "outputs.0.parameters.b"),
    ],
)  # fmt: skip
def test_a_parameter_value_of_another_type_is_one_line_saying_which_types(client, body, where):
    """It was four: '.bool: Input should be a valid boolean; .int: ... (and 1 more)'."""
    r = client.post(INFER, json=body)
    assert r.status_code == 400
    assert r.json() == {"error": f"invalid inference request: {where}: must be a string, a "
                        "number or a boolean (a parameter value)"}  # fmt: skip


def test_an_output_requested_twice_is_400_before_anything_runs(client, direct):
    """The answer carried one copy of the logits per name: 300,000 names in a 6 MB request
    grew the real server past 11 GB and froze its event loop (liveness timed out)."""
    x = {**ZERO, "shape": [32, 1, 8, 8], "data": [0.0] * 64 * 32}
    r = client.post(INFER, json={"inputs": [x], "outputs": [{"name": "logits"}] * 1000})
    assert r.status_code == 400
    assert r.json() == {
        "error": "output 'logits' is requested more than once: name each output once"
    }
    r = client.post(INFER, json={"inputs": [ZERO], "outputs": [{"name": "logits"}]})
    assert r.status_code == 200 and len(r.json()["outputs"]) == 1
    assert_still_serving(client, direct)
