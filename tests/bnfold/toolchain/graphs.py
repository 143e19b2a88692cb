"""Hand-built ONNX graphs and the references the fold tests compare against.

The reference for a fold is onnxruntime running the *unfolded* graph with every graph
optimization disabled (so BatchNormalization, Mul and Add really execute), and a float64
evaluation (onnx.reference on a float64 copy) where a test wants the exact value.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

U32 = 2.0**-24  # unit roundoff of float32
FANIN_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Builder:
    """Collect nodes and initializers; `model()` wraps them with one input and one output."""

    def __init__(self, seed: int = 0, dtype=np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, value, name: str | None = None) -> str:
        self._n += 1
        name = name or f"c{self._n}"
        self.inits.append(nh.from_array(np.asarray(value, dtype=self.dtype), name))
        return name

    def i64(self, value) -> str:
        self._n += 1
        name = f"i{self._n}"
        self.inits.append(nh.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    def randn(self, *shape, scale=1.0) -> np.ndarray:
        return self.rng.normal(size=shape) * scale

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self._n += 1
        name = name or f"{op.lower()}{self._n}"
        out = f"{name}_out"
        self.nodes.append(h.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def bn(
        self, x: str, c: int, name: str = "bn", eps: float = 1e-5, var_lo=0.1, gamma=1.0, **attrs
    ) -> str:
        """A BatchNormalization with random statistics (var log-uniform in [var_lo, 2])."""
        var = np.exp(self.rng.uniform(np.log(var_lo), np.log(2.0), size=c))
        params = [
            self.const(self.randn(c) * gamma),
            self.const(self.randn(c)),
            self.const(self.randn(c)),
            self.const(var),
        ]
        return self.node("BatchNormalization", [x, *params], name=name, epsilon=eps, **attrs)

    def model(
        self, x_shape: list, out: str, opset: int = 17, ir: int = 8, x_name: str = "x"
    ) -> onnx.ModelProto:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        graph = h.make_graph(
            self.nodes,
            "test",
            [h.make_tensor_value_info(x_name, elem, x_shape)],
            [h.make_tensor_value_info(out, elem, None)],
            self.inits,
        )
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
        model.ir_version = ir
        return onnx.shape_inference.infer_shapes(model)


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # the magnitude model leaves BN's old statistics unread
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with float32 initializers, inputs and outputs as float64."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(nh.from_array(nh.to_array(init).astype(np.float64), init.name))
    for vi in [*m.graph.input, *m.graph.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    del m.graph.value_info[:]
    return m


def run64(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Exact-enough value of the unfolded graph: onnx.reference in float64."""
    ref = ReferenceEvaluator(float64_copy(model))
    return ref.run(None, {model.graph.input[0].name: x.astype(np.float64)})[0]


def magnitude_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph computing, on |x|, an upper bound of |every term| the original sums.

    Weights and constants become |w|; each BN becomes `|s| * (x + |mean|) + |beta|` (var
    1 - eps, so sqrt(var + eps) = 1). Relu, reshapes, Conv, Gemm, MatMul, Add, Mul are
    monotone in |.|, so the output bounds sum |w_i x_i| + |b| of every output element: the
    quantity float32 summation error is proportional to.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    floats = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
    originals = {i.name: nh.to_array(i).astype(np.float64) for i in m.graph.initializer}
    for init in m.graph.initializer:
        if init.data_type in floats:
            init.CopyFrom(nh.from_array(np.abs(nh.to_array(init)), init.name))
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value" and a.t.data_type in floats:
                a.t.CopyFrom(nh.from_array(np.abs(nh.to_array(a.t)), a.t.name))
            if a.name in ("alpha", "beta"):
                a.f = abs(a.f)
        if node.op_type == "BatchNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            g, b, mean, var = (originals[n] for n in node.input[1:5])
            s = g / np.sqrt(var + eps)
            dtype = np.dtype(
                onnx.helper.tensor_dtype_to_np_dtype(
                    next(i for i in m.graph.initializer if i.name == node.input[1]).data_type
                )
            )
            # ORT computes (x - mean) * s + beta: its roundings scale with |s|(|x| + |mean|)
            # + |beta|, which this bounds ((x + |mean|) * |s| + |beta| on x >= 0).
            vals = [np.abs(s), np.abs(b), -np.abs(mean), np.full_like(s, 1 - eps)]
            for k, v in enumerate(vals):
                name = f"{node.name}_mag{k}"
                m.graph.initializer.append(nh.from_array(v.astype(dtype), name))
                node.input[1 + k] = name
    return m


def fanin_sum(model: onnx.ModelProto) -> int:
    """Sum over layers of the terms one output element adds up (the K of gamma_K)."""
    inits = {i.name: nh.to_array(i) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in FANIN_OPS and node.input[1] in inits:
            w = inits[node.input[1]]
            if node.op_type == "MatMul":
                total += w.shape[0]
            elif node.op_type == "Gemm":
                total += max(w.shape)  # K (either layout); max() over-counts, never under
            else:
                # Conv (out, in/g, k...): in/g * k terms; ConvTranspose (in, out/g, k...): at
                # most in * k (fewer with groups or strides)
                first = w.shape[0] if node.op_type == "ConvTranspose" else w.shape[1]
                total += first * int(np.prod(w.shape[2:]))
    return max(total, 1)


def assert_folds_equal(unfolded, folded, x: np.ndarray, extra: float = 0.0) -> float:
    """|folded - unfolded| within the float32 bound; returns the max abs difference.

    Both are float32 evaluations of the same real-number function. Summing K products in
    float32 errs by at most about K*u*sum|w_i x_i| (u = 2^-24, any summation order, FMA or
    not); the fold rounds each weight once (u relative) and BN / Mul / Add add a few roundings
    per layer. So per element: |folded - unfolded| <= 2 * (sum_K + 8 * layers) * u * M, with
    M the magnitude model's output (first order in u; `extra` adds to the tolerance).
    """
    a, b = run(unfolded, x), run(folded, x)
    assert a.shape == b.shape
    mag = run(magnitude_model(unfolded), np.abs(x)).astype(np.float64)
    layers = sum(n.op_type in FANIN_OPS for n in unfolded.graph.node)
    tol = 2 * (fanin_sum(unfolded) + 8 * layers) * U32 * mag + extra
    diff = np.abs(a.astype(np.float64) - b)
    assert np.all(diff <= tol), f"max diff {diff.max():.3g}, worst ratio {(diff / tol).max():.3g}"
    return float(diff.max())


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def foldable_mul_add(model: onnx.ModelProto) -> int:
    """Mul/Add nodes with a constant operand, except the bias Add right after a MatMul."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for n in model.graph.node:
        if n.op_type not in ("Mul", "Add") or not any(i in consts for i in n.input):
            continue
        data = [i for i in n.input if i not in consts]
        src = producer.get(data[0]) if data else None
        if n.op_type == "Add" and src is not None and src.op_type == "MatMul":
            continue
        count += 1
    return count


def assert_well_formed(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """checker (full), shape inference, opset / IR / graph inputs and outputs unchanged."""
    onnx.checker.check_model(folded, full_check=True)
    onnx.shape_inference.infer_shapes(folded, strict_mode=True)
    assert folded.ir_version == original.ir_version
    assert list(folded.opset_import) == list(original.opset_import)
    assert list(folded.graph.input) == list(original.graph.input)
    assert list(folded.graph.output) == list(original.graph.output)
    used = {i for n in folded.graph.node for i in n.input} | {o.name for o in folded.graph.output}
    assert not [i.name for i in folded.graph.initializer if i.name not in used], "dangling init"
    for n in folded.graph.node:
        assert any(o in used for o in n.output), f"dangling node {n.name}"
