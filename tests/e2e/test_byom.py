"""Bring your own model, end to end: a PyTorch CNN (dynamo exporter, BN kept, weights in a side
file) and a Keras 3 AlexNet-with-BN (NHWC, BN exported as Mul/Add) are exported by their own
frameworks, imported with `bnfold import`, verified with `bnfold verify`, and served by the real
`bnfold-serve` process. The independent references: each framework's own float64 answer, and
onnxruntime on the user's original file.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from bnfold.bundle import Manifest, read_manifest
from bnfold.preprocess import preprocess_bytes
from tests.e2e.conftest import serving

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
BNFOLD = shutil.which("bnfold", path=str(BIN))
KERAS_CLASSES = [f"class{i}" for i in range(10)]
# The keras extra: what the export child processes import (onnxscript for torch's dynamo exporter).
KERAS_EXTRA = ("keras", "tensorflow", "tf2onnx", "onnxscript")


def require_keras_extra() -> None:
    """Skip without the keras extra (`make test-fast`, a plain `pytest`); under `make test`
    (BNFOLD_REQUIRE_KERAS=1) its absence is a failure. find_spec: no TensorFlow import here."""
    missing = [m for m in KERAS_EXTRA if importlib.util.find_spec(m) is None]
    if not missing:
        return
    why = f"the keras extra is not installed (missing {', '.join(missing)})"
    if os.environ.get("BNFOLD_REQUIRE_KERAS") == "1":
        pytest.fail(f"{why}: run make test, which installs it", pytrace=False)
    pytest.skip(why)


@dataclass
class Imported:
    name: str
    source: Path  # the user's file, as exported
    x: np.ndarray  # a test batch in the model's layout
    ref64: np.ndarray  # the framework's float64 logits on x
    manifest: Manifest


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


def _sample_images(folder: Path, n: int = 12) -> None:
    """RGB PNGs of assorted sizes: the server-side preprocessing resizes them to 32x32."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(n):
        pixels = rng.integers(0, 256, (24 + 4 * i, 40 - i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"sample{i:02d}.png")


@pytest.fixture(scope="module")
def byom(tmp_path_factory) -> dict[str, Imported]:
    """Export both models (in parallel child processes), import each into one models dir."""
    require_keras_extra()
    root = tmp_path_factory.mktemp("byom")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    exports = {
        kind: subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.byom_export", kind, str(root / kind)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        for kind in ("torch", "keras")
    }
    for kind, proc in exports.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{kind} export failed:\n{out.decode()[-3000:]}"
    assert (root / "torch" / "model.onnx.data").is_file()  # the dynamo exporter's side file
    _sample_images(root / "samples")
    (root / "classes.txt").write_text("\n".join(KERAS_CLASSES) + "\n")
    models = root / "models"
    commands = {
        "torchcnn": ["torch/model.onnx", "--num-classes", "4"],
        "alexnet": ["keras/model.onnx", "--classes", "classes.txt", "--samples", "samples"],
    }
    for name, args in commands.items():
        done = _run([BNFOLD, "import", *args, "--name", name, "--models-dir", str(models)],
                    cwd=root)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"imported {models / name}" in done.stdout
    return {
        name: Imported(
            name=name,
            source=root / kind / "model.onnx",
            x=np.load(root / kind / "x.npy"),
            ref64=np.load(root / kind / "ref64.npy"),
            manifest=read_manifest(models / name),
        )
        for name, kind in (("torchcnn", "torch"), ("alexnet", "keras"))
    }


@pytest.fixture(scope="module")
def server(byom, tmp_path_factory) -> Iterator[str]:
    models = next(iter(byom.values())).source.parents[1] / "models"
    log = tmp_path_factory.mktemp("byom-server") / "server.log"
    with serving(models, log) as served:
        yield served.url
    assert "Traceback" not in log.read_text()


def original_logits(m: Imported, x: np.ndarray) -> np.ndarray:
    """onnxruntime on the user's file as exported (external data beside it), BN executed."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(m.source), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {m.manifest.input.name: x})[0]


def bundle_file(m: Imported, variant: str) -> Path:
    return m.source.parents[1] / "models" / m.name / f"{variant}.onnx"


@pytest.mark.parametrize("name", ["torchcnn", "alexnet"])
def test_nothing_foldable_is_left(byom, name):
    """Zero BatchNormalization and zero Mul in folded.onnx; each Add left is a MatMul's bias."""
    m = byom[name]
    assert m.manifest.fold_report and all(r.folded for r in m.manifest.fold_report)
    graph = onnx.load(str(bundle_file(m, "folded"))).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops and "Mul" not in ops
    producer = {o: n.op_type for n in graph.node for o in n.output}
    assert all(producer.get(n.input[0]) == "MatMul" for n in graph.node if n.op_type == "Add")
    original = onnx.load(str(m.source), load_external_data=False).graph
    if name == "torchcnn":  # BN kept by optimize=False: conv, after-ReLU (forward), BatchNorm1d
        assert sum(n.op_type == "BatchNormalization" for n in original.node) == 3
        assert [r.direction for r in m.manifest.fold_report] == ["backward", "forward", "backward"]
    else:  # Keras: no BN node at all, 4 conv and 2 dense BNs as Mul/Add chains
        assert not any(n.op_type == "BatchNormalization" for n in original.node)
        assert [r.op for r in m.manifest.fold_report] == ["Mul/Add"] * 6


@pytest.mark.parametrize("name", ["torchcnn", "alexnet"])
def test_equivalent_to_the_frameworks_own_float64(byom, name):
    m = byom[name]
    eq = m.manifest.equivalence
    assert eq.passed and eq.folded_vs_unfolded.top1_agreement == 1.0
    opts = ort.SessionOptions()
    s = ort.InferenceSession(
        str(bundle_file(m, "folded")), opts, providers=["CPUExecutionProvider"]
    )
    folded = s.run(None, {m.manifest.input.name: m.x})[0]
    # The bundle's tolerance (2e-5 of the logit scale) holds against the framework's float64
    # model too, and so does the user's own float32 file: folding added no error of its own.
    assert np.abs(folded - m.ref64).max() <= eq.tolerance_abs
    assert np.abs(original_logits(m, m.x) - m.ref64).max() <= eq.tolerance_abs
    assert (folded.argmax(1) == m.ref64.argmax(1)).all()
    if name == "alexnet":
        assert (eq.split, eq.n_images) == ("samples", 12)


def test_torchscript_opset_13_export_float64_columns_match_torch(byom, tmp_path):
    """The TorchScript exporter at opset 13 keeps BN with momentum set: every BN folds, and the
    bundle's float64 reference agrees with torch's own float64 model (it was off by ~1e-2)."""
    m = byom["torchcnn"]
    src = m.source.parent / "model_ts13.onnx"
    done = _run([BNFOLD, "import", str(src), "--name", "ts13", "--models-dir", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "ts13")
    eq = manifest.equivalence
    assert [r.folded for r in manifest.fold_report] == [True] * 3
    assert eq.passed and eq.unfolded_vs_float64.max_abs_diff <= eq.tolerance_abs
    assert eq.folded_vs_float64.max_abs_diff <= eq.tolerance_abs
    opts = ort.SessionOptions()
    s = ort.InferenceSession(str(tmp_path / "ts13" / "folded.onnx"), opts,
                             providers=["CPUExecutionProvider"])  # fmt: skip
    assert np.abs(s.run(None, {"image": m.x})[0] - m.ref64).max() <= eq.tolerance_abs


@pytest.mark.parametrize("name", ["torchcnn", "alexnet"])
def test_bnfold_verify_passes(byom, name):
    m = byom[name]
    bundle = bundle_file(m, "folded").parent
    samples = ["--samples", str(m.source.parents[1] / "samples")] if name == "alexnet" else []
    done = _run([BNFOLD, "verify", str(bundle), *samples])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no foldable BatchNormalization or Mul/Add left" in done.stdout
    n = 12 if samples else 64  # the sample folder, or generated inputs
    assert f"folded vs unfolded on {n} inputs" in done.stdout


@pytest.mark.parametrize("name", ["torchcnn", "alexnet"])
def test_v2_infer_equals_onnxruntime_on_the_original_file(byom, server, name):
    m = byom[name]
    want = original_logits(m, m.x)
    for variant in ("unfolded", "folded"):
        body = {
            "inputs": [{"name": m.manifest.input.name, "shape": list(m.x.shape),
                        "datatype": "FP32", "data": m.x.ravel().tolist()}],
            "parameters": {"variant": variant},
        }  # fmt: skip
        r = httpx.post(f"{server}/v2/models/{name}/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == m.manifest.output.name and out["shape"] == list(want.shape)
        got = np.asarray(out["data"], dtype=np.float32).reshape(want.shape)
        if variant == "unfolded":  # the same graph, the same optimization level: bit for bit
            np.testing.assert_array_equal(got, want)
        else:
            assert np.abs(got - want).max() <= m.manifest.equivalence.tolerance_abs


@pytest.mark.parametrize("name", ["torchcnn", "alexnet"])
def test_v1_predict_and_compare_on_an_image(byom, server, name):
    m = byom[name]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(11).integers(0, 256, (45, 60, 3), np.uint8)).save(
        buf, format="PNG"
    )
    png = buf.getvalue()
    x = preprocess_bytes(png, m.manifest.input.preprocess)[None]  # NCHW or NHWC, as declared
    logits = original_logits(m, x)[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    r = httpx.post(
        f"{server}/v1/models/{name}/predict", files={"files": ("a.png", png)}, timeout=30
    )
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["label"] == m.manifest.classes[int(probs.argmax())]
    assert pred["probability"] == pytest.approx(probs.max(), abs=1e-5)
    r = httpx.post(
        f"{server}/v1/models/{name}/compare", files={"files": ("a.png", png)}, timeout=30
    )
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert cmp["within_tolerance"] and cmp["top1_agreement"] == 1.0
    assert [p["bn"] for p in cmp["per_layer"]] == [p.bn for p in m.manifest.layer_probes]
    assert len(cmp["per_layer"]) == len(m.manifest.fold_report) and cmp["per_layer_note"] is None
