"""The published CNN families (bench/families.py) at tiny widths and sizes: each exported by its
framework the documented way, imported with `bnfold import` (import_model), folded where the
fold is exact, refused with a reason elsewhere, equivalent, and its bundle loaded as the server
loads it and compared with the framework's own eval answer (the independent reference).

Tiny: a tenth of the channels, at most two blocks of each stage (so identity residuals, channel
splits and shuffles, SE blocks, ceil_mode pools and BNs after Concat are all still there), 32x32
inputs (GoogLeNet's ceil_mode pools round up at every stage at that size).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.families import KERAS_FAMILIES, TORCH_FAMILIES
from bnfold.bundle import Manifest, load_bundle
from bnfold.errors import BnfoldError
from bnfold.toolchain.importer import ImportOptions, import_model
from tests.e2e.test_byom import require_keras_extra

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TINY_TORCH = ["--size", "32", "--width", "0.125", "--depth", "2"]
TINY_KERAS = ["--size", "32", "--tiny"]
# Folded vs the framework's own eval answer, relative to the logit scale (max |reference|):
# float32 through ~50 layers against float64 (torch) or float32 (Keras); the bundle's own
# tolerance for folded vs unfolded is 2e-5 of that scale.
REL_TOLERANCE = 1e-4
# Xception has no width knob and needs 71x71 at least (22M parameters): benchmark only.
KERAS_TINY = [n for n in KERAS_FAMILIES if n != "Xception"]
EXPORT_TIMEOUT_S = 600  # a cold export of all families on 2 busy cores; cached after


def refused_expected(name: str, source: onnx.ModelProto) -> int:
    """BNs the fold must refuse: DenseNet's norm1 of every layer, the transitions' and the
    final one follow a Concat (or a pool) and precede a ReLU: no conv on either side to fold
    into. Every other family's BN follows its conv."""
    if name != "densenet121":
        return 0
    producer = {o: n.op_type for n in source.graph.node for o in n.output}
    bns = [n for n in source.graph.node if n.op_type == "BatchNormalization"]
    return sum(producer.get(n.input[0]) != "Conv" for n in bns)


def _export(framework: str, names: list[str], out: Path, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "bench.families", framework, ",".join(names), str(out), *flags]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _exported(request, framework: str, names: list[str], root: Path, flags: list[str]) -> None:
    """The families exported into root, in 2 child processes; reused from pytest's cache when
    bench/families.py, the flags and the exporters' versions are the same (the export is
    seeded: the same files), since the frameworks' exporters take minutes on a busy machine."""
    packages = ("torch", "onnxscript") if framework == "torch" else ("keras", "tf2onnx")
    key = hashlib.sha256(
        (REPO / "bench" / "families.py").read_bytes()
        + repr((framework, names, flags, [md.version(p) for p in packages])).encode()
    ).hexdigest()[:16]
    cache = request.config.cache
    cached = cache.mkdir(f"bnfold-families-{framework}-{key}") if cache is not None else None
    if cached is not None and (cached / "done").is_file():
        shutil.copytree(cached, root, dirs_exist_ok=True)
        return
    _wait([_export(framework, names[i::2], root, flags) for i in range(2) if names[i::2]])
    if cached is not None:
        shutil.copytree(root, cached, dirs_exist_ok=True)
        (cached / "done").touch()


def _wait(procs: list[subprocess.Popen]) -> None:
    """Every export child done, and well; on any failure (a timeout too) none left running."""
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=EXPORT_TIMEOUT_S)
            assert proc.returncode == 0, f"export failed:\n{out.decode()[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _import_all(root: Path, names) -> dict[str, Manifest | Exception]:
    """Each family through bnfold import (default: 64 generated inputs); a failure is kept
    and reported by that family's test (a bnfold refusal by its message)."""
    out: dict[str, Manifest | Exception] = {}
    for name in names:
        opts = ImportOptions(name=name.replace("_", "-").lower(), models_dir=root / "models")
        try:
            out[name] = import_model(root / f"{name}.onnx", opts)
        except BnfoldError as exc:
            out[name] = Exception(exc.message)
        except Exception as exc:  # noqa: BLE001 - reported by the family's own test
            out[name] = exc
    return out


@pytest.fixture(scope="module")
def torch_families(request, tmp_path_factory) -> tuple[Path, dict]:
    require_keras_extra()  # onnxscript, which torch's dynamo exporter needs, comes with it
    root = tmp_path_factory.mktemp("families-torch")
    _exported(request, "torch", list(TORCH_FAMILIES), root, TINY_TORCH)
    return root, _import_all(root, TORCH_FAMILIES)


def _manifest(imported: dict, name: str) -> Manifest:
    got = imported[name]
    if isinstance(got, Exception):
        pytest.fail(f"{name}: bnfold import failed: {type(got).__name__}: {got}", pytrace=False)
    return got


def _check_fold(root: Path, name: str, m: Manifest, refused: int) -> onnx.ModelProto:
    """Rows: one per BN of the file; refused rows == BatchNormalization nodes left in
    folded.onnx, each with a reason; equivalence passed."""
    source = onnx.load(str(root / f"{name}.onnx"), load_external_data=False)
    bundle = root / "models" / m.name
    folded = onnx.load(str(bundle / "folded.onnx"))
    in_source = sum(n.op_type == "BatchNormalization" for n in source.graph.node)
    left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    bn_rows = [r for r in m.fold_report if r.op == "BatchNormalization"]
    assert len(bn_rows) == in_source
    assert left == sum(not r.folded for r in bn_rows) == refused, [
        (r.bn, r.reason) for r in bn_rows if not r.folded
    ]
    assert all(r.reason for r in m.fold_report if not r.folded)
    assert m.files["folded"].batchnorm_nodes == left
    eq = m.equivalence
    assert eq.passed and eq.n_images == 64 and eq.folded_vs_unfolded.top1_agreement == 1.0
    assert eq.folded_vs_unfolded.max_abs_diff <= eq.tolerance_abs
    if eq.folded_vs_float64 is not None:
        assert eq.folded_vs_float64.max_abs_diff <= eq.tolerance_abs
    return source


def _served_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    """The bundle as the server loads it (manifest and checksums checked), folded.onnx run by
    onnxruntime with all optimizations, as served."""
    manifest = load_bundle(bundle)
    session = ort.InferenceSession(
        str(bundle / manifest.files["folded"].path), providers=["CPUExecutionProvider"]
    )
    return session.run([manifest.output.name], {manifest.input.name: x})[0]


def _check_served(root: Path, name: str, m: Manifest) -> None:
    x = np.load(root / f"{name}.onnx.x.npy")
    ref = np.load(root / f"{name}.onnx.ref.npy")
    got = _served_logits(root / "models" / m.name, x)
    scale = float(np.abs(ref).max())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= REL_TOLERANCE * scale, (np.abs(got - ref).max(), scale)
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name", list(TORCH_FAMILIES))
def test_torch_family_imports_folds_and_serves(torch_families, name):
    root, imported = torch_families
    m = _manifest(imported, name)
    source = onnx.load(str(root / f"{name}.onnx"), load_external_data=False)
    _check_fold(root, name, m, refused_expected(name, source))
    if name in ("squeezenet1_1", "convnext_tiny"):  # no BatchNorm at all
        # ConvNeXt's layer scale (a constant per-channel Mul after the block's last Linear)
        # is a Mul/Add row, folded into that Linear; SqueezeNet has nothing to fold.
        assert not [r for r in m.fold_report if r.op == "BatchNormalization"]
        assert all(r.folded for r in m.fold_report)
        assert bool(m.fold_report) == (name == "convnext_tiny")
    else:
        assert any(r.folded for r in m.fold_report)
    _check_served(root, name, m)


@pytest.fixture(scope="module")
def keras_families(request, tmp_path_factory) -> tuple[Path, dict]:
    require_keras_extra()
    root = tmp_path_factory.mktemp("families-keras")
    _exported(request, "keras", KERAS_TINY, root, TINY_KERAS)
    return root, _import_all(root, KERAS_TINY)


def test_keras_families_import_fold_and_serve(keras_families):
    """keras.applications at tiny size: tf2onnx folds most BNs into the convs itself; the rest
    arrive as Mul/Add and bnfold folds them or refuses them with a reason; no
    BatchNormalization node is left; each bundle serves Keras's own eval answer."""
    root, imported = keras_families
    failures = []
    for name in KERAS_TINY:
        try:
            m = _manifest(imported, name)
            _check_fold(root, name, m, refused=0)
            _check_served(root, name, m)
        except (AssertionError, pytest.fail.Exception) as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
