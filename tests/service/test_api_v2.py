"""service/api/v2.py over HTTP: the Open Inference Protocol, JSON and binary, and its refusals.

Reference: the bundle's ONNX run directly by onnxruntime on the same tensor, at the same batch
and graph optimization level, so logits must match bit for bit (no float tolerance).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SERVED_VARIANTS

INFER = "/v2/models/digits/infer"


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32", nested=False) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": data}


def binary_request(x: np.ndarray, **extra) -> tuple[bytes, dict]:
    raw = x.astype("<f4").tobytes()
    inp = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
           "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    head = json.dumps({"inputs": [inp], **extra}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def logits_of(response) -> np.ndarray:
    out = response.json()["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32"
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "bnfold" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_versions(client):
    expected = {
        "name": "digits",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get("/v2/models/digits").json() == expected
    assert client.get("/v2/models/digits/versions/1").json() == expected
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert client.get("/v2/models/digits/versions/1/ready").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("get", "/v2/models/cats", "unknown model 'cats'; models served here: digits"),
        ("get", "/v2/models/cats/ready", "unknown model 'cats'; models served here: digits"),
        ("post", "/v2/models/cats/infer", "unknown model 'cats'; models served here: digits"),
        ("get", "/v2/models/digits/versions/2", "model 'digits' has no version '2'; it has '1'"),
        ("get", "/v2/models/digits/versions/2/ready", "model 'digits' has no version '2'"),
        ("post", "/v2/models/digits/versions/2/infer", "model 'digits' has no version '2'"),
    ],
)
def test_unknown_model_or_version_is_404(client, method, path, message):
    r = client.request(method, path, json={"inputs": []})
    assert r.status_code == 404
    assert r.json()["error"].startswith(message)


@pytest.mark.parametrize("nested", [False, True])
def test_json_infer_equals_direct_onnxruntime_bit_for_bit(client, direct, digit_batch, nested):
    x = digit_batch[:7]
    r = client.post(INFER, json={"id": "r1", "inputs": [tensor(x, nested=nested)]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("digits", "1", "r1")
    assert body["parameters"] == {"variant": "folded"}
    assert np.array_equal(logits_of(r), direct.logits(x, "folded"))


def test_variant_parameter_runs_the_unfolded_model(client, direct, digit_batch):
    x = digit_batch[:5]
    r = client.post(INFER, json={"parameters": {"variant": "unfolded"}, "inputs": [tensor(x)]})
    assert r.json()["parameters"] == {"variant": "unfolded"}
    assert np.array_equal(logits_of(r), direct.logits(x, "unfolded"))


def test_binary_request_and_binary_response(client, direct, digit_batch):
    x = digit_batch[:9]
    body, headers = binary_request(x, parameters={"binary_data_output": True})
    r = client.post("/v2/models/digits/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:length])
    assert header["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [9, 10],
                                  "parameters": {"binary_data_size": 360}}]  # fmt: skip
    logits = np.frombuffer(r.content[length:], "<f4").reshape(9, 10)
    assert np.array_equal(logits, direct.logits(x, "folded"))


def test_binary_request_with_json_output(client, direct, digit_batch):
    x = digit_batch[:2]
    body, headers = binary_request(
        x, outputs=[{"name": "logits", "parameters": {"binary_data": False}}]
    )
    r = client.post(
        INFER, content=body, headers={**headers, "content-type": "application/octet-stream"}
    )
    assert "Inference-Header-Content-Length" not in r.headers
    assert np.array_equal(logits_of(r), direct.logits(x, "folded"))


def nan_json_body() -> bytes:
    data = ", ".join(["NaN"] + ["0.0"] * 63)  # Python's json and tritonclient write NaN this way
    return (
        b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        b'"data": [' + data.encode() + b"]}]}"
    )


ZERO = np.zeros((1, 1, 8, 8), np.float32)
BAD_JSON = [
    ({"inputs": [tensor(ZERO[..., :7])]},
     "input 'input' must have shape ['N', 1, 8, 8], got [1, 1, 8, 7]"),
    ({"inputs": [tensor(ZERO, datatype="FP64")]},
     "input 'input' has datatype FP64; this model takes FP32"),
    ({"inputs": [{**tensor(ZERO), "data": [0.0] * 60}]},
     "input 'input' has shape [1, 1, 8, 8] (64 elements) but its data holds 60 elements"),
    ({"inputs": [tensor(ZERO, name="image")]},
     "this model takes one input named 'input'; the request has ['image']"),
    ({"inputs": [tensor(ZERO)], "parameters": {"variant": "half"}},
     f"unknown variant 'half'; use {SERVED_VARIANTS}"),
    ({"inputs": [tensor(ZERO)], "outputs": [{"name": "probabilities"}]},
     "unknown output 'probabilities'; this model has outputs ['logits']"),
    ({"inputs": [{**tensor(ZERO), "datatype": "FP33"}]},
     "invalid inference request: inputs.0.datatype: Input should be 'BOOL'"),
    ({"inputs": [{**tensor(ZERO), "shape": [0, 2**63], "data": []}]},
     "input 'input': shape [0, 9223372036854775808] has a dimension over 2147483647"),
    ({"inputs": [tensor(np.zeros((33, 1, 8, 8), np.float32))]},
     "33 images in one request, over the limit of 32: split the batch"),
    ({"inputs": [{**tensor(ZERO), "shape": [], "data": [0.5]}]},  # rank 0: named as sent
     "input 'input' must have shape ['N', 1, 8, 8], got []"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "message"), BAD_JSON)
def test_bad_json_tensors_are_4xx_with_the_reason(client, payload, message):
    r = client.post(INFER, json=payload)
    assert r.status_code == (413 if "over the limit" in message else 400)
    assert r.json()["error"].startswith(message)


def test_nan_or_inf_values_are_400(client):
    r = client.post(INFER, content=nan_json_body(), headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json() == {"error": "input 'input' holds 1 NaN or Inf value(s), the first at index "
                                 "[0, 0, 0, 0]: send finite FP32 values"}  # fmt: skip
    x = ZERO.copy()
    x[0, 0, 3, 4] = np.inf
    r = client.post(INFER, content=binary_request(x)[0], headers=binary_request(x)[1])
    assert r.status_code == 400 and "the first at index [0, 0, 3, 4]" in r.json()["error"]


def test_malformed_json_is_400(client):
    r = client.post(
        INFER, content=b'{"inputs": [{"name": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith("malformed JSON in the inference request: Invalid JSON")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({"content-type": "text/plain"}, 415,
         "unsupported Content-Type text/plain: send application/json"),
        ({"content-type": "application/json", "content-encoding": "gzip"}, 415,
         "Content-Encoding 'gzip' is not supported: send the body uncompressed"),
        ({"Inference-Header-Content-Length": "ten"}, 400,
         "invalid request: header.Inference-Header-Content-Length: Input should be a valid"),
        ({"Inference-Header-Content-Length": "5000"}, 400,
         "Inference-Header-Content-Length is 5000"),
    ],
)  # fmt: skip
def test_bad_headers_are_refused(client, headers, status, message):
    r = client.post(INFER, content=json.dumps({"inputs": [tensor(ZERO)]}), headers=headers)
    assert r.status_code == status
    assert r.json()["error"].startswith(message)


def test_binary_size_mismatch_is_400(client):
    body, headers = binary_request(ZERO)
    r = client.post(INFER, content=body[:-4], headers=headers)
    assert r.status_code == 400
    assert r.json()["error"] == (
        "the body carries 252 bytes of binary tensor data after the JSON header, "
        "but the inputs' binary_data_size add up to 256"
    )


def test_finite_input_that_overflows_the_model_is_400_not_nan_json(client):
    """3e38 is a finite FP32 value, but the model's arithmetic overflows to NaN/Inf: answering
    them would be invalid JSON (bare NaN), so the server refuses with the reason."""
    x = np.full((1, 1, 8, 8), 3e38, np.float32)
    r = client.post(INFER, json={"inputs": [tensor(x)]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("the model's output is not finite for input row(s) [0]")
    r = client.post("/v1/models/digits/compare", json={"inputs": [tensor(x)]})
    assert r.status_code == 400 and "not finite" in r.json()["error"]


def test_health_answers_head_for_load_balancers(client):
    assert client.head("/v2/health/live").status_code == 200
    assert client.head("/v2/health/ready").status_code == 200
