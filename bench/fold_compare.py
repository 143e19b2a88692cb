"""BN folding at the ONNX level, tool against tool, on the same graphs in the same run.

`python -m bench.fold_compare` builds one small graph per pattern (fixed seed, statistics like a
trained model's), folds it with bnfold, onnxoptimizer (`fuse_bn_into_conv`), the onnxscript
rewriter (its three BN rules) and onnxruntime's own session-level fusion (ORT_ENABLE_BASIC and
ORT_ENABLE_EXTENDED, the optimized graph saved with `optimized_model_filepath`), and measures on
256 N(0, 1) inputs:

- maps left: BatchNormalization nodes plus constant per-channel Mul/Add (not a MatMul's bias);
- max |tool - original| (original: onnxruntime with optimizations off, so BN really runs);
- max |tool - float64| (onnx.reference on a float64 copy of the original graph).

Folded graphs from bnfold / onnxoptimizer / onnxscript run with optimizations off, so the
figures are the fold's alone. Writes bench/results/fold_compare.{md,json}.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.toolchain.fold import fold_onnx
from bnfold.toolchain.reference import reference_evaluator

RESULTS = Path(__file__).resolve().parent / "results"
N_INPUTS = 256
SEED = 0
ORT_LEVELS = {
    "onnxruntime BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "onnxruntime EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


# ---------------------------------------------------------------- the patterns


class _Graph:
    """A tiny graph builder with statistics like a trained BN's."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value: np.ndarray) -> str:
        name = f"p{len(self.inits)}"
        self.inits.append(nh.from_array(np.asarray(value, np.float32), name))
        return name

    def weight(self, *shape: int, fan_in: int) -> str:
        return self.const(self.rng.normal(size=shape) * np.sqrt(2.0 / fan_in))

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(h.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def bn_params(self, c: int) -> tuple[np.ndarray, ...]:
        gamma = 1 + 0.3 * self.rng.normal(size=c)
        beta = 0.3 * self.rng.normal(size=c)
        mean = 0.5 * self.rng.normal(size=c)
        var = np.exp(self.rng.uniform(np.log(0.05), np.log(2.0), size=c))
        return gamma, beta, mean, var

    def bn(self, x: str, c: int, eps: float = 1e-5) -> str:
        params = [self.const(p) for p in self.bn_params(c)]
        return self.node("BatchNormalization", [x, *params], "bn", epsilon=eps)

    def keras_bn(self, x: str, c: int, shape: tuple[int, ...], eps: float = 1e-3) -> str:
        """BN as Keras 3 exports it: Mul(s) then Add(t), s and t precomputed in float32."""
        gamma, beta, mean, var = self.bn_params(c)
        s = gamma / np.sqrt(var + eps)
        mul = self.node("Mul", [x, self.const(s.reshape(shape))], "bn_mul")
        return self.node("Add", [mul, self.const((beta - mean * s).reshape(shape))], "bn_add")

    def model(self, x_shape: list, out: str) -> onnx.ModelProto:
        graph = h.make_graph(
            self.nodes, "pattern",
            [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
            [h.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits,
        )  # fmt: skip
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model)


def conv_bn() -> tuple[onnx.ModelProto, list[int]]:
    g = _Graph(SEED)
    conv = g.node("Conv", ["x", g.weight(16, 8, 3, 3, fan_in=72), g.const(np.zeros(16))], "conv",
                  pads=[1, 1, 1, 1])  # fmt: skip
    return g.model([8, 16, 16], g.bn(conv, 16)), [8, 16, 16]


def conv_transpose_bn_grouped() -> tuple[onnx.ModelProto, list[int]]:
    g = _Graph(SEED + 1)
    deconv = g.node(
        "ConvTranspose", ["x", g.weight(8, 6, 3, 3, fan_in=36)], "deconv", group=2,
        strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1],
    )  # fmt: skip
    return g.model([8, 8, 8], g.bn(deconv, 12)), [8, 8, 8]


def gemm_bn_beta() -> tuple[onnx.ModelProto, list[int]]:
    g = _Graph(SEED + 2)
    w, c = g.weight(32, 64, fan_in=64), g.const(0.1 * g.rng.normal(size=32))
    gemm = g.node("Gemm", ["x", w, c], "fc", transB=1, alpha=0.5, beta=2.0)
    return g.model([64], g.bn(gemm, 32)), [64]


def keras_conv_mul_add() -> tuple[onnx.ModelProto, list[int]]:
    g = _Graph(SEED + 3)
    conv = g.node("Conv", ["x", g.weight(16, 8, 3, 3, fan_in=72), g.const(np.zeros(16))], "conv",
                  pads=[1, 1, 1, 1])  # fmt: skip
    return g.model([8, 16, 16], g.keras_bn(conv, 16, (1, 16, 1, 1))), [8, 16, 16]


def keras_dense_mul_add() -> tuple[onnx.ModelProto, list[int]]:
    g = _Graph(SEED + 4)
    mm = g.node("MatMul", ["x", g.weight(64, 32, fan_in=64)], "dense")
    biased = g.node("Add", [mm, g.const(0.1 * g.rng.normal(size=32))], "dense_bias")
    return g.model([64], g.keras_bn(biased, 32, (32,))), [64]


def relu_bn_gemm() -> tuple[onnx.ModelProto, list[int]]:
    g = _Graph(SEED + 5)
    act = g.node("Relu", ["x"], "relu")
    fc = g.node("Gemm", [g.bn(act, 64), g.weight(10, 64, fan_in=64), g.const(np.zeros(10))], "fc",
                transB=1)  # fmt: skip
    return g.model([64], fc), [64]


PATTERNS: dict[str, Callable[[], tuple[onnx.ModelProto, list[int]]]] = {
    "Conv+BN": conv_bn,
    "ConvTranspose+BN (groups=2)": conv_transpose_bn_grouped,
    "Gemm+BN (alpha=0.5, beta=2)": gemm_bn_beta,
    "Conv+Mul+Add (Keras BN)": keras_conv_mul_add,
    "MatMul+Add+Mul+Add (Keras Dense+BN)": keras_dense_mul_add,
    "ReLU+BN+Gemm (BN after activation)": relu_bn_gemm,
}


# ---------------------------------------------------------------- the tools


def _bnfold(model: onnx.ModelProto) -> onnx.ModelProto:
    return fold_onnx(model)[0]


def _onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def _onnxscript(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    ]
    return rewrite(model, pattern_rewrite_rules=rules)


FILE_TOOLS = {
    "bnfold": _bnfold,
    "onnxoptimizer": _onnxoptimizer,
    "onnxscript rewriter": _onnxscript,
}


def _session(model: onnx.ModelProto, level, saved: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if saved is not None:
        opts.optimized_model_filepath = str(saved)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray, level=None) -> np.ndarray:
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level is None else level
    return _session(model, level).run(None, {"x": x})[0]


def float64_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    ref = reference_evaluator(model)
    chunks = [
        ref.run(None, {"x": x[i : i + 64].astype(np.float64)})[0] for i in range(0, len(x), 64)
    ]
    return np.concatenate(chunks)


def maps_left(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes + constant Mul/Add nodes that are not a MatMul's bias Add."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    producer = {o: n for n in model.graph.node for o in n.output}
    left = 0
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            left += 1
        elif n.op_type in ("Mul", "Add") and any(i in consts for i in n.input):
            data = [producer.get(i) for i in n.input if i not in consts]
            is_bias = (
                n.op_type == "Add"
                and data
                and data[0] is not None
                and (data[0].op_type == "MatMul")
            )
            left += not is_bias
    return left


def _ops(model: onnx.ModelProto) -> str:
    return " ".join(n.op_type for n in model.graph.node)


# ---------------------------------------------------------------- measuring


def measure_pattern(name: str, build) -> dict:
    model, x_shape = build()
    x = np.random.default_rng(SEED).normal(size=(N_INPUTS, *x_shape)).astype(np.float32)
    y64 = float64_reference(model, x)
    y_orig = _run(model, x)
    rows = [_row("original (ORT, no optimization)", model, y_orig, y_orig, y64)]
    for tool, fold in FILE_TOOLS.items():
        try:
            out = fold(model)
            rows.append(_row(tool, out, _run(out, x), y_orig, y64))
        except Exception as exc:  # a peer failing on a pattern is a result, not a crash
            rows.append({"tool": tool, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
    for tool, level in ORT_LEVELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "optimized.onnx"
            y = _session(model, level, saved).run(None, {"x": x})[0]
            rows.append(_row(tool, onnx.load(saved), y, y_orig, y64))
    return {
        "pattern": name, "maps": maps_left(model), "ops": _ops(model),
        "scale": float(np.abs(y64).max()), "rows": rows,
    }  # fmt: skip


def _row(tool: str, model: onnx.ModelProto, y, y_orig, y64) -> dict:
    return {
        "tool": tool,
        "maps_left": maps_left(model),
        "ops": _ops(model),
        "max_abs_vs_original": float(np.abs(y.astype(np.float64) - y_orig).max()),
        "max_abs_vs_float64": float(np.abs(y.astype(np.float64) - y64).max()),
        "mean_abs_vs_float64": float(np.abs(y.astype(np.float64) - y64).mean()),
    }


def report_md(results: list[dict]) -> str:
    lines = [
        "# BN folding at the ONNX level: bnfold and its peers",
        "",
        f"`python -m bench.fold_compare`: {N_INPUTS} N(0,1) inputs per pattern, seed {SEED};",
        "original = onnxruntime with optimizations off (BN executes); float64 = onnx.reference",
        "on a float64 copy of the original. 'maps left' counts BatchNormalization nodes and",
        "constant per-channel Mul/Add (not a MatMul's bias). Versions: "
        + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        "",
        "| pattern (max abs output) | tool | maps left | max abs diff vs original "
        "| max / mean abs diff vs float64 | graph after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        head = f"{r['pattern']} ({r['scale']:.2g})"
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {head} | {row['tool']} | fails | - | - | {row['error']} |")
                continue
            left = f"{row['maps_left']} of {r['maps']}"
            lines.append(
                f"| {head} | {row['tool']} | {left} | {row['max_abs_vs_original']:.2g} "
                f"| {row['max_abs_vs_float64']:.2g} / {row['mean_abs_vs_float64']:.2g} "
                f"| {row['ops']} |"
            )
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import onnxoptimizer
    import onnxscript

    return {
        "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "onnxoptimizer": onnxoptimizer.__version__, "onnxscript": onnxscript.__version__,
    }  # fmt: skip


def main() -> None:
    results = [measure_pattern(name, build) for name, build in PATTERNS.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"versions": _versions(), "n_inputs": N_INPUTS, "seed": SEED, "patterns": results}
    (RESULTS / "fold_compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = report_md(results)
    (RESULTS / "fold_compare.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
