"""The int8 variant through the real `bnfold-serve` process: gRPC (tritonclient) and REST.

Two bundles: `digits` with its int8 variant (made as export makes it), and `broken`, the same
with one bit of quantized.onnx flipped. References: the int8 file run by onnxruntime here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bnfold.bundle import INT8_FILE
from tests.e2e.conftest import serving
from tests.service.test_int8 import int8_copy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def int8_dir(bundle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = int8_copy(bundle_src, tmp_path_factory.mktemp("int8-e2e"))
    shutil.copytree(root / "digits", root / "broken")
    raw = json.loads((root / "broken" / "bundle.json").read_text())
    raw["name"] = "broken"
    (root / "broken" / "bundle.json").write_text(json.dumps(raw))
    data = bytearray((root / "broken" / INT8_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "broken" / INT8_FILE).write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def urls(int8_dir: Path, tmp_path_factory) -> Iterator[tuple[str, str]]:
    log = tmp_path_factory.mktemp("int8-server") / "server.log"
    with serving(int8_dir, log) as served:
        yield served.url, served.grpc
    assert served.proc.returncode == 0, log.read_text()


def infer(grpc_url: str, model: str, x: np.ndarray, variant: str) -> np.ndarray:
    client = triton.InferenceServerClient(grpc_url)
    try:
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], parameters={"variant": variant}).as_numpy("logits")
    finally:
        client.close()


def test_grpc_int8_is_the_int8_file(urls, int8_dir, digit_batch):
    x = digit_batch[:4]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ref = ort.InferenceSession(str(int8_dir / "digits" / INT8_FILE), opts).run(None, {"input": x})
    # One request alone, same batch, same kernels: integer accumulation is exact.
    np.testing.assert_array_equal(infer(urls[1], "digits", x, "int8"), ref[0])


def test_a_corrupted_int8_file_is_refused_alone(urls, int8_dir, digit_batch):
    rest, grpc_url = urls
    x = digit_batch[:1]
    with pytest.raises(InferenceServerException) as info:
        infer(grpc_url, "broken", x, "int8")
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "variant 'int8' of model 'broken' is not served: " in info.value.message()
    assert "sha256 mismatch for the int8 model" in info.value.message()
    assert infer(grpc_url, "broken", x, "folded").shape == (1, 10)  # the others still served
    detail = httpx.get(f"{rest}/v1/models/broken").json()
    assert detail["status"] == "ready" and detail["variants"] == ["folded", "unfolded"]
    assert "sha256 mismatch" in detail["variant_errors"]["int8"]
    assert httpx.get(f"{rest}/v2/health/ready").status_code == 200
