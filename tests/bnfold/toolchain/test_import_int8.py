"""`bnfold import --quantize int8`: through the real CLI, the int8 variant is calibrated on the
given folder, measured on the sample images, written only when it passes, and verified; every
flag mistake is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from bnfold.bundle import read_manifest
from bnfold.preprocess import preprocess_bytes
from tests.bnfold.toolchain.import_graphs import classifier

BNFOLD = shutil.which("bnfold", path=str(Path(sys.executable).parent))
PREFIX = [BNFOLD] if BNFOLD else [sys.executable, "-m", "bnfold.cli"]


def images(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("import-int8")
    onnx.save_model(classifier("NCHW", "bn", batch="N"), str(tmp / "net.onnx"))
    images(tmp / "calib", 40, seed=1)
    images(tmp / "samples", 30, seed=2)
    return tmp


def bnfold(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*PREFIX, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0].astype(np.float64)


def test_import_with_int8_measures_on_the_samples_and_verifies(work):
    args = ["import", "net.onnx", "--name", "q", "--models-dir", "models", "--samples", "samples"]
    args += ["--quantize", "int8", "--calibration", "calib", "--calibration-method", "percentile"]
    proc = bnfold(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    bundle = work / "models" / "q"
    m = read_manifest(bundle)
    r = m.equivalence.int8
    assert r.settings.calibration_method == "percentile"
    assert r.settings.calibration_source == f"images from calib ({40} images)"
    assert r.split == "samples" and r.n_images == 30 and r.accuracy_int8 is None  # no labels
    # The report is what an independent run of the two files measures on the sample images.
    x = np.stack(
        [
            preprocess_bytes(p.read_bytes(), m.input.preprocess)
            for p in sorted(work.glob("samples/*"))
        ]
    )
    folded = ort_logits(bundle / "folded.onnx", x)
    if r.passed:
        int8 = ort_logits(bundle / "quantized.onnx", x)
        agreement = np.mean(int8.argmax(1) == folded.argmax(1))
        assert r.int8_vs_folded.top1_agreement == agreement >= 0.99
        assert r.int8_vs_folded.max_abs_diff == pytest.approx(np.abs(int8 - folded).max())
        assert "int8: wrote quantized.onnx; on 30 samples inputs" in proc.stdout
        assert m.files["int8"].quantization.nodes.float_ops == {}
    else:  # random weights can leave margins int8 cannot keep: then no file, and why
        assert "int8" not in m.files and not (bundle / "quantized.onnx").exists()
        assert f"int8: quantized.onnx not written: {r.reason}" in proc.stdout
    check = bnfold("verify", "models/q", "--samples", "samples", cwd=work)
    assert check.returncode == 0, check.stdout
    assert ("int8 vs folded on 30 inputs" in check.stdout) == r.passed


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--quantize", "int8"], "--quantize int8 needs calibration images: add --calibration"),
        (["--quantize", "int8", "--calibration", "empty"], "calibration folder empty is empty"),
        (
            ["--quantize", "int8", "--calibration", "text"],
            "calibration folder text holds no images",
        ),
        (["--calibration-images", "5"], "--calibration-images only applies with --quantize int8"),
        (["--quantize", "int8", "--calibration-images", "0"], "expected a positive integer"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_int8_flag_mistakes_are_one_line(work, extra, fragment):
    (work / "empty").mkdir(exist_ok=True)
    (work / "text").mkdir(exist_ok=True)
    (work / "text" / "notes.txt").write_text("no images here")
    proc = bnfold("import", "net.onnx", "--name", "bad", "--models-dir", "models", *extra, cwd=work)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not (work / "models" / "bad").exists() and proc.stdout == ""


def test_verify_catches_an_edited_int8_checksum(work, tmp_path):
    """The int8 entry of the manifest is what verify checks the file against."""
    if not (work / "models" / "q" / "quantized.onnx").exists():
        pytest.fail("the import above wrote no int8 file to tamper with")
    bundle = tmp_path / "q"
    shutil.copytree(work / "models" / "q", bundle)
    raw = json.loads((bundle / "bundle.json").read_text())
    raw["files"]["int8"]["sha256"] = "0" * 64
    (bundle / "bundle.json").write_text(json.dumps(raw))
    proc = bnfold("verify", str(bundle), cwd=work)
    assert proc.returncode == 1 and "sha256 mismatch for the int8 model" in proc.stdout
