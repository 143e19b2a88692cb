"""bnfold.toolchain.bnstats: BN running statistics against data, and recalibration.

The reference is numpy: each BN input computed by hand (1x1 convolutions are matrix products),
its per-channel mean and unbiased variance taken with np.mean / np.var(ddof=1) in float64.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bnfold.bundle import read_manifest
from bnfold.toolchain import bnstats
from bnfold.toolchain.bnstats import (
    MIN_IMAGES,
    TooFewImages,
    channel_moments,
    check_statistics,
    recalibrate,
    thresholds,
)
from bnfold.toolchain.importer import ImportOptions, import_model

C_IN, C1, C2 = 3, 6, 5
BNFOLD = shutil.which("bnfold", path=str(Path(sys.executable).parent))
PREFIX = [BNFOLD] if BNFOLD else [sys.executable, "-m", "bnfold.cli"]


def _f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def two_bn_net(stats: dict[str, tuple[np.ndarray, np.ndarray]], seed: int = 0) -> onnx.ModelProto:
    """x (N, 3, 4, 4) -> 1x1 conv1 -> bn1 -> Relu -> 1x1 conv2 -> bn2 -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.normal(0, 1, (C1, C_IN, 1, 1)), rng.normal(0, 0.5, (C2, C1, 1, 1))
    inits = [_f32("w1", w1), _f32("w2", w2), _f32("fc", rng.normal(0, 1, (3, C2)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1")]
    for i, (name, c) in enumerate((("bn1", C1), ("bn2", C2))):
        mean, var = stats[name]
        inits += [
            _f32(f"{name}_g", rng.uniform(0.5, 1.5, c)),
            _f32(f"{name}_b", rng.normal(0, 0.3, c)),
            _f32(f"{name}_m", mean),
            _f32(f"{name}_v", var),
        ]
        src = "h1" if i == 0 else "h2"
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [src, f"{name}_g", f"{name}_b", f"{name}_m", f"{name}_v"],
                [f"{name}_y"],
                name=name,
                epsilon=1e-5,
            )
        )
        if i == 0:
            nodes += [
                helper.make_node("Relu", ["bn1_y"], ["r1"]),
                helper.make_node("Conv", ["r1", "w2"], ["h2"], name="conv2"),
            ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["bn2_y"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def numpy_forward(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The BN inputs (h1, h2) of two_bn_net in float64 numpy."""
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = x.astype(np.float64)

    def conv1x1(w, v):
        return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], v)

    def bn(name, v):
        s = p[f"{name}_g"] / np.sqrt(p[f"{name}_v"] + 1e-5)
        shift = p[f"{name}_b"] - p[f"{name}_m"] * s
        return v * s[None, :, None, None] + shift[None, :, None, None]

    h1 = conv1x1(p["w1"], x)
    h2 = conv1x1(p["w2"], np.maximum(bn("bn1", h1), 0))
    return {"h1": h1, "h2": h2}


def moments(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return v.mean(axis=(0, 2, 3)), v.var(axis=(0, 2, 3), ddof=1)


def data(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.5, 1.0, (n, C_IN, 4, 4)) * scale + shift).astype(np.float32)


def healthy_net(seed: int = 0) -> onnx.ModelProto:
    """Running statistics estimated on 4096 images of the data distribution, layer by layer."""
    placeholder = {"bn1": (np.zeros(C1), np.ones(C1)), "bn2": (np.zeros(C2), np.ones(C2))}
    model = two_bn_net(placeholder, seed)
    big = data(4096, seed=1000 + seed)
    m1 = moments(numpy_forward(model, big)["h1"])
    model = two_bn_net({"bn1": m1, "bn2": placeholder["bn2"]}, seed)
    m2 = moments(numpy_forward(model, big)["h2"])
    return two_bn_net({"bn1": m1, "bn2": m2}, seed)


def test_channel_moments_match_numpy_across_chunks(monkeypatch):
    model = healthy_net()
    x = data(50, seed=3)
    monkeypatch.setattr(bnstats, "CHUNK_VALUES", 7 * x[0].size)  # 8 chunks, the last short
    got = channel_moments(model, "x", ["h1", "h2"], x)
    ref = numpy_forward(model, x)
    for name in ("h1", "h2"):
        for g, r in zip(got[name], moments(ref[name]), strict=True):
            # float32 activations against float64 numpy: a few float32 ulps of the values
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_thresholds_are_the_stated_chance_floors():
    assert thresholds(64) == (
        pytest.approx(0.5),
        pytest.approx(max(math.log(2), 4 * (2 / 64) ** 0.5)),
    )
    assert thresholds(10_000) == (pytest.approx(0.5), pytest.approx(math.log(2)))
    assert thresholds(MIN_IMAGES)[0] == pytest.approx(4 / MIN_IMAGES**0.5)


def test_a_healthy_model_is_never_flagged_over_seeds():
    model = healthy_net()
    flagged = [check_statistics(model, "x", data(64, seed=s), "d").flagged for s in range(20)]
    assert flagged == [[]] * 20


def test_a_preprocessing_mismatch_flags_the_first_layer_and_names_it():
    check = check_statistics(healthy_net(), "x", data(64, seed=5, scale=4.0, shift=2.0), "d")
    assert check.checked and check.flagged[0] == "bn1"
    assert any("pixel scale" in c and "bn1" in c for c in check.causes)


def test_initial_statistics_are_named_as_the_cause():
    model = two_bn_net({"bn1": (np.zeros(C1), np.ones(C1)), "bn2": (np.zeros(C2), np.ones(C2))})
    check = check_statistics(model, "x", data(64, seed=6), "d")
    assert check.flagged and all(r.initial_statistics for r in check.layers)
    assert "initial statistics" in check.causes[0]


def test_too_few_images_is_not_a_verdict():
    check = check_statistics(healthy_net(), "x", data(MIN_IMAGES - 1, seed=7), "d")
    assert not check.checked and f"at least {MIN_IMAGES}" in check.note
    with pytest.raises(TooFewImages, match=f"at least {MIN_IMAGES}"):
        recalibrate(healthy_net(), "x", data(MIN_IMAGES - 1, seed=7))


def test_mul_add_models_say_there_are_no_statistics():
    model = healthy_net()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.op_type = "Identity"  # stand-in for a BN exported as constant Mul/Add
            del node.input[1:]
    check = check_statistics(model, "x", data(64, seed=8), "d")
    assert not check.checked and "no statistics to compare" in check.note


def test_recalibration_estimates_each_layer_on_the_layers_before_it():
    wrong = two_bn_net(
        {"bn1": (np.full(C1, 3.0), np.full(C1, 9.0)), "bn2": (np.zeros(C2), np.ones(C2))}
    )
    x = data(64, seed=9)
    new = recalibrate(wrong, "x", x)
    # Reference: bn1 from the data, then bn2 from the inputs bn1's new statistics produce.
    m1 = moments(numpy_forward(wrong, x)["h1"])
    m2 = moments(
        numpy_forward(two_bn_net({"bn1": m1, "bn2": (np.zeros(C2), np.ones(C2))}), x)["h2"]
    )
    got = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    for name, (mean, var) in (("bn1", m1), ("bn2", m2)):
        np.testing.assert_allclose(got[f"{name}_m"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"{name}_v"], var, rtol=1e-5, atol=1e-5)
    assert not check_statistics(new, "x", data(64, seed=10), "d").flagged


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: Path, n: int, classes: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(_png(rng.integers(0, 256, (4, 4, 3), np.uint8)))
    return root


def test_import_recalibrate_records_what_changed(tmp_path):
    """Statistics far from the images' (scale 1/255 pixels): flagged at import, re-estimated
    with --recalibrate, the bundle proved as any other and the change recorded."""
    wrong = two_bn_net(
        {"bn1": (np.full(C1, 3.0), np.full(C1, 9.0)), "bn2": (np.zeros(C2), np.ones(C2))}
    )
    src = tmp_path / "net.onnx"
    onnx.save_model(wrong, str(src))
    samples = _image_folder(tmp_path / "samples", 48, ["a", "b", "c"], seed=11)
    plain = import_model(
        src, ImportOptions(name="plain", models_dir=tmp_path / "m", samples=samples)
    )
    assert plain.bn_statistics.checked and plain.bn_statistics.flagged
    assert plain.recalibration is None
    opts = ImportOptions(
        name="recal",
        models_dir=tmp_path / "m",
        samples=samples,
        recalibrate=True,
        classes=["a", "b", "c"],
    )
    m = import_model(src, opts)
    r = m.recalibration
    assert r.n_images == 48 and r.layers == 2 and r.original_sha256 == plain.imported.sha256
    assert (
        0 <= r.top1_agreement <= 1
        and r.accuracy_before is not None
        and r.accuracy_after is not None
    )
    assert m.equivalence.passed and m.bn_statistics.flagged == []
    assert any("re-estimated" in c for c in m.imported.changes)
    assert read_manifest(tmp_path / "m" / "recal").recalibration == r


def test_cli_doctor_and_its_refusals(tmp_path):
    src = tmp_path / "net.onnx"
    onnx.save_model(healthy_net(), str(src))
    few = _image_folder(tmp_path / "few", 5, ["a"], seed=12)
    run = subprocess.run(
        [*PREFIX, "doctor", str(src), "--samples", str(few), "--scale", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert f"at least {MIN_IMAGES}" in run.stderr and "Traceback" not in run.stderr
    many = _image_folder(tmp_path / "many", 40, ["a"], seed=13)
    run = subprocess.run(
        [*PREFIX, "doctor", str(src), "--samples", str(many)], capture_output=True, text=True
    )
    # 0..1 pixels against statistics estimated on N(0.5, 1) data: the variance is 12x too small
    assert run.returncode == 1, run.stderr
    assert "FLAGGED" in run.stdout and "likely cause" in run.stdout
    run = subprocess.run(
        [*PREFIX, "import", str(src), "--name", "n", "--models-dir", str(tmp_path / "m"),
         "--samples", str(few), "--recalibrate"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "--recalibrate" in run.stderr and run.stderr.count("\n") == 1
    assert not (tmp_path / "m" / "n").exists()
