"""End to end: the real `bnfold-serve` process over loopback HTTP, with httpx and tritonclient.

Reference: the bundle's ONNX run directly by onnxruntime on the same preprocessed tensor. The
requests go one at a time, so the batcher runs each alone, and the logits must match bit for bit.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MAX_BODY_BYTES
from tests.pinned import pinned_direct

pytestmark = pytest.mark.e2e


def test_predict_a_digit_png(server, digits, direct, digit_batch):
    zero = digits[0]  # a clear, upright "0"
    r = httpx.post(f"{server}/v1/models/digits/predict",
                   files={"files": ("zero.png", zero.png, "image/png")})  # fmt: skip
    assert r.status_code == 200
    pred = r.json()["predictions"][0]
    assert pred["label"] == str(zero.label) == "0"
    assert pred["index"] == int(direct.logits(digit_batch[:1]).argmax())


def test_bad_input_is_400_and_the_server_keeps_serving(server, digits):
    r = httpx.post(f"{server}/v1/models/digits/predict", content=digits[0].png[:40],
                   headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"].startswith("image: ")
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_a_body_over_the_limit_gets_413_not_a_dropped_connection(server):
    r = httpx.post(f"{server}/v1/models/digits/predict", content=b"\0" * (MAX_BODY_BYTES + 1),
                   headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 413
    assert r.json()["error"].startswith(f"request body is {MAX_BODY_BYTES + 1} bytes, over the")


@pytest.fixture(scope="module")
def direct(bundle_src):
    """The reference at the server's intra-op thread count (BNFOLD_THREADS=1, tests/pinned.py)."""
    return pinned_direct(bundle_src)


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_equals_onnxruntime(triton_client, direct, digit_batch, binary):
    x = digit_batch[:8]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = triton_client.infer("digits", [inp], outputs=[out], request_id="e2e")
    assert result.get_response()["id"] == "e2e"
    assert np.array_equal(result.as_numpy("logits"), direct.logits(x, "folded"))


def test_tritonclient_defaults_and_the_unfolded_variant(triton_client, direct, digit_batch):
    x = digit_batch[8:11]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary input; no outputs named: binary_data_output=true
    result = triton_client.infer("digits", [inp], parameters={"variant": "unfolded"})
    assert np.array_equal(result.as_numpy("logits"), direct.logits(x, "unfolded"))


def test_tritonclient_metadata_and_errors(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits")
    meta = triton_client.get_model_metadata("digits")
    assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    inp = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model 'cats'"):
        triton_client.infer("cats", [inp])
