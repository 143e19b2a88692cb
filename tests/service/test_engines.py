"""Engines behind the data plane: OpenVINO beside onnxruntime, float32 kept float32, the bf16
variant proved at export and checked again where it is served, reduced-precision variants
refused when they fail that check. The reference is onnxruntime on the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
from onnx import numpy_helper

from bnfold.equivalence import REL_TOLERANCE
from bnfold.toolchain import engines
from bnfold.toolchain.engines import OpenVinoSession, bf16_unavailable_reason, native_bf16
from bnfold.toolchain.sessions import make_session
from service.registry import load_model

CPU = ["CPUExecutionProvider"]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def test_a_float32_session_infers_in_float32_whatever_the_plugin_default(bundle_src):
    """OpenVINO's CPU plugin defaults to bf16 on CPUs that compute it natively: a float32
    variant compiled without the hint would change the numbers the bundle proved."""
    default = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    if "bfloat16" in default:  # the trap, where the plugin computes bf16 natively
        assert native_bf16()
    folded = bundle_src / "folded.onnx"
    session = OpenVinoSession(folded, "float32")
    assert "float32" in session.inference_precision
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    want = make_session(folded, "folded").run(["logits"], {"input": x})[0]
    got = session.run(["logits"], {"input": x})[0]
    # two float32 engines on the same graph stay within the bundles' float32 tolerance (any CPU's
    # kernels: a few ulps per layer); bf16 keeps 8 significant bits and lands far outside it
    assert rel_diff(got, want) < REL_TOLERANCE
    if native_bf16():
        bf16 = OpenVinoSession(folded, "bf16").run(["logits"], {"input": x})[0]
        assert rel_diff(bf16, want) > REL_TOLERANCE


def test_engine_openvino_serves_folded_in_float32(copy_bundle):
    model = load_model(copy_bundle(), CPU, engine="openvino")
    assert model.ready, model.error
    assert (model.engines["folded"].engine, model.engines["folded"].precision) == (
        "openvino",
        "float32",
    )
    assert "float32" in model.sessions["folded"].inference_precision
    assert model.engines["unfolded"].engine == "onnxruntime"  # BN executed: the proof
    x = np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)
    want = make_session(model.path / "folded.onnx", "folded").run(["logits"], {"input": x})[0]
    assert rel_diff(model.run("folded", x), want) < REL_TOLERANCE
    if "int8" in model.sessions:
        assert model.engines["int8"].engine == "openvino"


def test_auto_keeps_every_proved_variant_on_onnxruntime(copy_bundle):
    model = load_model(copy_bundle(), CPU)
    assert {v: e.engine for v, e in model.engines.items()} == {
        v: "onnxruntime" for v in model.sessions
    }


def _with_bf16_request(bundle: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["equivalence"]["bf16"] = {
        "precision": "bf16",
        "engine": "openvino CPU",
        "cpu_features": [],
        "split": "test",
        "n_images": 0,
        "min_top1_agreement": 0.99,
        "max_accuracy_drop_points": 1.0,
        "passed": False,
        "reason": "not measured where the bundle was made",
    }
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def _served_or_refused_here(client, body: dict) -> None:
    """bf16 on a CPU that computes it: served through OpenVINO at bf16, or, where this CPU's
    kernels fail the load-time check, refused with the reason and answered 503."""
    detail = client.get("/v1/models/digits").json()
    refused = detail["variant_errors"].get("bf16")
    if refused is not None:
        assert refused.startswith("failed its check on this CPU")
        assert client.post("/v2/models/digits/infer", json=body).status_code == 503
        return
    assert detail["engines"]["bf16"]["engine"] == "openvino"
    assert detail["engines"]["bf16"]["precision"] == "bf16"
    assert "bf16" in detail["variants"]
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    bf16 = np.array(r.json()["outputs"][0]["data"])
    folded = {**body, "parameters": {"variant": "folded"}}
    f32 = np.array(client.post("/v2/models/digits/infer", json=folded).json()["outputs"][0]["data"])
    # bfloat16 keeps 8 significant bits: ~4e-3 relative per op, far from float32's 1e-7
    assert 0 < rel_diff(bf16, f32) < 0.05


def test_bf16_is_served_where_native_and_a_400_elsewhere(copy_bundle, serve, monkeypatch):
    bundle = copy_bundle()
    _with_bf16_request(bundle)
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": [0.5] * 64}], "parameters": {"variant": "bf16"}}  # fmt: skip
    if native_bf16():
        _served_or_refused_here(serve(bundle.parent), body)
    monkeypatch.setattr(engines, "native_bf16", lambda: False)  # a CPU without native bf16
    assert "does not compute bfloat16 natively" in bf16_unavailable_reason()
    client = serve(bundle.parent)
    r = client.post("/v2/models/digits/infer", json={**body, "parameters": {"variant": "bf16"}})
    assert r.status_code == 400
    assert "variant 'bf16' is not available on this server" in r.json()["error"]
    assert "natively" in r.json()["error"]
    detail = client.get("/v1/models/digits").json()
    assert "bf16" in detail["unavailable_variants"] and "bf16" not in detail["variants"]


def test_a_bundle_without_bf16_says_how_to_get_it(serve, models_dir):
    client = serve(models_dir)
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": [0.5] * 64}], "parameters": {"variant": "bf16"}}  # fmt: skip
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 400 and "--bf16" in r.json()["error"]


def test_a_reduced_precision_variant_failing_its_check_here_is_refused(copy_bundle, serve):
    """An int8 file that answers other classes (its head negated) fails the load-time check on
    the bundle's check inputs; the float32 variants keep serving and the reason is shown."""
    bundle = copy_bundle()
    if not (bundle / "quantized.onnx").exists():
        pytest.fail("the shipped bundle has an int8 variant (make train --quantize int8)")
    broken = onnx.load(str(bundle / "folded.onnx"))
    head = next(n for n in broken.graph.node if n.op_type == "Gemm")
    for t in broken.graph.initializer:
        if t.name in head.input[1:]:
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    onnx.save_model(broken, str(bundle / "quantized.onnx"))
    manifest = json.loads((bundle / "bundle.json").read_text())
    import hashlib

    manifest["files"]["int8"]["sha256"] = hashlib.sha256(
        (bundle / "quantized.onnx").read_bytes()
    ).hexdigest()
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    client = serve(bundle.parent)
    detail = client.get("/v1/models/digits").json()
    assert detail["status"] == "ready" and "int8" not in detail["variants"]
    why = detail["variant_errors"]["int8"]
    assert why.startswith("failed its check on this CPU") and "top-1 agreement" in why
    assert client.get("/v2/health/ready").status_code == 200  # the others keep serving


def test_metrics_say_which_engine_and_precision_answered(serve, models_dir):
    client = serve(models_dir)
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": [0.5] * 64}]}  # fmt: skip
    assert client.post("/v2/models/digits/infer", json=body).status_code == 200
    text = client.get("/metrics").text
    assert (
        'bnfold_engine_runs_total{engine="onnxruntime",model="digits",precision="float32",'
        'variant="folded"}' in text
    )


def test_check_inputs_stored_with_an_int8_bundle_match_its_manifest(bundle_src, tmp_path):
    from bnfold.bundle import read_manifest
    from bnfold.toolchain.precision import load_check_inputs

    m = read_manifest(bundle_src)
    x = load_check_inputs(bundle_src, m)
    assert x is not None and len(x) == m.check_inputs.n_images and x.dtype == np.float32
    shutil.copytree(bundle_src, tmp_path / "b")
    np.save(tmp_path / "b" / "check_inputs.npy", x[:2])  # tampered: refused, not trusted
    assert load_check_inputs(tmp_path / "b", m) is None


def test_check_inputs_decide_whether_int8_is_measured_again(copy_bundle):
    """Tampered check inputs cannot prove a variant: refused. A bundle made before bundles kept
    check inputs has none: served as it was proved at export."""
    bundle = copy_bundle()
    np.save(bundle / "check_inputs.npy", np.zeros((2, 1, 8, 8), np.float32))
    model = load_model(bundle, CPU)
    assert model.ready and "int8" not in model.sessions
    assert "check_inputs.npy is missing or its sha256 differs" in model.variant_errors["int8"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest.pop("check_inputs")
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    (bundle / "check_inputs.npy").unlink()
    assert "int8" in load_model(bundle, CPU).sessions
