"""Static INT8 quantization of a folded ONNX model, and the measurement that gates it.

onnxruntime.quantization.quantize_static in QDQ format: per-channel int8 weights, uint8 (default)
or int8 activations, calibrated on preprocessed images (MinMax by default; Entropy, Percentile).
Folding comes first: once BN is inside the conv weights, one per-channel weight scale covers
both, and no BatchNormalization op is left to run in float32 between int8 kernels (onnxruntime
has no int8 BatchNormalization kernel; a BN left in costs a dequantize/quantize round trip).

`quant_pre_process` runs first: ONNX shape inference, then (optimize=True, the default)
onnxruntime's basic graph optimization. On a folded model the optimizer finds nothing
left to fuse; optimize=False keeps it from fusing Conv+BN itself when an unfolded model is
quantized on purpose, to measure what folding first buys.

The int8 model is kept only if it agrees with the folded float32 model on held-out images: top-1
agreement >= 99% and accuracy at most 1 point lower. Otherwise no int8 file, a one-line reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from bnfold.bundle import DiffStats, Int8Report, Quantization, QuantNodeCounts, QuantSettings
from bnfold.equivalence import diff_stats
from bnfold.errors import BnfoldError
from bnfold.preprocess import PreprocessSpec, preprocess_bytes
from bnfold.toolchain.sessions import make_session, run_session

MIN_TOP1_AGREEMENT = 0.99
MAX_ACCURACY_DROP_POINTS = 1.0
DEFAULT_CALIBRATION_IMAGES = 256
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# onnxruntime's integer kernels after QDQ fusion (com.microsoft and ONNX standard ones).
INTEGER_KERNELS = {"QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# Symbolic shape inference is skipped: it serves transformer-style shape arithmetic, needs sympy
# (no dependency of the serve install), and ONNX's own shape inference types every CNN tensor.
PRE_PROCESS = {
    True: "quant_pre_process: ONNX shape inference, basic graph optimization",
    False: "quant_pre_process: ONNX shape inference, no graph optimization",
}


class QuantizeError(BnfoldError, ValueError):
    """The model or the calibration data cannot be quantized; the message says what to fix."""

    status_code = 400


@dataclass
class QuantizedModel:
    model: bytes  # the serialized QDQ ONNX model
    quantization: Quantization  # settings used and node counts


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed calibration inputs (N, C, H, W) float32 to the calibrator in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self.input_name, self.x, self.batch = input_name, x, batch
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.x), self.batch):
            yield {self.input_name: self.x[i : i + self.batch]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def calibration_subset(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n rows of x (N, C, H, W) drawn with `seed`, kept in order: a class-sorted split still
    gives every class its share."""
    if n < 1:
        raise QuantizeError(f"calibration needs at least 1 image, got {n}")
    if n >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))]


def calibration_images(
    folder: Path, spec: PreprocessSpec, limit: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0
) -> np.ndarray:
    """Up to `limit` images under `folder` (any depth), chosen with `seed`, preprocessed by the
    shared code: (N, C, H, W) float32."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantizeError(f"calibration folder {folder} does not exist or is not a folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    if not files:
        raise QuantizeError(f"calibration folder {folder} is empty: put images (.png, .jpg) in it")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise QuantizeError(
            f"calibration folder {folder} holds no images ({len(files)} other file(s), e.g. "
            f"{files[0].name}); expected {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if len(images) > limit:
        pick = np.random.default_rng(seed).choice(len(images), size=limit, replace=False)
        images = [images[i] for i in sorted(pick)]
    xs = []
    for path in images:
        try:
            xs.append(preprocess_bytes(path.read_bytes(), spec))
        except BnfoldError as exc:
            raise QuantizeError(f"{path}: not a usable calibration image: {exc.message}") from None
    return np.stack(xs)


def quantize_model(
    model_path: Path,
    calibration: np.ndarray,
    *,
    calibration_source: str,
    activation_type: str = "uint8",
    method: str = "minmax",
    optimize: bool = True,
    float_logits: bool = True,
) -> QuantizedModel:
    """Static QDQ int8 quantization of the ONNX model at model_path, calibrated on (N, C, H, W).

    float_logits drops the QuantizeLinear/DequantizeLinear pair on each graph output, so the last
    layer returns its int32 accumulation as float32 logits instead of 256 levels of them.
    """
    model_path = Path(model_path)
    proto = onnx.load(str(model_path))
    input_name = check_quantizable(proto, model_path.name, calibration)
    settings = QuantSettings(
        activation_type=_choice(activation_type, ACTIVATION_TYPES, "activation type"),
        calibration_method=_choice(method, METHODS, "calibration method"),
        calibration_images=len(calibration),
        calibration_source=calibration_source,
        pre_process=PRE_PROCESS[optimize],
        float_logits=float_logits,
        onnxruntime=ort.__version__,
    )
    # The histogram calibrators (entropy, percentile) stack every batch's tensors: batches of
    # unequal size (N not a multiple of 32) break them, so they get one image at a time.
    batch = 32 if settings.calibration_method == "minmax" else 1
    x = np.ascontiguousarray(calibration, np.float32)
    reader = ArrayCalibrationReader(input_name, x, batch)
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            with _quiet():
                quant_pre_process(
                    str(model_path),
                    str(pre),
                    skip_optimization=not optimize,
                    skip_symbolic_shape=True,  # see PRE_PROCESS
                )
                quantize_static(
                    str(pre),
                    str(out),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=ACTIVATION_TYPES[settings.activation_type],
                    weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[settings.calibration_method],
                )
        except Exception as exc:  # onnxruntime raises plain exceptions of many kinds
            raise QuantizeError(
                f"{model_path.name}: onnxruntime could not quantize it: {_first_line(exc)}"
            ) from None
        qproto = onnx.load(str(out))
    if float_logits:
        keep_float_outputs(qproto)
    data = qproto.SerializeToString()
    return QuantizedModel(data, Quantization(settings=settings, nodes=node_counts(data)))


def check_quantizable(proto: onnx.ModelProto, name: str, calibration: np.ndarray) -> str:
    """Refuse what quantize_static cannot do, before it fails obscurely; returns the input name."""
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise QuantizeError(
                f"{name}: op {node.op_type!r} of domain {node.domain!r} is not a standard ONNX op; "
                "onnxruntime's quantizer handles only standard ONNX ops"
            )
    if not any(n.op_type in QUANTIZABLE_OPS for n in proto.graph.node):
        raise QuantizeError(f"{name}: nothing to quantize (no {', '.join(QUANTIZABLE_OPS)} node)")
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise QuantizeError(f"{name}: static int8 quantization needs one float32 input")
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim][1:]
    x = np.asarray(calibration)
    if x.ndim != len(dims) + 1 or len(x) == 0:
        raise QuantizeError(f"{name}: calibration needs a batch of inputs shaped (N, {dims})")
    if any(d is not None and d != s for d, s in zip(dims, x.shape[1:], strict=True)):
        raise QuantizeError(f"{name}: calibration inputs are {x.shape[1:]}, the model takes {dims}")
    if not np.isfinite(x).all():
        raise QuantizeError(f"{name}: calibration inputs contain NaN or Inf")
    return inputs[0].name


def keep_float_outputs(proto: onnx.ModelProto) -> None:
    """Rewire op -> Q -> DQ -> graph output as op -> graph output (in place)."""
    nodes = proto.graph.node
    producer = {out: n for n in nodes for out in n.output}
    uses = Counter(i for n in nodes for i in n.input)
    for output in proto.graph.output:
        dq = producer.get(output.name)
        q = (
            producer.get(dq.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear"
            else None
        )
        if q is None or q.op_type != "QuantizeLinear" or uses[dq.input[0]] != 1:
            continue
        src = producer.get(q.input[0])
        if src is None or uses[q.input[0]] != 1:
            continue
        src.output[list(src.output).index(q.input[0])] = output.name
        nodes.remove(q)
        nodes.remove(dq)
    used = {i for n in nodes for i in n.input}
    unused = [init for init in proto.graph.initializer if init.name not in used]
    for init in unused:  # the output's scale and zero point
        proto.graph.initializer.remove(init)


def node_counts(model: bytes) -> QuantNodeCounts:
    """Q/DQ nodes in the file, and the kernels onnxruntime runs after fusing it on this CPU."""
    proto = onnx.load_from_string(model)
    ops = Counter(n.op_type for n in proto.graph.node)
    int8_kernels, float_ops = runtime_kernels(model)
    return QuantNodeCounts(
        quantize_linear=ops.pop("QuantizeLinear", 0),
        dequantize_linear=ops.pop("DequantizeLinear", 0),
        ops=dict(sorted(ops.items())),
        int8_kernels=int8_kernels,
        float_ops=float_ops,
    )


def runtime_kernels(model: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(ops on 8-bit data, ops on float32 data) in onnxruntime's optimized graph (CPU, ALL).

    Dtypes are propagated in topological order: QuantizeLinear and quantized kernels produce
    8-bit tensors (QGemm without an output scale produces float32), DequantizeLinear float32;
    any other op computes in the dtype of its first input (Transpose, MaxPool, BN...).
    """
    with tempfile.TemporaryDirectory(prefix="bnfold-ort-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    eight_bit: set[str] = set()
    int8, flt = Counter(), Counter()
    for node in graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear"):
            if op == "QuantizeLinear":
                eight_bit.update(node.output)
            continue
        quantized_kernel = op.startswith("QLinear") or op in INTEGER_KERNELS
        if quantized_kernel or (node.input and node.input[0] in eight_bit):
            int8[op] += 1
            float_out = op == "QGemm" and (len(node.input) < 8 or not node.input[7])
            if not float_out and op not in ("MatMulInteger", "ConvInteger"):
                eight_bit.update(node.output)
        else:
            flt[op] += 1
    return dict(sorted(int8.items())), dict(sorted(flt.items()))


def int8_report(
    int8_logits: np.ndarray,
    folded_logits: np.ndarray,
    labels: np.ndarray | None,
    *,
    split: str,
    settings: QuantSettings,
) -> Int8Report:
    """int8 vs folded float32 logits (N, K), accuracies when labels (N,) are given, the verdict."""
    stats = diff_stats(int8_logits, folded_logits)
    acc_f, acc_i, drop = accuracies(int8_logits, folded_logits, labels)
    return Int8Report(
        split=split,
        n_images=len(int8_logits),
        settings=settings,
        int8_vs_folded=stats,
        accuracy_folded=acc_f,
        accuracy_int8=acc_i,
        accuracy_drop_points=drop,
        **verdict(failure_reason(stats, drop, split)),
    )


def verdict(reason: str | None) -> dict:
    """The criterion and the verdict, as every reduced-precision report states them."""
    return {
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "max_accuracy_drop_points": MAX_ACCURACY_DROP_POINTS,
        "passed": reason is None,
        "reason": reason,
    }


def accuracies(variant: np.ndarray, folded: np.ndarray, labels: np.ndarray | None):
    """(folded accuracy, variant accuracy, drop in points) on labels (N,), or three Nones."""
    if labels is None:
        return None, None, None
    right_f = int(np.sum(np.argmax(folded, 1) == labels))
    right_v = int(np.sum(np.argmax(variant, 1) == labels))
    n = len(labels)
    return right_f / n, right_v / n, 100.0 * (right_f - right_v) / n  # 10 of 1000: 1.0 point


def failure_reason(
    stats: DiffStats, drop_points: float | None, split: str, variant: str = "int8"
) -> str | None:
    """One line when a reduced-precision variant (int8, bf16) fails the criterion, else None."""
    agreement = stats.top1_agreement if stats.top1_agreement is not None else 0.0
    if not np.isfinite(stats.max_abs_diff):
        return f"{variant} logits are not finite on the {split} images"
    if agreement < MIN_TOP1_AGREEMENT:
        return (
            f"{variant} top-1 agreement with folded float32 is {100 * agreement:.2f}% on the "
            f"{split} images, below the {100 * MIN_TOP1_AGREEMENT:.0f}% required"
        )
    if drop_points is not None and drop_points > MAX_ACCURACY_DROP_POINTS:
        return (
            f"{variant} accuracy is {drop_points:.2f} points below folded float32 on the {split} "
            f"images, more than the {MAX_ACCURACY_DROP_POINTS:g} allowed"
        )
    return None


def measure_int8(
    int8_model: Path | bytes,
    folded_model: Path,
    x: np.ndarray,
    labels: np.ndarray | None,
    *,
    split: str,
    settings: QuantSettings,
) -> Int8Report:
    """Run both models with onnxruntime (int8 and folded: full optimization) and report."""
    int8_logits = run_session(make_session(int8_model, "int8"), x)
    folded_logits = run_session(make_session(Path(folded_model), "folded"), x)
    return int8_report(int8_logits, folded_logits, labels, split=split, settings=settings)


def _choice(value: str, allowed: dict, what: str) -> str:
    if value not in allowed:
        raise QuantizeError(f"Invalid {what} {value!r}. Only {', '.join(allowed)} are supported.")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the calibrators' prints and the quantizer's root-logger warnings."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
