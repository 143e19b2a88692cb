"""bnfold.toolchain.quantize: static QDQ int8 quantization, its node counts, the report, its
criterion.

Small ONNX graphs built with onnx.helper (no torch): conv -> [BN] -> ReLU -> GAP -> Gemm. The
quantized files are checked against what the arithmetic of symmetric per-channel int8 weights and
MinMax uint8 activations guarantees, and the report against an independent onnxruntime run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bnfold.bundle import DiffStats, QuantSettings
from bnfold.preprocess import PreprocessSpec, preprocess_bytes
from bnfold.toolchain.quantize import (
    MAX_ACCURACY_DROP_POINTS,
    MIN_TOP1_AGREEMENT,
    QuantizeError,
    calibration_images,
    failure_reason,
    int8_report,
    measure_int8,
    quantize_model,
)

C_IN, C_MID, N_CLASSES, SIZE = 1, 8, 4, 6


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def tiny_model(path: Path, with_bn: bool, seed: int = 0) -> Path:
    """Conv(1->8, 3x3, pad 1) -> [BatchNormalization] -> Relu -> GAP -> Flatten -> Gemm(8->4)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w", rng.normal(0, 0.5, (C_MID, C_IN, 3, 3))),
        _init("b", rng.normal(0, 0.1, C_MID)),
        _init("fw", rng.normal(0, 1.0, (N_CLASSES, C_MID))),
        _init("fb", rng.normal(0, 0.1, N_CLASSES)),
    ]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])]
    relu_in = "c"
    if with_bn:
        inits += [
            _init("g", rng.uniform(0.5, 3.0, C_MID)),
            _init("beta", rng.normal(0, 0.5, C_MID)),
            _init("mean", rng.normal(0, 0.5, C_MID)),
            _init("var", rng.uniform(0.2, 2.0, C_MID)),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"])
        )
        relu_in = "n"
    nodes += [
        helper.make_node("Relu", [relu_in], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, C_IN, SIZE, SIZE)).astype(np.float32)


def run(model: Path | bytes, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    """An onnxruntime session of its own, independent of bnfold.toolchain.sessions."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("m") / "folded.onnx", with_bn=False)


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return inputs(64, seed=1)


@pytest.fixture(scope="module")
def quantized(folded: Path, calib: np.ndarray):
    return quantize_model(folded, calib, calibration_source="test inputs")


def initializers(model: bytes) -> dict[str, np.ndarray]:
    proto = onnx.load_from_string(model)
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def dq_inputs(model: bytes, consumer_op: str) -> list[list[str]]:
    """Inputs of the DequantizeLinear nodes feeding the weight input (1) of each consumer_op."""
    nodes = onnx.load_from_string(model).graph.node
    producer = {o: n for n in nodes for o in n.output}
    return [list(producer[n.input[1]].input) for n in nodes if n.op_type == consumer_op]


def test_weights_are_per_channel_symmetric_int8_within_half_a_step(folded, quantized):
    """Each output channel: zero point 0, scale max|w|/127, |dequantized - w| <= scale/2."""
    float_w = initializers(onnx.load(str(folded)).SerializeToString())
    inits = initializers(quantized.model)
    for op, name in (("Conv", "w"), ("Gemm", "fw")):
        (q_name, s_name, z_name) = dq_inputs(quantized.model, op)[0]
        q, scale, zp = inits[q_name], inits[s_name], inits[z_name]
        w = float_w[name].reshape(len(scale), -1).astype(np.float64)
        assert q.dtype == np.int8 and np.all(zp == 0)
        np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
        err = np.abs(q.reshape(len(scale), -1) * scale[:, None].astype(np.float64) - w)
        assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5)), op


def test_input_scale_is_minmax_of_the_calibration_data(quantized, calib):
    """uint8 MinMax: the range [min(0, lo), max(0, hi)] over calibration maps onto 0..255."""
    inits = initializers(quantized.model)
    lo, hi = min(0.0, float(calib.min())), max(0.0, float(calib.max()))
    np.testing.assert_allclose(inits["x_scale"], (hi - lo) / 255, rtol=1e-6)
    assert inits["x_zero_point"].dtype == np.uint8
    assert int(inits["x_zero_point"]) == round(-lo / ((hi - lo) / 255))


def test_logits_leave_the_model_as_float32_from_the_gemm(quantized):
    graph = onnx.load_from_string(quantized.model).graph
    producer = {o: n for n in graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_node_counts_of_the_file_and_of_the_fused_graph(quantized):
    proto = onnx.load_from_string(quantized.model)
    ops = [n.op_type for n in proto.graph.node]
    nodes = quantized.quantization.nodes
    assert nodes.quantize_linear == ops.count("QuantizeLinear")
    assert nodes.dequantize_linear == ops.count("DequantizeLinear")
    assert nodes.ops["Conv"] == 1 and nodes.ops["Gemm"] == 1
    assert nodes.int8_kernels["QLinearConv"] == 1 and nodes.int8_kernels["QGemm"] == 1
    assert nodes.float_ops == {}  # folded: every op runs on 8-bit data
    settings = quantized.quantization.settings
    assert (settings.format, settings.per_channel, settings.weight_type) == ("QDQ", True, "int8")
    assert (settings.activation_type, settings.calibration_method) == ("uint8", "minmax")
    assert settings.calibration_images == 64 and settings.onnxruntime == ort.__version__


def test_a_batchnorm_left_in_runs_in_float32(tmp_path, calib):
    """The same quantization on the unfolded graph: BN has no int8 kernel in onnxruntime."""
    unfolded = tiny_model(tmp_path / "unfolded.onnx", with_bn=True)
    q = quantize_model(unfolded, calib, calibration_source="test", optimize=False)
    assert q.quantization.nodes.ops["BatchNormalization"] == 1
    assert q.quantization.nodes.float_ops["BatchNormalization"] == 1
    # quant_pre_process's optimizer would fuse Conv+BN itself: optimize=True leaves no BN.
    fused = quantize_model(unfolded, calib, calibration_source="test", optimize=True)
    assert "BatchNormalization" not in fused.quantization.nodes.ops


def test_report_matches_an_independent_onnxruntime_run(folded, quantized):
    x, labels = inputs(200, seed=2), np.arange(200) % N_CLASSES
    settings = quantized.quantization.settings
    report = measure_int8(quantized.model, folded, x, labels, split="test", settings=settings)
    a, ref = run(quantized.model, x).astype(np.float64), run(folded, x).astype(np.float64)
    assert report.int8_vs_folded.max_abs_diff == pytest.approx(np.abs(a - ref).max(), rel=1e-12)
    assert report.int8_vs_folded.mean_abs_diff == pytest.approx(np.abs(a - ref).mean(), rel=1e-9)
    assert report.int8_vs_folded.top1_agreement == np.mean(a.argmax(1) == ref.argmax(1))
    assert report.accuracy_int8 == np.mean(a.argmax(1) == labels)
    assert report.accuracy_drop_points == pytest.approx(
        100 * (np.mean(ref.argmax(1) == labels) - np.mean(a.argmax(1) == labels))
    )
    assert report.passed == (report.reason is None)


@pytest.mark.parametrize(("method", "activation"), [("entropy", "uint8"), ("percentile", "int8")])
def test_other_methods_and_int8_activations(folded, calib, method, activation):
    calib = calib[:40]  # not a multiple of the calibration batch: the histograms must cope
    q = quantize_model(
        folded, calib, calibration_source="t", method=method, activation_type=activation
    )
    assert q.quantization.settings.calibration_method == method
    dtype = np.uint8 if activation == "uint8" else np.int8
    assert initializers(q.model)["x_zero_point"].dtype == dtype
    ref, out = run(folded, calib), run(q.model, calib)
    # On the calibration data nothing clips: each layer adds about half a step (range / 255)
    # per tensor, so two layers stay far below 10% of the logit scale.
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def _settings() -> QuantSettings:
    return QuantSettings(
        calibration_images=1, calibration_source="t", pre_process="p", onnxruntime="x"
    )


def _logits(n: int, flips: int) -> tuple[np.ndarray, np.ndarray]:
    """Folded logits with argmax 0, and int8 logits that disagree on the first `flips` rows."""
    ref = np.tile(np.array([2.0, 0.0, 0.0]), (n, 1))
    out = ref.copy()
    out[:flips] = [0.0, 2.0, 0.0]
    return out, ref


def test_criterion_agreement_boundary():
    out, ref = _logits(100, flips=1)  # exactly 99%: passes
    assert int8_report(out, ref, None, split="test", settings=_settings()).passed
    out, ref = _logits(1000, flips=11)  # 98.9%: fails, says why in one line
    r = int8_report(out, ref, None, split="test", settings=_settings())
    assert not r.passed
    assert r.reason == (
        "int8 top-1 agreement with folded float32 is 98.90% on the test images, below the 99% "
        "required"
    )


def test_criterion_accuracy_drop():
    out, ref = _logits(1000, flips=10)  # 99.0% agreement, but each flip loses a correct answer
    labels = np.zeros(1000, np.int64)
    r = int8_report(out, ref, labels, split="test", settings=_settings())
    assert r.passed and r.accuracy_drop_points == pytest.approx(1.0)
    stats = DiffStats(max_abs_diff=1, mean_abs_diff=1, max_rel_diff=1, top1_agreement=1.0)
    reason = failure_reason(stats, MAX_ACCURACY_DROP_POINTS + 0.01, "test")
    assert reason == (
        "int8 accuracy is 1.01 points below folded float32 on the test images, more than the 1 "
        "allowed"
    )
    assert MIN_TOP1_AGREEMENT == 0.99


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE), value, np.uint8)).save(path)
    return path


SPEC = PreprocessSpec(color_mode="L", height=SIZE, width=SIZE, mean=[0.5], std=[0.25])


def test_calibration_folder_is_read_through_the_shared_preprocessing(tmp_path):
    files = [_png(tmp_path / cls / f"{i}.png", 20 * i) for cls in "ab" for i in range(5)]
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    x = calibration_images(tmp_path, SPEC, limit=4, seed=0)
    assert x.shape == (4, 1, SIZE, SIZE)
    every = {preprocess_bytes(f.read_bytes(), SPEC).tobytes() for f in files}
    assert all(row.tobytes() in every for row in x)
    np.testing.assert_array_equal(x, calibration_images(tmp_path, SPEC, limit=4, seed=0))
    assert len(calibration_images(tmp_path, SPEC, limit=100)) == 10


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(QuantizeError, match=r"calibration folder .*missing does not exist"):
        calibration_images(tmp_path / "missing", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizeError, match=r"empty\b.* is empty: put images"):
        calibration_images(tmp_path / "empty", SPEC)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.csv").write_text("1,2")
    with pytest.raises(QuantizeError, match=r"holds no images \(1 other file\(s\), e.g. a.csv\)"):
        calibration_images(tmp_path / "text", SPEC)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(QuantizeError, match=r"x.png: not a usable calibration image"):
        calibration_images(tmp_path / "fake", SPEC)


def test_models_the_quantizer_cannot_handle(tmp_path, folded, calib):
    proto = onnx.load(str(folded))
    proto.graph.node[1].domain = "com.example"  # the Relu becomes an unknown custom op
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    custom = tmp_path / "custom.onnx"
    onnx.save(proto, str(custom))
    with pytest.raises(QuantizeError) as exc:
        quantize_model(custom, calib, calibration_source="t")
    assert str(exc.value) == (
        "custom.onnx: op 'Relu' of domain 'com.example' is not a standard ONNX op; "
        "onnxruntime's quantizer handles only standard ONNX ops"
    )
    relu_only = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        )
    )
    onnx.save(relu_only, str(tmp_path / "relu.onnx"))
    with pytest.raises(QuantizeError, match=r"relu.onnx: nothing to quantize \(no Conv, "):
        quantize_model(tmp_path / "relu.onnx", np.zeros((1, 2), np.float32), calibration_source="t")


def test_bad_calibration_and_settings(folded, calib):
    with pytest.raises(QuantizeError, match=r"calibration inputs are \(1, 5, 5\), the model"):
        quantize_model(folded, np.zeros((2, 1, 5, 5), np.float32), calibration_source="t")
    with pytest.raises(QuantizeError, match="NaN or Inf"):
        quantize_model(folded, np.full_like(calib, np.nan), calibration_source="t")
    with pytest.raises(QuantizeError) as exc:
        quantize_model(folded, calib, calibration_source="t", method="kl")
    assert str(exc.value) == (
        "Invalid calibration method 'kl'. Only minmax, entropy, percentile are supported."
    )
