"""The int8 variant over HTTP: metadata, V2 infer, /v1 predict and compare, and the refusals.

The bundle is a copy of the shipped one with an int8 variant made here exactly as export makes it
(bnfold.toolchain.int8.add_int8_variant on the digits splits); references are onnxruntime
sessions of the test's own on the bundle's files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.bundle import INT8_FILE, read_manifest
from bnfold.toolchain.int8 import Int8Options, Int8Request, add_int8_to_bundle
from training.data import load_digits_dataset, stratified_split

V2_INFER = "/v2/models/digits/infer"


def add_int8(bundle: Path) -> None:
    """Quantize the bundle's folded.onnx as export does and list quantized.onnx."""
    splits = stratified_split(load_digits_dataset(), seed=0)
    request = Int8Request(Int8Options(), splits.train.x, "digits train split", splits.test.y)
    report = add_int8_to_bundle(bundle, request, splits.test.x, "test")
    assert report.passed, report.reason


def without_int8(bundle: Path) -> None:
    raw = json.loads((bundle / "bundle.json").read_text())
    raw["files"].pop("int8", None)
    raw["equivalence"].pop("int8", None)
    (bundle / "bundle.json").write_text(json.dumps(raw))
    (bundle / INT8_FILE).unlink(missing_ok=True)


def int8_copy(bundle_src: Path, root: Path) -> Path:
    """root/digits: the shipped bundle with an int8 variant made here, from these tests' data."""
    shutil.copytree(bundle_src, root / "digits")
    without_int8(root / "digits")
    add_int8(root / "digits")
    return root


@pytest.fixture(scope="module")
def int8_models(bundle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return int8_copy(bundle_src, tmp_path_factory.mktemp("int8-models"))


@pytest.fixture(scope="module")
def int8_client(int8_models: Path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    with TestClient(create_app(Settings(models_dir=int8_models, provider="cpu"))) as c:
        yield c


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The int8 file in a session of our own (full optimization, as it is served)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def v2_body(x: np.ndarray, variant: str) -> dict:
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return {"inputs": [tensor], "parameters": {"variant": variant}}


def test_metadata_lists_int8_with_its_settings(int8_client, int8_models):
    detail = int8_client.get("/v1/models/digits").json()
    assert detail["variants"] == ["folded", "unfolded", "int8"] and detail["variant_errors"] == {}
    f = detail["files"]["int8"]
    manifest = read_manifest(int8_models / "digits")
    assert f["path"] == INT8_FILE and f["graph_optimization"] == "ORT_ENABLE_ALL"
    assert f["quantization"] == manifest.files["int8"].quantization.model_dump()
    assert f["quantization"]["settings"]["calibration_method"] == "minmax"
    eq = int8_client.get("/v1/models/digits/equivalence").json()
    assert eq["int8"]["passed"] is True and eq["int8"]["min_top1_agreement"] == 0.99


def test_v2_infer_runs_the_int8_file(int8_client, int8_models, digit_batch):
    x = digit_batch[:5]
    r = int8_client.post(V2_INFER, json=v2_body(x, "int8"))
    assert r.status_code == 200 and r.json()["parameters"] == {"variant": "int8"}
    out = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(5, 10)
    # Same file, same kernels, same batch: integer accumulation is exact, the float rescale is
    # elementwise; 1e-5 leaves room only for a different thread split of the float ops.
    np.testing.assert_allclose(out, reference(int8_models / "digits" / INT8_FILE, x), atol=1e-5)


def test_predict_int8(int8_client, int8_models, digits, digit_batch):
    files = [("files", (f"d{i}.png", d.png, "image/png")) for i, d in enumerate(digits[:8])]
    r = int8_client.post("/v1/models/digits/predict?variant=int8", files=files)
    assert r.status_code == 200 and r.json()["variant"] == "int8"
    ref = reference(int8_models / "digits" / INT8_FILE, digit_batch[:8])
    assert [p["index"] for p in r.json()["predictions"]] == ref.argmax(1).tolist()


def test_compare_shows_int8_beside_folded_and_unfolded(int8_client, int8_models, digits):
    files = [("files", (f"d{i}.png", d.png, "image/png")) for i, d in enumerate(digits[:10])]
    body = int8_client.post("/v1/models/digits/compare", files=files).json()
    assert len(body["folded"]) == len(body["unfolded"]) == len(body["int8"]["predictions"]) == 10
    int8 = body["int8"]
    folded_top = [p["index"] for p in body["folded"]]
    int8_top = [p["index"] for p in int8["predictions"]]
    assert int8["top1_agreement"] == np.mean(np.equal(folded_top, int8_top))
    assert int8["min_top1_agreement"] == 0.99 and body["int8_note"] is None
    report = read_manifest(int8_models / "digits").equivalence.int8
    assert int8["export_top1_agreement"] == report.int8_vs_folded.top1_agreement
    assert 0 < int8["max_abs_diff"] < 1.0  # int8 differs from float32, by 8-bit steps


def test_a_bundle_without_int8_serves_as_before(serve, int8_models, tmp_path, digits):
    shutil.copytree(int8_models / "digits", tmp_path / "digits")
    without_int8(tmp_path / "digits")
    client = serve(tmp_path)
    assert client.get("/v1/models/digits").json()["variants"] == ["folded", "unfolded"]
    files = [("files", ("d.png", digits[0].png, "image/png"))]
    r = client.post("/v1/models/digits/predict?variant=int8", files=files)
    assert r.status_code == 400
    assert r.json() == {"error": "model 'digits' has no int8 variant (export it with --quantize "
                        "int8); use 'folded' or 'unfolded'"}  # fmt: skip
    zero = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}
    r = client.post(V2_INFER, json={"inputs": [zero], "parameters": {"variant": "int8"}})
    assert r.status_code == 400 and r.json()["error"].startswith("model 'digits' has no int8 ")
    body = client.post("/v1/models/digits/compare", files=files).json()
    assert body["int8"] is None
    assert body["int8_note"] == "the bundle has no int8 variant (export with --quantize int8)"


def test_a_corrupted_int8_file_costs_only_that_variant(serve, int8_models, tmp_path, digits):
    shutil.copytree(int8_models / "digits", tmp_path / "digits")
    path = tmp_path / "digits" / INT8_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    client = serve(tmp_path)
    assert client.get("/v2/health/ready").status_code == 200
    detail = client.get("/v1/models/digits").json()
    assert detail["status"] == "ready" and detail["variants"] == ["folded", "unfolded"]
    why = detail["variant_errors"]["int8"]
    assert why.startswith(f"{path}: sha256 mismatch for the int8 model")
    files = [("files", ("d.png", digits[0].png, "image/png"))]
    r = client.post("/v1/models/digits/predict?variant=int8", files=files)
    assert r.status_code == 503
    assert r.json()["error"] == (
        f"variant 'int8' of model 'digits' is not served: {why}; use 'folded' or 'unfolded'"
    )
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert client.post(V2_INFER, json=v2_body(x, "int8")).status_code == 503
    assert client.post(V2_INFER, json=v2_body(x, "folded")).status_code == 200
    body = client.post("/v1/models/digits/compare", files=files).json()
    assert body["int8"] is None and body["int8_note"] == why
