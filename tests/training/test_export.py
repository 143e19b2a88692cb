"""Export and the bundle: BN node counts, equivalence within tolerance, checksums, atomicity."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bnfold.bundle import load_bundle, read_manifest, sha256_file, write_bundle_atomically
from bnfold.equivalence import FLOAT32_ERRORS, REL_TOLERANCE
from bnfold.errors import BundleError
from bnfold.toolchain.verify import count_bn_nodes
from training.export import (
    export_bundle,
    scope_to_module_path,
)
from training.model import ModelConfig, build_model


def test_unfolded_keeps_every_bn_and_folded_has_none(small_bundle, small_model):
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in small_model.modules())
    unfolded = onnx.load(str(small_bundle / "unfolded.onnx"))
    folded = onnx.load(str(small_bundle / "folded.onnx"))
    assert n_bn == 4
    assert count_bn_nodes(unfolded) == n_bn
    assert count_bn_nodes(folded) == 0
    # Single-file ONNX with a dynamic batch axis and the stated opset.
    assert not list(small_bundle.glob("*.data"))
    dim0 = unfolded.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    assert {o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_onnx_matches_torch_eval_model(small_bundle, small_model, digits_splits):
    """Both ONNX files compute the torch eval model's function (independent reference)."""
    x = digits_splits.test.x[:64]
    with torch.no_grad():
        ref = small_model(torch.from_numpy(x)).numpy()
    for variant, level in (
        ("folded", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        ("unfolded", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(small_bundle / f"{variant}.onnx"), opts)
        out = sess.run(None, {"input": x})[0]
        # float32 through ~6 layers: a few ulps of the logit scale; 1e-5 relative is 80 ulps.
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_equivalence_report_is_measured_and_within_tolerance(small_bundle, digits_splits):
    m = read_manifest(small_bundle)
    eq = m.equivalence
    assert eq.n_images == len(digits_splits.test.y) and eq.passed
    assert 0 < eq.folded_vs_unfolded.max_abs_diff <= eq.tolerance_abs
    assert eq.folded_vs_unfolded.top1_agreement == 1.0
    # The fold's own error against float64 is of the order of the unfolded model's float32 error.
    assert eq.folded_vs_float64.max_abs_diff < 10 * eq.unfolded_vs_float64.max_abs_diff
    assert [d.bn for d in eq.per_layer] == ["stem.bn", "features.0.bn", "features.2.bn", "bn_fc"]
    for d in eq.per_layer:
        assert d.max_rel_diff < 1e-5, d  # per-layer float32 noise, far below any real change


def test_equivalence_report_matches_an_independent_recomputation(small_bundle, digits_splits):
    """Recompute folded vs unfolded with plain onnxruntime calls and compare to the report."""
    x = digits_splits.test.x
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfolded = ort.InferenceSession(str(small_bundle / "unfolded.onnx"), opts).run(
        None, {"input": x}
    )[0]
    folded = ort.InferenceSession(str(small_bundle / "folded.onnx")).run(None, {"input": x})[0]
    eq = read_manifest(small_bundle).equivalence
    report = eq.folded_vs_unfolded
    diff = np.abs(folded.astype(np.float64) - unfolded)
    # Chunking may change onnxruntime's kernel choice; agree within float32 noise of the scale.
    assert abs(diff.max() - report.max_abs_diff) <= 1e-5 * np.abs(unfolded).max()
    own = eq.unfolded_vs_float64.max_abs_diff if eq.unfolded_vs_float64 else 0.0
    assert eq.tolerance_abs == pytest.approx(
        max(REL_TOLERANCE * max(1, np.abs(unfolded).max()), FLOAT32_ERRORS * own), rel=1e-3
    )


def test_manifest_checksums_and_tamper_detection(small_bundle, tmp_path):
    m = load_bundle(small_bundle)
    for f in m.files.values():
        assert f.sha256 == sha256_file(small_bundle / f.path)
    copy = tmp_path / "b"
    shutil.copytree(small_bundle, copy)
    with open(copy / "folded.onnx", "r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"\x00" * 4)
    with pytest.raises(BundleError, match="sha256 mismatch for the folded model"):
        load_bundle(copy)


def test_manifest_schema_refuses_unknown_fields(small_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(small_bundle, copy)
    raw = json.loads((copy / "bundle.json").read_text())
    raw["surprise"] = 1
    (copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="invalid manifest at surprise"):
        read_manifest(copy)


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    def crash(tmp):
        (tmp / "folded.onnx").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_bundle_atomically(tmp_path / "m", crash)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_an_existing_bundle(tmp_path):
    write_bundle_atomically(tmp_path / "m", lambda t: (t / "a").write_text("1"))
    write_bundle_atomically(tmp_path / "m", lambda t: (t / "b").write_text("2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["b"]


def test_residual_post_placement_bundle(digits_splits, tmp_path):
    """A residual model with BN after ReLU: some BNs fold forward, padded ones stay as BN."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[8, 16], hidden=16, residual=True, bn_placement="post"))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(digits_splits.train.x[:64]))
    m = export_bundle(
        model.eval(),
        name="res",
        classes=digits_splits.test.classes,
        spec=digits_splits.test.spec,
        eval_x=digits_splits.test.x[:128],
        split="test",
        out_dir=tmp_path,
    )
    refused = [r for r in m.fold_report if not r.folded]
    assert refused and m.files["folded"].batchnorm_nodes == len(refused)
    assert m.files["unfolded"].batchnorm_nodes == len(m.fold_report)
    assert any(r.direction == "forward" for r in m.fold_report if r.folded)
    assert m.equivalence.passed


@pytest.mark.parametrize(
    ("node", "path"),
    [
        ("/stem/conv/Conv", "stem.conv"),
        ("/features/features.0/conv1/Conv", "features.0.conv1"),
        ("/features/features.1/downsample/downsample.0/Conv", "features.1.downsample.0"),
        ("/fc2/Gemm", "fc2"),
        ("Identity_3", ""),
    ],
)
def test_scope_names_map_to_module_paths(node, path):
    assert scope_to_module_path(node) == path


def test_the_bundle_carries_its_bn_statistics_check_on_the_held_out_split(small_bundle):
    check = read_manifest(small_bundle).bn_statistics
    assert check.checked and check.flagged == [] and check.inputs.endswith("test split")
    assert [r.bn for r in check.layers] == ["stem.bn", "features.0.bn", "features.2.bn", "bn_fc"]
