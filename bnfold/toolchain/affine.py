"""Find the per-channel affine maps `y = s * x + t` of an ONNX graph, and the layers beside them.

An affine map is a `BatchNormalization` node (inference form) or a chain of `Mul`/`Add` nodes
with constant per-channel operands (how Keras 3 / tf2onnx export BN). A layer is a Conv,
ConvTranspose, Gemm or MatMul with a constant weight (a MatMul's bias is the `Add` after it).
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold import foldmath
from bnfold.toolchain.graph import FLOAT_DTYPES, Graph, attr, describe, node_name

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
STEP_OPS = ("Mul", "Add", "Sub", "Div")  # with a constant operand: per-channel affine steps
POOL_OPS = ("MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool")
FLOAT_NAMES = "float32, float64 or float16"


class Refused(Exception):  # noqa: N818 - a decision, not an error
    """This map or layer cannot be folded; the message is the report's reason."""


@dataclass
class Affine:
    """`y = s * x + t` along `axis` of `x` (None: one value for every channel)."""

    op: str  # "BatchNormalization" or "Mul/Add"
    nodes: list[onnx.NodeProto]
    x: str
    y: str
    axis: int | None
    s: np.ndarray  # float64 (C,) or (1,) when axis is None
    t: np.ndarray

    @property
    def name(self) -> str:
        return "+".join(node_name(n) for n in self.nodes)

    def expand(self, n: int, repeat: int = 1, tile: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) as (n,): a uniform map broadcast; a per-channel one with each value repeated
        `repeat` times and the whole tiled `tile` times (see onnx_graph.map_axis)."""
        if self.axis is None:
            return np.full(n, self.s[0]), np.full(n, self.t[0])
        s, t = (np.tile(np.repeat(v, repeat), tile) for v in (self.s, self.t))
        if s.size != n:
            raise Refused(f"not folded: {s.size} channels, but the layer has {n}")
        return s, t


@dataclass
class Layer:
    """A Conv / ConvTranspose / Gemm / MatMul with a constant weight (input 1)."""

    node: onnx.NodeProto
    w: np.ndarray
    bias_add: onnx.NodeProto | None = None  # MatMul only: the Add carrying its bias
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.node.op_type

    @property
    def output(self) -> str:
        return (self.bias_add or self.node).output[0]

    @property
    def groups(self) -> int:
        return int(attr(self.node, "group", 1)) if self.kind.startswith("Conv") else 1

    def layout(self) -> foldmath.Layout:
        if self.kind == "ConvTranspose":
            return "transposed"
        if self.kind == "MatMul" or (self.kind == "Gemm" and not attr(self.node, "transB", 0)):
            return "in_out"
        return "out_in"


# ---------------------------------------------------------------- affine maps


def batchnorm_affine(graph: Graph, node: onnx.NodeProto, opset: int) -> Affine:
    """The map of an inference-form BatchNormalization node, or Refused with the reason."""
    if opset < 7:
        raise Refused(f"not folded: BatchNormalization from opset {opset} (< 7) not supported")
    if attr(node, "training_mode", 0):
        raise Refused("not folded: training_mode=1 (normalizes with batch statistics)")
    if opset < 9 and attr(node, "spatial", 1) == 0:
        raise Refused("not folded: spatial=0 (per-activation statistics), not per channel")
    for extra in node.output[1:]:
        if extra and (graph.consumers.get(extra) or extra in graph.graph_outputs):
            raise Refused(f"not folded: its statistics output '{extra}' is used")
    params = []
    for role, name in zip(("scale", "B", "mean", "var"), node.input[1:5], strict=True):
        value = graph.constant(name)
        if value is None:
            raise Refused(f"not folded: {role} {graph.not_constant_reason(name)}")
        _check_float(value, f"{role} '{name}'")
        params.append(value)
    gamma, beta, mean, var = params
    s, t = foldmath.bn_scale_shift(mean, var, float(attr(node, "epsilon", 1e-5)), gamma, beta)
    _check_dtype(graph, node.input[0])
    return Affine("BatchNormalization", [node], node.input[0], node.output[0], 1, s, t)


def mul_add_step(graph: Graph, node: onnx.NodeProto) -> Affine | None:
    """A Mul/Add/Sub/Div with one constant, per-channel (or scalar) float operand as a map,
    else None (`c / x` is not affine)."""
    if node.op_type not in STEP_OPS or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.input) != 2:
        return None
    consts = [graph.constant(i) for i in node.input]
    if sum(c is not None for c in consts) != 1:
        return None
    k = 0 if consts[0] is not None else 1
    if node.op_type == "Div" and k == 0:
        return None
    c, x = consts[k], node.input[1 - k]
    rank = graph.rank(x)
    if c.dtype.kind != "f" or rank is None or c.ndim > rank:
        return None  # integer arithmetic, or a constant that would grow the output shape
    padded = (1,) * (rank - c.ndim) + c.shape
    channel_axes = [i for i, d in enumerate(padded) if d != 1]
    if len(channel_axes) > 1:
        return None  # varies along two axes: not per channel
    axis = channel_axes[0] if channel_axes else None
    if axis is not None and graph.dims[x][axis] != padded[axis]:
        return None  # would broadcast the data along that axis
    v = foldmath.f64(c).reshape(-1)
    ones, zeros = np.ones_like(v), np.zeros_like(v)
    with np.errstate(divide="ignore"):  # x / 0: an infinite scale, refused as non-finite
        s, t = {
            "Mul": (v, zeros),
            "Add": (ones, v),
            "Sub": (ones, -v) if k == 1 else (-ones, v),  # x - c, or c - x
            "Div": (1.0 / v, zeros),  # x / c, in float64: within the fold's rounding
        }[node.op_type]
    return Affine("Mul/Add", [node], x, node.output[0], axis, s, t)


def mul_add_chain(graph: Graph, first: Affine) -> Affine:
    """Extend a Mul/Add step with the steps that follow it on the same axis: one map."""
    chain = first
    while graph.private(chain.y):
        nxt_node = graph.consumers[chain.y][0]
        nxt = mul_add_step(graph, nxt_node)
        if (
            nxt is None
            or nxt.x != chain.y
            or None not in (chain.axis, nxt.axis)
            and (chain.axis != nxt.axis)
        ):
            break
        s, t = chain.s * nxt.s, chain.t * nxt.s + nxt.t  # s2 * (s1 x + t1) + t2
        axis = chain.axis if chain.axis is not None else nxt.axis
        chain = Affine("Mul/Add", chain.nodes + nxt.nodes, chain.x, nxt.y, axis, s, t)
    return chain


def is_matmul_bias(graph: Graph, step: Affine) -> bool:
    """An Add right after a MatMul with a constant weight, along its last axis: its bias."""
    node = step.nodes[0]
    if node.op_type != "Add" or not np.all(step.s == 1):
        return False
    src = graph.producer.get(step.x)
    if src is None or src.op_type != "MatMul" or not graph.private(step.x):
        return False
    rank = graph.rank(step.x)
    return graph.constant(src.input[1]) is not None and step.axis in (None, (rank or 0) - 1)


# ---------------------------------------------------------------- layers


def layer_at(graph: Graph, node: onnx.NodeProto | None, data: str | None = None) -> Layer | None:
    """`node` as a foldable layer (a MatMul bias Add resolves to its MatMul), else None.

    With `data`, the layer must read it as its data input (Conv X, Gemm A, MatMul A).
    """
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    bias_add = None
    if node.op_type == "Add" and data is None:
        step = mul_add_step(graph, node)
        if step is None or not is_matmul_bias(graph, step):
            return None
        bias_add, node = node, graph.producer[step.x]
    if node.op_type not in LAYER_OPS or len(node.input) < 2:
        return None
    if data is not None and node.input[0] != data:
        return None
    w = graph.constant(node.input[1])
    if w is None:
        return Layer(node, np.empty(0), bias_add, {"weight_missing": True})
    return Layer(node, w, bias_add)


def check_layer(graph: Graph, layer: Layer) -> None:
    """Raise Refused unless the layer's weight (and bias) are private float constants."""
    what = describe(layer.node)
    if layer.extra.get("weight_missing"):
        raise Refused(
            f"not folded: weight of {what}: {graph.not_constant_reason(layer.node.input[1])}"
        )
    _check_float(layer.w, f"weight of {what}")
    if layer.kind == "MatMul" and layer.w.ndim != 2:
        raise Refused(f"not folded: {what} has a {layer.w.ndim}-d weight (only 2-d folds)")
    if layer.kind == "Gemm" and graph.rank(layer.node.input[0]) not in (None, 2):
        raise Refused(f"not folded: {what} input is not 2-d")
    for name in _param_names(layer):
        if graph.constant(name) is None:
            raise Refused(f"not folded: bias of {what}: {graph.not_constant_reason(name)}")
        sharers = graph.shared_with(name, [layer.node, layer.bias_add])
        if sharers:
            others = ", ".join(describe(n) for n in sharers)
            raise Refused(
                f"not folded: {what} shares its parameter '{name}' with {others} "
                "(folding would change both layers; not cloned)"
            )


def bias_name(layer: Layer) -> str | None:
    """The bias tensor: Conv/ConvTranspose/Gemm input 2, a MatMul's bias Add constant."""
    if layer.bias_add is not None:
        x = layer.node.output[0]
        return next(i for i in layer.bias_add.input if i != x)
    node = layer.node
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _param_names(layer: Layer) -> list[str]:
    bias = bias_name(layer)
    return [layer.node.input[1]] + ([bias] if bias else [])


def _check_float(value: np.ndarray, what: str) -> None:
    if value.dtype.type not in FLOAT_DTYPES:
        raise Refused(f"not folded: {what} has dtype {value.dtype}; only {FLOAT_NAMES} fold")


def _check_dtype(graph: Graph, name: str) -> None:
    elem = graph.dtypes.get(name)
    if elem is None:
        return
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem)
    if np_type.type not in FLOAT_DTYPES:
        raise Refused(f"not folded: input '{name}' has dtype {np_type}; only {FLOAT_NAMES} fold")


def reads_zero_padding(layer: Layer) -> bool:
    """Whether a Conv's output depends on zero padding (a shift before it would not fold)."""
    auto_pad = attr(layer.node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "VALID":
        return False
    if auto_pad.startswith("SAME"):  # pads only when a kernel tap reaches past the border
        kernel = layer.w.shape[2:]
        dilations = attr(layer.node, "dilations") or [1] * len(kernel)
        return any((k - 1) * d > 0 for k, d in zip(kernel, dilations, strict=True))
    return any(p != 0 for p in (attr(layer.node, "pads") or []))


def commuting_pool(graph: Graph, node: onnx.NodeProto) -> bool:
    """A pool that a per-channel map moves through unchanged: max(s x + t) = s max(x) + t for
    s >= 0 (checked by the caller; MaxPool pads with -inf), mean(s x + t) = s mean(x) + t when
    no zero padding enters the mean. Pools run on (N, C, ...): the channel is axis 1."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in POOL_OPS:
        return False
    if node.op_type == "MaxPool":  # its Indices output must be unused
        return all(not graph.consumers.get(o) and o not in graph.graph_outputs
                   for o in node.output[1:] if o)  # fmt: skip
    if node.op_type == "AveragePool" and not attr(node, "count_include_pad", 0):
        return True
    if node.op_type == "AveragePool":  # counted zeros: pads, or ceil_mode's partial windows
        if attr(node, "ceil_mode", 0):
            return False
        auto_pad = attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        return auto_pad in ("NOTSET", "VALID") and not any(attr(node, "pads") or [])
    return True  # GlobalAveragePool, GlobalMaxPool


COPYING_PAD_MODES = ("reflect", "edge", "wrap")


def copying_pad(graph: Graph, node: onnx.NodeProto) -> bool:
    """A Pad that fills its border with copies of real values (reflect, edge, wrap) on the
    spatial axes of (N, C, ...) only: s * x + t commutes with it, so a BN before it folds
    forward into the Conv after it, shift included (no tap reads a zero)."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Pad":
        return False
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in COPYING_PAD_MODES:
        return False
    if len(node.input) > 3 and node.input[3]:  # an `axes` input: which axes it pads is indirect
        return False
    pads = attr(node, "pads") if len(node.input) < 2 or not node.input[1] else None
    if pads is None:
        value = graph.constant(node.input[1]) if len(node.input) > 1 else None
        if value is None:
            return False
        pads = [int(v) for v in np.asarray(value).ravel()]
    rank = len(pads) // 2
    return rank >= 2 and not any(pads[a] or pads[rank + a] for a in (0, 1))
