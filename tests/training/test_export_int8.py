"""`export_bundle(..., int8=...)`: the int8 variant is written, described and measured, or
refused with its reason; checked with onnxruntime sessions of the test's own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.bundle import INT8_FILE, read_manifest, sha256_file
from bnfold.toolchain.int8 import Int8Options, Int8Request
from bnfold.toolchain.verify import verify_bundle
from tests.training.conftest import export_small


def logits(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0].astype(np.float64)


def export(model, splits, out, calibration: np.ndarray):
    request = Int8Request(Int8Options(), calibration, "digits train split", splits.test.y)
    return export_small(model, splits, out, request)


@pytest.fixture(scope="module")
def int8_bundle(small_model, digits_splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return export(small_model, digits_splits, out, digits_splits.train.x)


def test_int8_file_is_listed_with_checksum_counts_and_settings(int8_bundle):
    m = read_manifest(int8_bundle)
    entry = m.files["int8"]
    assert entry.path == INT8_FILE and entry.sha256 == sha256_file(int8_bundle / INT8_FILE)
    assert entry.batchnorm_nodes == 0
    q = entry.quantization
    assert q.settings.calibration_images == 256 and q.settings.calibration_method == "minmax"
    assert q.settings.calibration_source == "digits train split (256 images)"
    assert q.nodes.float_ops == {} and q.nodes.int8_kernels["QLinearConv"] == 3
    assert q.nodes.quantize_linear > 0 and q.nodes.dequantize_linear > q.nodes.quantize_linear


def test_int8_report_is_what_an_independent_run_measures(int8_bundle, digits_splits):
    r = read_manifest(int8_bundle).equivalence.int8
    x, y = digits_splits.test.x, digits_splits.test.y
    a, ref = logits(int8_bundle / INT8_FILE, x), logits(int8_bundle / "folded.onnx", x)
    assert r.passed and r.reason is None and r.n_images == len(x) == 359
    assert r.int8_vs_folded.max_abs_diff == pytest.approx(np.abs(a - ref).max(), rel=1e-9)
    assert r.int8_vs_folded.top1_agreement == np.mean(a.argmax(1) == ref.argmax(1)) >= 0.99
    assert r.accuracy_int8 == np.mean(a.argmax(1) == y)
    assert r.accuracy_folded == np.mean(ref.argmax(1) == y)
    assert r.accuracy_drop_points <= 1.0


def test_a_failing_int8_model_is_not_written_and_the_report_says_why(
    small_model, digits_splits, tmp_path
):
    """Calibrated on images 100x fainter than real ones: real inputs clip, predictions change."""
    faint = digits_splits.train.x * 0.01
    bundle = export(small_model, digits_splits, tmp_path, faint)
    m = read_manifest(bundle)
    assert "int8" not in m.files and not (bundle / INT8_FILE).exists()
    r = m.equivalence.int8
    assert not r.passed and m.equivalence.passed  # the float32 bundle itself is fine
    assert r.reason.startswith("int8 top-1 agreement with folded float32 is ")
    assert r.reason.endswith("% on the test images, below the 99% required")
    assert "\n" not in r.reason


def test_verify_rechecks_the_int8_variant(int8_bundle, digits_splits):
    res = verify_bundle(int8_bundle, digits_splits.test.x, digits_splits.test.y)
    assert res.ok, res.lines
    line = next(s for s in res.lines if "int8 vs folded" in s)
    assert line.startswith("ok   int8 vs folded on 359 inputs: max |diff| ")
    assert "accuracy drop" in line
    assert "ok   quantized.onnx: 0 BatchNormalization nodes as the fold report says" in res.lines


def test_verify_catches_a_tampered_int8_file(int8_bundle, tmp_path, digits_splits):
    bundle = tmp_path / "small"
    shutil.copytree(int8_bundle, bundle)
    data = bytearray((bundle / INT8_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (bundle / INT8_FILE).write_bytes(bytes(data))
    res = verify_bundle(bundle, digits_splits.test.x)
    assert not res.ok
    assert res.lines[-1].startswith(
        f"FAIL {bundle / INT8_FILE}: sha256 mismatch for the int8 model"
    )


def test_verify_catches_a_manifest_that_disagrees_with_its_int8_report(
    int8_bundle, tmp_path, digits_splits
):
    bundle = tmp_path / "small"
    shutil.copytree(int8_bundle, bundle)
    raw = json.loads((bundle / "bundle.json").read_text())
    del raw["files"]["int8"]  # the report still says passed
    (bundle / "bundle.json").write_text(json.dumps(raw))
    res = verify_bundle(bundle, digits_splits.test.x)
    assert res.lines[-1] == (
        "FAIL the int8 report says passed but the bundle lists no quantized.onnx"
    )
