"""bnfold import: hand-built ONNX classifiers in, bundles out, checked against onnxruntime on the
user's original file (the independent reference); every bad input through the real CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from bnfold.bundle import load_bundle, read_manifest, sha256_file
from bnfold.errors import BnfoldError
from bnfold.preprocess import PreprocessSpec, generated_batch, preprocess_bytes
from bnfold.toolchain.image_input import read_class_file
from bnfold.toolchain.importer import (
    ImportOptions,
    NotEquivalentError,
    equivalence_inputs,
    import_model,
)
from bnfold.toolchain.reference import evaluate_float64
from bnfold.toolchain.verify import INPUT_BUDGET, verify_bundle
from tests.bnfold.toolchain.import_graphs import (
    classifier,
    simple_model,
    with_fixed_batch_reshape,
    with_two_inputs,
)

BNFOLD = shutil.which("bnfold", path=str(Path(sys.executable).parent))
DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def ort_run(path_or_model, x: np.ndarray, level=DISABLE_ALL) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    s = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def test_import_writes_a_bundle_like_training(tmp_path, models):
    original = classifier("NCHW", "bn", batch=1)
    src = save(original, tmp_path / "net.onnx")
    m = import_model(src, ImportOptions(name="net", models_dir=models))
    d = models / "net"
    assert sorted(p.name for p in d.iterdir()) == ["bundle.json", "folded.onnx", "unfolded.onnx"]
    assert load_bundle(d) == m  # checksums as written
    assert m.imported.sha256 == sha256_file(src)
    assert m.files["unfolded"].op_counts["BatchNormalization"] == 1
    assert "BatchNormalization" not in m.files["folded"].op_counts
    assert [(r.op, r.folded, r.direction, r.into) for r in m.fold_report] == [
        ("BatchNormalization", True, "backward", m.fold_report[0].into)
    ]
    # Batch 1 fixed in the file: made variable for serving, and the change is recorded.
    assert any("batch axis 1 -> variable" in c for c in m.imported.changes)
    unfolded = onnx.load(str(d / "unfolded.onnx"))
    assert unfolded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.input.shape == [-1, 3, 8, 8] and m.output.shape == [-1, 3]
    assert m.input.preprocess.layout == "NCHW" and m.input.preprocess.color_mode == "RGB"
    # The report's figures are what onnxruntime measures on the stated inputs, and the
    # unfolded bundle file computes what the user's file computes, row by row, exactly.
    x = generated_batch(m.input.preprocess, 64, seed=0)
    folded = ort_run(str(d / "folded.onnx"), x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    unfolded_out = ort_run(str(d / "unfolded.onnx"), x)
    by_row = np.concatenate([ort_run(str(src), x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(unfolded_out, by_row)
    eq = m.equivalence
    assert eq.split == "generated" and eq.n_images == 64 and "seed 0" in eq.inputs
    assert eq.folded_vs_unfolded.max_abs_diff == float(np.abs(folded - unfolded_out).max())
    ref64 = evaluate_float64(original, "x", x, batch=1)
    assert eq.folded_vs_float64.max_abs_diff == pytest.approx(np.abs(folded - ref64).max())
    # float32 rounding of logits of scale ~1: a few 1e-7, far inside the stated tolerance.
    assert eq.passed and eq.folded_vs_unfolded.max_abs_diff <= eq.tolerance_abs
    assert eq.unfolded_vs_float64.max_abs_diff < 1e-5
    assert [p.bn for p in m.layer_probes] == ["bn"] and len(eq.per_layer) == 1
    assert eq.per_layer[0].max_abs_diff < 1e-5
    res = verify_bundle(d)
    assert res.ok, res.lines


def test_keras_style_nhwc_mul_add_folds_and_serves_nhwc(tmp_path, models):
    original = classifier("NHWC", "muladd", batch="N")
    src = save(original, tmp_path / "keras.onnx")
    m = import_model(src, ImportOptions(name="keras", models_dir=models, num_classes=3))
    assert m.input.shape == [-1, 8, 8, 3] and m.input.preprocess.layout == "NHWC"
    assert m.imported.changes == []  # already a variable batch: the file is served as given
    assert [(r.op, r.folded) for r in m.fold_report] == [("Mul/Add", True)]
    counts = m.files["folded"].op_counts
    assert "Mul" not in counts and "Add" not in counts
    assert m.files["unfolded"].op_counts["Mul"] == 1
    assert m.files["unfolded"].batchnorm_nodes == m.files["folded"].batchnorm_nodes == 0
    # An image through the shared preprocessing (NHWC) gives the original file's logits.
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = preprocess_bytes(buf.getvalue(), m.input.preprocess)[None]
    assert x.shape == (1, 8, 8, 3)
    want = ort_run(str(src), x)
    got = ort_run(str(models / "keras" / "folded.onnx"), x)
    assert np.abs(got - want).max() <= m.equivalence.tolerance_abs
    assert verify_bundle(models / "keras").ok


@pytest.mark.parametrize("opset, ir", [(17, 8), (7, 3)])
def test_initializers_listed_as_inputs_become_constants_and_fold(tmp_path, models, opset, ir):
    """Older exporters list every weight among the graph inputs (overridable, so not constant);
    the server never feeds them, so the import makes them plain initializers and says so. IR
    version 3 (opset 7 era) requires that listing, so it becomes IR 4, recorded too."""
    original = classifier("NCHW", "bn", batch="N", opset=opset)
    original.ir_version = ir
    for t in original.graph.initializer:
        original.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    src = save(original, tmp_path / "old.onnx")
    m = import_model(src, ImportOptions(name="old", models_dir=models))
    assert [r.folded for r in m.fold_report] == [True]
    assert any("8 initializers no longer listed as graph inputs" in c for c in m.imported.changes)
    assert any("IR version 3 -> 4" in c for c in m.imported.changes) == (ir == 3)
    unfolded = onnx.load(str(models / "old" / "unfolded.onnx"))
    assert [i.name for i in unfolded.graph.input] == ["x"]
    x = generated_batch(m.input.preprocess, 8)
    np.testing.assert_array_equal(
        ort_run(str(models / "old" / "unfolded.onnx"), x), ort_run(str(src), x)
    )


def test_sample_images_are_the_equivalence_inputs(tmp_path, models):
    samples = tmp_path / "samples"
    (samples / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(samples / ("sub" if i % 2 else ".") / f"img{i}.png")
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    opts = ImportOptions(name="s", models_dir=models, samples=samples, classes=["a", "b", "c"])
    m = import_model(src, opts)
    eq = m.equivalence
    assert (eq.split, eq.n_images) == ("samples", 5) and str(samples) in eq.inputs
    files = sorted(p for p in samples.rglob("*.png"))
    x = np.stack([preprocess_bytes(p.read_bytes(), m.input.preprocess) for p in files])
    folded = ort_run(
        str(models / "s" / "folded.onnx"), x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    unfolded = ort_run(str(models / "s" / "unfolded.onnx"), x)
    assert eq.folded_vs_unfolded.max_abs_diff == float(np.abs(folded - unfolded).max())
    assert m.classes == ["a", "b", "c"]


def test_graph_without_affine_has_no_probes_and_says_so(tmp_path, models):
    src = save(classifier("NCHW", None, batch="N"), tmp_path / "plain.onnx")
    m = import_model(src, ImportOptions(name="plain", models_dir=models))
    assert m.fold_report == [] and m.layer_probes == [] and m.equivalence.per_layer == []
    assert "nothing was folded" in m.layer_probes_note
    assert m.equivalence.folded_vs_unfolded.max_abs_diff <= m.equivalence.tolerance_abs
    assert verify_bundle(models / "plain").ok


def test_refused_bn_stays_in_both_files_and_verify_counts_it(tmp_path, models):
    src = save(classifier("NCHW", "input_bn", batch="N"), tmp_path / "inbn.onnx")
    m = import_model(src, ImportOptions(name="inbn", models_dir=models))
    assert [(r.bn, r.folded) for r in m.fold_report] == [("input_bn", False)]
    assert m.fold_report[0].reason
    assert m.files["unfolded"].batchnorm_nodes == m.files["folded"].batchnorm_nodes == 1
    assert m.layer_probes == [] and m.layer_probes_note
    assert verify_bundle(models / "inbn").ok


def test_not_equivalent_writes_nothing(tmp_path, models, monkeypatch, capsys):
    """A fold that changed the function (a perturbed weight) is caught and nothing written."""
    import bnfold.toolchain.build as build

    real = build.fold_onnx

    def broken_fold(model):
        folded, report = real(model)
        w = next(t for t in folded.graph.initializer if t.name.startswith("fc_w"))
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1.01, w.name))
        return folded, report

    monkeypatch.setattr(build, "fold_onnx", broken_fold)
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    with pytest.raises(NotEquivalentError, match="not equivalent"):
        import_model(src, ImportOptions(name="net", models_dir=models))
    assert list(models.iterdir()) == []  # not even a hidden temporary folder
    from bnfold.cli import main

    assert main(["import", str(src), "--name", "net", "--models-dir", str(models)]) == 1
    assert "no bundle written" in capsys.readouterr().err
    assert list(models.iterdir()) == []


def test_fold_command_writes_nothing_when_onnxruntime_disagrees(tmp_path, monkeypatch, capsys):
    """`bnfold fold` compares the fold with the original in onnxruntime before it writes: a
    wrong fold (a perturbed weight) exits 1 with nothing written; a right one says its diff."""
    import bnfold.toolchain.fold as onnx_fold
    from bnfold.cli import main

    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    assert main(["fold", str(src), str(tmp_path / "ok.onnx")]) == 0
    out = capsys.readouterr().out
    assert "folded vs original in onnxruntime on 8 random N(0, 1) inputs" in out
    assert (tmp_path / "ok.onnx").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    before = src.read_bytes()
    assert main(["fold", str(src), str(tmp_path / "." / "net.onnx")]) == 2  # its own source
    assert "is the model being folded" in capsys.readouterr().err
    assert src.read_bytes() == before
    real = onnx_fold.fold_onnx

    def broken_fold(model):
        folded, report = real(model)
        w = next(t for t in folded.graph.initializer if t.name == "conv_b")
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) + 1e-3, w.name))
        return folded, report

    huge = save(classifier("NCHW", "bn", batch="N", size=5000), tmp_path / "huge.onnx")
    assert main(["fold", str(huge), str(tmp_path / "h.onnx")]) == 0  # folded, not measured
    assert "not measured: one input 'x' holds 7.5e+07 values" in capsys.readouterr().out
    log = classifier("NCHW", "bn", batch="N")  # NaN wherever the logits are negative
    log.graph.node[-1].output[0] = "z"
    log.graph.node.append(onnx.helper.make_node("Log", ["z"], ["logits"]))
    assert main(["fold", str(save(log, tmp_path / "log.onnx")), str(tmp_path / "l.onnx")]) == 0
    assert "max |diff|" in capsys.readouterr().out
    monkeypatch.setattr(onnx_fold, "fold_onnx", broken_fold)
    assert main(["fold", str(src), str(tmp_path / "bad.onnx")]) == 1
    assert "differs from" in capsys.readouterr().err
    written = ["h.onnx", "huge.onnx", "l.onnx", "log.onnx", "net.onnx", "ok.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == written


def test_fold_check_allows_the_originals_own_float32_error():
    """`bnfold fold`'s check, given the original's float64 answer: its tolerance widens to 3x
    the original's own float32 error (a full-size ResNet-50 on random inputs differed by
    3.27e-5 against 2e-5 of its scale, 3.64e-5); without it, 2e-5 of the scale; a wrong
    fold fails either way."""
    from bnfold.toolchain.verify import _output_diff

    exact = np.array([[1.82, -0.4, 0.9]])
    original = (exact + [[2.5e-5, 0, 0]]).astype(np.float32)  # its own float32 error
    folded = (exact - [[1.5e-5, 0, 0]]).astype(np.float32)  # as close, the other side
    diff, tol = _output_diff(original, folded, 0.0)
    assert diff > tol == pytest.approx(2e-5 * 1.82, rel=1e-4)  # 2e-5 of the scale alone
    diff, tol = _output_diff(original, folded, 0.0, exact)
    assert diff <= tol and tol == pytest.approx(3 * 2.5e-5, rel=0.02)
    wrong = (exact + [[0, 1e-3, 0]]).astype(np.float32)
    diff, tol = _output_diff(original, wrong, 0.0, exact)
    assert diff > tol
    diff, tol = _output_diff(original, folded, 0.0, np.zeros((2, 3)))  # not its shape: ignored
    assert tol == pytest.approx(2e-5 * 1.82, rel=1e-4)


def test_ctrl_c_mid_import_is_one_line_and_leaves_nothing(tmp_path, models, monkeypatch, capsys):
    import bnfold.toolchain.build as build
    from bnfold.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "measure_equivalence", interrupted)  # inside the bundle write
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    assert main(["import", str(src), "--name", "net", "--models-dir", str(models)]) == 130
    assert capsys.readouterr().err == "bnfold: interrupted; nothing written\n"
    assert list(models.iterdir()) == []  # not even the temporary folder


def _float16_inside() -> onnx.ModelProto:
    """float32 in and out, float16 between: Cast -> Conv -> BN -> Relu -> pool -> MatMul -> Cast."""
    rng = np.random.default_rng(8)
    half = {
        "w": rng.normal(0, 0.3, (8, 3, 3, 3)), "g": rng.uniform(0.5, 2, 8),
        "b": rng.normal(0, 1, 8), "m": rng.normal(0, 1, 8), "v": rng.uniform(0.5, 2, 8),
        "fc": rng.normal(0, 0.3, (8, 5)),
    }  # fmt: skip
    mk = onnx.helper.make_node
    nodes = [
        mk("Cast", ["x"], ["x16"], to=onnx.TensorProto.FLOAT16),
        mk("Conv", ["x16", "w"], ["c"], pads=[1] * 4),
        mk("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        mk("Relu", ["bn"], ["r"]), mk("GlobalAveragePool", ["r"], ["p"]),
        mk("Flatten", ["p"], ["f"]), mk("MatMul", ["f", "fc"], ["y16"]),
        mk("Cast", ["y16"], ["logits"], to=onnx.TensorProto.FLOAT),
    ]  # fmt: skip
    graph = onnx.helper.make_graph(
        nodes, "half", [onnx.helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("logits", 1, ["N", 5])],
        [numpy_helper.from_array(v.astype(np.float16), k) for k, v in half.items()],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_float16_layers_inside_a_float32_model(tmp_path, models, capsys):
    """Folding changes float16 rounding (~1e-3 of the scale): `bnfold fold` accepts that
    within float16's own rounding; the import says why it is not equivalent, instead of an
    internal error from a float32 probe on a float16 tensor; such layers get no probes."""
    from bnfold.cli import main
    from bnfold.toolchain.build import layer_probes
    from bnfold.toolchain.fold import fold_onnx

    src = save(_float16_inside(), tmp_path / "half.onnx")
    assert main(["fold", str(src), str(tmp_path / "f.onnx")]) == 0
    assert main(["import", str(src), "--name", "h", "--models-dir", str(models)]) == 1
    assert "the model computes in float16" in capsys.readouterr().err
    assert not models.exists() or list(models.iterdir()) == []
    folded, report = fold_onnx(onnx.load(str(src)))
    probes, note = layer_probes(report.rows, onnx.load(str(src)), folded)
    assert probes == [] and "not float32" in note


def test_verify_fails_a_tampered_imported_bundle(tmp_path, models):
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    import_model(src, ImportOptions(name="net", models_dir=models))
    manifest = json.loads((models / "net" / "bundle.json").read_text())
    manifest["files"]["folded"]["op_counts"]["Conv"] = 2  # counts no longer what the file holds
    (models / "net" / "bundle.json").write_text(json.dumps(manifest))
    res = verify_bundle(models / "net")
    assert not res.ok and any("node counts" in line for line in res.lines)


@pytest.mark.parametrize("opset", [9, 13, 15])
def test_float64_reference_uses_running_statistics_with_momentum_set(tmp_path, models, opset):
    """PyTorch's TorchScript exporter sets BN's momentum; onnx.reference's BatchNormalization
    for opsets 9-13 then normalized with the batch's own statistics, so every float64 column
    of such a bundle was off by ~1e-2. The reference must be what onnxruntime computes (the
    independent reference here) to float32 rounding."""
    model = classifier("NCHW", "bn", batch="N", opset=opset)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(onnx.helper.make_attribute("momentum", 0.9))
    x = np.random.default_rng(4).normal(size=(6, 3, 8, 8)).astype(np.float32)
    want = ort_run(model, x)
    got = evaluate_float64(model, "x", x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    m = import_model(save(model, tmp_path / "net.onnx"), ImportOptions(name="n", models_dir=models))
    assert m.equivalence.unfolded_vs_float64.max_abs_diff <= m.equivalence.tolerance_abs


def test_class_file_byte_order_mark_and_blank_lines_are_not_names(tmp_path):
    (tmp_path / "c.txt").write_bytes("\ufeffcat\r\n\r\n dog \r\nbird\r\n".encode())
    assert read_class_file(tmp_path / "c.txt") == ["cat", "dog", "bird"]


def test_large_inputs_are_measured_on_fewer_images_within_the_memory_budget(tmp_path):
    """64 generated 2048x2048 RGB inputs would hold 3.2 GB (and 512 samples 26 GB): the count
    shrinks to what INPUT_BUDGET holds, at least one, and the report says how many."""
    big = PreprocessSpec(color_mode="RGB", height=2048, width=2048, mean=[0] * 3, std=[1] * 3)
    x, split, desc = equivalence_inputs(big, ImportOptions(name="n"))
    want = max(1, INPUT_BUDGET // (3 * 2048 * 2048))
    assert x.shape == (want, 3, 2048, 2048) and desc.startswith(f"{want} uniform")
    small = PreprocessSpec(color_mode="L", height=8, width=8, mean=[0], std=[1])
    assert len(equivalence_inputs(small, ImportOptions(name="n"))[0]) == 64
    (tmp_path / "s").mkdir()
    for i in range(3):
        Image.new("RGB", (5, 4), (i, 0, 0)).save(tmp_path / "s" / f"{i}.png")
    x, split, _ = equivalence_inputs(big, ImportOptions(name="n", samples=tmp_path / "s"))
    assert split == "samples" and len(x) == min(3, want)


def test_softmax_head_and_extra_outputs_are_imported_with_a_warning(tmp_path):
    """A Softmax at the end and a second output: imported, and the summary says that the
    output is probabilities (reported as they are) and what is not served."""
    model = classifier("NCHW", "bn", batch="N")
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(onnx.helper.make_node("Softmax", ["z"], ["logits"], axis=1))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, ["N", 4])
    )
    src = save(model, tmp_path / "soft.onnx")
    proc = subprocess.run(
        [BNFOLD, "import", str(src), "--name", "s", "--models-dir", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, proc.stdout
    assert "serves 'logits' only (not 'f')" in warnings[0]
    assert "comes out of Softmax" in warnings[1]
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    served = ort_run(str(tmp_path / "m" / "s" / "unfolded.onnx"), x)
    np.testing.assert_array_equal(served, ort_run(model, x))  # the original's first output
    # The output is the score: /v1 reports it as it is, not a softmax of it (which flattens).
    manifest = read_manifest(tmp_path / "m" / "s")
    assert manifest.output.probabilities is True
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    settings = Settings(models_dir=tmp_path / "m", provider="cpu", grpc_port=0)
    tensor = {"name": manifest.input.name, "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist()}  # fmt: skip
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/models/s/compare?top_k=4", json={"inputs": [tensor]})
    assert r.status_code == 200, r.text
    for row, want in zip(r.json()["unfolded"], served, strict=True):
        got = {c["index"]: c["probability"] for c in row["top_k"]}
        np.testing.assert_allclose([got[i] for i in range(len(want))], want, rtol=0, atol=1e-7)


def test_output_flag_picks_the_logits_when_features_come_first(tmp_path, models):
    """(features, logits) outputs: refused with a pointer to --output; with it, the bundle
    serves the logits and its float64 columns are measured on that output too."""
    model = classifier("NCHW", "bn", batch="N")
    model.graph.output.insert(
        0, onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    )
    src = save(model, tmp_path / "two.onnx")
    with pytest.raises(BnfoldError, match="choose the logits with --output NAME"):
        import_model(src, ImportOptions(name="t", models_dir=models))
    labels = onnx.ModelProto()
    labels.CopyFrom(model)
    labels.graph.node.append(onnx.helper.make_node("ArgMax", ["logits"], ["label"], axis=1))
    labels.graph.output.insert(
        0, onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N", 1])
    )
    with pytest.raises(BnfoldError, match="'label' is int64; .* --output NAME"):
        import_model(
            save(labels, tmp_path / "lab.onnx"), ImportOptions(name="t", models_dir=models)
        )
    m = import_model(src, ImportOptions(name="t", models_dir=models, output_name="logits"))
    assert m.output.name == "logits" and m.output.shape == [-1, 3]
    assert m.equivalence.unfolded_vs_float64.max_abs_diff <= m.equivalence.tolerance_abs


def test_verify_reports_an_unreadable_model_whose_checksum_was_forged(tmp_path, models):
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    import_model(src, ImportOptions(name="net", models_dir=models))
    (models / "net" / "folded.onnx").write_bytes(b"\x08\x07garbage")
    manifest = json.loads((models / "net" / "bundle.json").read_text())
    manifest["files"]["folded"]["sha256"] = sha256_file(models / "net" / "folded.onnx")
    (models / "net" / "bundle.json").write_text(json.dumps(manifest))
    res = verify_bundle(models / "net")
    assert not res.ok and "FAIL folded.onnx: not a readable ONNX model" in res.lines


def test_layout_default_is_nchw_and_nhwc_is_its_transpose():
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (9, 7, 3), np.uint8)).save(png, "PNG")
    base = dict(color_mode="RGB", height=6, width=5, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])
    nchw = preprocess_bytes(png.getvalue(), PreprocessSpec(**base))
    nhwc = preprocess_bytes(png.getvalue(), PreprocessSpec(**base, layout="NHWC"))
    assert nchw.shape == (3, 6, 5) and nhwc.shape == (6, 5, 3)
    np.testing.assert_array_equal(nchw, nhwc.transpose(2, 0, 1))


# --- bad input: one line on stderr, exit 2, nothing written, never a traceback -------------


def _bad_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (import arguments after MODEL, expected fragment of the error line)."""
    good = save(classifier("NCHW", "bn", batch="N"), tmp / "good.onnx")
    (tmp / "text.onnx").write_text("this is a README, not a model\n")
    data = good.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    broken = classifier("NCHW", "bn", batch="N")
    broken.graph.node[0].input[0] = "no_such_tensor"
    save(broken, tmp / "checker.onnx")
    ext = tmp / "ext"
    ext.mkdir()
    onnx.save_model(
        classifier("NCHW", "bn", batch="N"),
        str(ext / "ext.onnx"),
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    (ext / "ext.onnx.data").unlink()
    outside = classifier("NCHW", "bn", batch="N")
    (tmp / "secret").write_bytes(b"0123")  # beside the folder of the model, not in it
    (tmp / "sub").mkdir()
    w = next(t for t in outside.graph.initializer if t.name == "conv_w")
    w.ClearField("raw_data")
    del w.float_data[:]
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret"), ("offset", "0"), ("length", "432")):
        w.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
    save(outside, tmp / "sub" / "outside.onnx")
    save(with_two_inputs(classifier("NCHW", "bn", batch="N")), tmp / "two.onnx")
    save(simple_model(onnx.TensorProto.INT64, ["N", 3, 8, 8]), tmp / "int.onnx")
    save(simple_model(onnx.TensorProto.FLOAT, ["N", 12]), tmp / "rank2.onnx")
    save(classifier("NCHW", "bn", batch="N", opset=30), tmp / "opset.onnx")
    save(with_fixed_batch_reshape(classifier("NCHW", "bn", batch=1)), tmp / "batch1.onnx")
    save(classifier("NCHW", "bn", batch="N", size=5000), tmp / "huge.onnx")
    negative_var = classifier("NCHW", "bn", batch="N")
    var = next(t for t in negative_var.graph.initializer if t.name == "bn_var")
    var.CopyFrom(numpy_helper.from_array(np.array([1, -1, 1, 1], np.float32), "bn_var"))
    save(negative_var, tmp / "nan.onnx")
    fails = classifier("NCHW", "bn", batch="N")  # a Reshape to a size no input has
    fails.graph.initializer.append(numpy_helper.from_array(np.int64([5, -1]), "bad_shape"))
    flat = next(n for n in fails.graph.node if n.op_type == "Flatten")
    flat.CopyFrom(onnx.helper.make_node("Reshape", [flat.input[0], "bad_shape"], ["f"]))
    save(fails, tmp / "fails.onnx")
    (tmp / "big_samples").mkdir()
    with open(tmp / "big_samples" / "disk.img", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: no real disk use
    (tmp / "two_classes.txt").write_text("cat\ndog\n")
    (tmp / "escape_classes.txt").write_text("cat\ndog\x1b[31m\nbird\n")
    (tmp / "latin1_classes.txt").write_bytes("caf\xe9\ndog\nbird\n".encode("latin-1"))
    (tmp / "models" / "taken").mkdir(parents=True)
    (tmp / "models" / "taken" / "keep.txt").write_text("mine")
    return {
        "not_onnx": (["text.onnx"], "not a readable ONNX model"),
        "truncated": (["truncated.onnx"], "truncated or corrupt"),
        "checker": (["checker.onnx"], "fails onnx.checker"),
        "external_data_missing": (["ext/ext.onnx"], "ext.onnx.data', which is missing"),
        "two_inputs": (["two.onnx"], "has 2 inputs (x, gain); name the image input with --input"),
        "two_inputs_named": (
            ["two.onnx", "--input", "x"],
            "other input(s) gain would have no value",
        ),
        "int_input": (["int.onnx"], "input 'x' is int64; bnfold serves float32 image tensors"),
        "rank2_input": (["rank2.onnx"], "has shape [N, 12]; bnfold serves rank-4 image tensors"),
        "opset": (["opset.onnx"], "cannot run this model (opsets: ai.onnx 30)"),
        "fixed_batch": (["batch1.onnx"], "fails on a batch of 2 images [2, 3, 8, 8]"),
        "overwrite": (["good.onnx", "--name", "taken"], "already exists: pass --force"),
        "class_count": (
            ["good.onnx", "--classes", "two_classes.txt"],
            "2 class names given but output 'logits' has 3 values per image",
        ),
        "num_classes": (["good.onnx", "--num-classes", "4"], "4 class names given"),
        "size_differs": (
            ["good.onnx", "--size", "16x16"],
            "differs from the fixed size 8x8 of input 'x'",
        ),
        "channels_mode": (["good.onnx", "--color-mode", "L"], "use --color-mode RGB"),
        "mean_count": (["good.onnx", "--mean", "0.1", "0.2"], "--mean has 2 values; give 1 or 3"),
        "no_name": (["good.onnx", "--name"], "expected one argument"),
        "class_escape": (["good.onnx", "--classes", "escape_classes.txt"], "control or invisible"),
        "class_latin1": (["good.onnx", "--classes", "latin1_classes.txt"], "cannot read it"),
        "fails_on_one": (["fails.onnx"], "fails to run on one all-zero image [1, 3, 8, 8]"),
        "external_outside": (["sub/outside.onnx"], "outside the model's folder"),
        "sample_too_big": (["good.onnx", "--samples", "big_samples"], "65 MiB, over the 64"),
        "mean_nan": (["good.onnx", "--mean", "nan"], "values must be finite numbers"),
        "std_inf": (["good.onnx", "--std", "inf"], "values must be finite numbers"),
        "scale_overflow": (["good.onnx", "--scale", "1e300"], "outside float32's range"),
        "std_negative": (["good.onnx", "--std", "-1"], "--std values must be > 0"),
        "num_classes_negative": (["good.onnx", "--num-classes", "-3"], "at least 2 classes"),
        "size_zero": (["good.onnx", "--size", "0x0"], "sizes must be >= 1 pixel"),
        "huge_input": (["huge.onnx"], "at most 4096x4096"),
        "nan_logits": (["nan.onnx"], "computes NaN or infinite 'logits' for"),
    }


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _bad_files(tmp)


CASES = [
    "not_onnx", "truncated", "checker", "external_data_missing", "two_inputs",
    "two_inputs_named", "int_input", "rank2_input", "opset", "fixed_batch", "overwrite",
    "class_count", "num_classes", "size_differs", "channels_mode", "mean_count", "no_name",
    "mean_nan", "std_inf", "scale_overflow", "std_negative", "num_classes_negative", "size_zero",
    "huge_input", "nan_logits", "class_escape", "class_latin1", "fails_on_one",
    "external_outside", "sample_too_big",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_import_is_one_line_exit_2_nothing_written(bad_dir, case):
    tmp, cases = bad_dir
    args, fragment = cases[case]
    before = sorted(str(p) for p in (tmp / "models").rglob("*"))
    name = [] if "--name" in args else ["--name", "x"]
    proc = subprocess.run(
        [BNFOLD, "import", *args, *name, "--models-dir", "models"],
        cwd=tmp, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]
    assert lines[0].startswith("bnfold")
    assert sorted(str(p) for p in (tmp / "models").rglob("*")) == before  # nothing written
    assert proc.stdout == ""


def test_force_replaces_a_bundle_and_fold_and_verify_errors_are_one_line(bad_dir, tmp_path):
    tmp, _ = bad_dir
    ok = subprocess.run(
        [BNFOLD, "import", "good.onnx", "--name", "again", "--models-dir", str(tmp_path)],
        cwd=tmp, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "imported" in ok.stdout and "folded 1/1" in ok.stdout
    runs = {
        "force": ["import", "good.onnx", "--name", "again", "--models-dir", str(tmp_path),
                  "--force"],
        "fold_not_onnx": ["fold", "text.onnx", str(tmp_path / "out.onnx")],
        "fold": ["fold", "good.onnx", str(tmp_path / "good.folded.onnx")],
        "verify_missing": ["verify", str(tmp_path / "nope")],
    }  # fmt: skip
    results = {
        k: subprocess.run([BNFOLD, *a], cwd=tmp, capture_output=True, text=True, timeout=120)
        for k, a in runs.items()
    }
    assert results["force"].returncode == 0, results["force"].stderr
    for key in ("fold_not_onnx", "verify_missing"):
        r = results[key]
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()
    fold = results["fold"]
    assert fold.returncode == 0 and "bn: folded backward into" in fold.stdout, fold.stderr
    folded = onnx.load(str(tmp_path / "good.folded.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = np.random.default_rng(2).normal(size=(4, 3, 8, 8)).astype(np.float32)
    want = ort_run(str(tmp / "good.onnx"), x)
    assert np.abs(ort_run(folded, x) - want).max() <= 2e-5 * max(1.0, np.abs(want).max())
    verify = subprocess.run([BNFOLD, "verify", str(tmp_path / "again")], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert verify.returncode == 0 and "verified" in verify.stdout, verify.stdout


def test_a_reference_failure_is_reported_and_onnxruntime_decides(tmp_path, models, monkeypatch):
    """An op the float64 reference cannot evaluate is not the user's error: the bundle is
    written, judged by onnxruntime's folded vs unfolded comparison, and the report says why the
    float64 figures are missing."""
    import bnfold.toolchain.importer as importer
    from bnfold.toolchain.reference import ReferenceUnavailable

    def unavailable(*args, **kwargs):
        raise ReferenceUnavailable("MaxPool", "pool", "ValueError: sizes disagree")

    monkeypatch.setattr(importer, "evaluate_float64", unavailable)
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    m = import_model(src, ImportOptions(name="net", models_dir=models))
    eq = m.equivalence
    assert eq.passed and eq.folded_vs_float64 is None and eq.unfolded_vs_float64 is None
    assert eq.reference_note == (
        "float64 reference not measured: MaxPool (node 'pool'): ValueError: sizes disagree"
    )
    assert verify_bundle(models / "net").ok


def test_a_successful_import_prints_each_stage_with_its_time(tmp_path, models):
    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    proc = subprocess.run(
        [BNFOLD, "import", str(src), "--name", "net", "--models-dir", str(models)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stages = [
        line.split(":")[1].strip() for line in proc.stdout.splitlines() if line.startswith("time:")
    ]
    assert stages == [
        "load and check", "BN statistics", "fold", "float64 reference", "write", "measure"
    ]  # fmt: skip


def test_import_with_bf16_proves_it_on_this_cpu_and_stores_the_check_inputs(tmp_path, models):
    from bnfold.toolchain.engines import OpenVinoSession, native_bf16
    from bnfold.toolchain.precision import load_check_inputs

    src = save(classifier("NCHW", "bn", batch="N"), tmp_path / "net.onnx")
    m = import_model(src, ImportOptions(name="net", models_dir=models, bf16=True))
    r = m.equivalence.bf16
    assert r is not None and r.precision == "bf16"
    x = load_check_inputs(models / "net", m)
    assert x is not None and len(x) == m.check_inputs.n_images == m.equivalence.n_images
    if not native_bf16():
        assert not r.passed and "natively" in r.reason and r.vs_folded is None
        return
    # independent recomputation: OpenVINO bf16 against onnxruntime float32 on the stored inputs
    want = ort_run(
        str(models / "net" / "folded.onnx"), x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    got = OpenVinoSession(models / "net" / "folded.onnx", "bf16").run(None, {"x": x})[0]
    agreement = float(np.mean(got.argmax(1) == want.argmax(1)))
    assert r.n_images == len(x) and r.vs_folded.top1_agreement == pytest.approx(agreement)
    assert r.passed == (agreement >= r.min_top1_agreement)  # the verdict its numbers give
    assert r.vs_folded.max_abs_diff == pytest.approx(float(np.abs(got - want).max()), rel=1e-6)


def test_fold_keeps_onnxruntime_quiet_when_the_original_fails_to_run(tmp_path):
    """onnxruntime logs a failed run itself ([E:onnxruntime:...] with terminal colours) before
    raising; the command says it in its own words only."""
    f = lambda n, v: numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    inits = [
        numpy_helper.from_array(np.array([3, -1], np.int64), "s"),
        f("w", np.eye(4)), f("b", np.zeros(4)),
        f("g", np.ones(4)), f("be", np.zeros(4)), f("m", np.zeros(4)), f("v", np.ones(4)),
    ]  # fmt: skip
    nodes = [
        onnx.helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
        onnx.helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["hb"]),
        onnx.helper.make_node("Reshape", ["hb", "s"], ["y"]),  # 8 x 4 values into (3, -1): fails
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, None])],
        inits,
    )
    src = save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
               tmp_path / "bad.onnx")  # fmt: skip
    proc = subprocess.run(
        [BNFOLD, "fold", str(src), str(tmp_path / "out.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "not measured: the original fails on random inputs" in proc.stdout
    assert proc.stderr == "" and "\x1b" not in proc.stdout


def _constant_of_shape_bomb() -> onnx.ModelProto:
    """11 bytes of graph that would allocate 1e9 floats: ReduceSum(ConstantOfShape([1e9])) * 0."""
    h = onnx.helper
    nodes = [
        h.make_node(
            "ConstantOfShape",
            ["shp"],
            ["big"],
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        ),
        h.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        h.make_node("Mul", ["s", "zero"], ["z"]),
        h.make_node("Add", ["x", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([10**9], np.int64), "shp"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
    ]
    io = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 3]) for n in ("x", "y")]
    return h.make_model(h.make_graph(nodes, "g", io[:1], io[1:], inits),
                        opset_imports=[h.make_opsetid("", 17)])  # fmt: skip


def _identity_chain(n: int) -> onnx.ModelProto:
    h = onnx.helper
    names = ["x", *(f"t{i}" for i in range(n - 1)), "y"]
    nodes = [h.make_node("Identity", [a], [b]) for a, b in zip(names, names[1:], strict=False)]
    io = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 3]) for n in ("x", "y")]
    return h.make_model(
        h.make_graph(nodes, "g", io[:1], io[1:]), opset_imports=[h.make_opsetid("", 17)]
    )


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (_constant_of_shape_bomb, "tensor 'big' would hold 1e+09 values"),
        (lambda: _identity_chain(100_000), "100000 nodes, over the 20000"),
    ],
)
def test_models_over_the_budget_are_refused_at_once(tmp_path, models, build, fragment):
    """Before: 33 s at 7.7 GB (the ConstantOfShape) and 53-87 s at 6.5 GB (the Identity chain),
    and a bundle written. Now both are refused from their shapes and node count."""
    src = save(build(), tmp_path / "m.onnx")
    for args in (["fold", str(src), str(tmp_path / "f.onnx")],
                 ["import", str(src), "--name", "m", "--models-dir", str(models)]):  # fmt: skip
        proc = subprocess.run([BNFOLD, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert fragment in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "f.onnx").exists() and not models.exists()


def test_constants_exported_as_inputs_are_named_with_what_to_do(tmp_path, models):
    """Keras 3's Normalization layer exports its mean and variance as graph inputs with no value:
    the refusal says so instead of only asking for --input (which would be refused next)."""
    m = classifier("NCHW", "bn", batch="N")
    m.graph.input.append(
        onnx.helper.make_tensor_value_info("norm/Sub/y:0", onnx.TensorProto.FLOAT, [1, 3, 1, 1])
    )
    m.graph.node.insert(0, onnx.helper.make_node("Sub", ["x", "norm/Sub/y:0"], ["xs"]))
    for node in m.graph.node[1:]:
        node.input[:] = ["xs" if v == "x" else v for v in node.input]
    src = save(m, tmp_path / "k.onnx")
    for extra in ([], ["--input", "x"]):
        proc = subprocess.run(
            [BNFOLD, "import", str(src), "--name", "k", "--models-dir", str(models), *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert "Keras Normalization layer's mean and variance" in proc.stderr
        assert "--mean/--std" in proc.stderr
