"""Fold BatchNormalization and per-channel constant Mul/Add chains in an ONNX graph, exactly.

Torch-free (onnx + numpy). Each per-channel affine map `y = s * x + t` (a BN in inference form,
or a chain of `Mul`/`Add`/`Sub`/`Div` by constants, as Keras 3 exports a BN or a model
normalizes with `(x - mean) / std`) folds:

- backward into the Conv / ConvTranspose / Gemm / MatMul (+ bias Add) that produces its input,
  through shape-only nodes (Reshape, Unsqueeze, Squeeze, Flatten, Transpose, Identity) that
  keep the channel axis, when every tensor on the way is read by nothing else;
- else forward into the Conv / Gemm / MatMul it alone feeds (a BN after the activation), also
  through pools it commutes with (max and global pools for a non-negative scale, average pools
  without zero padding) and through Pads that copy real values (reflect, edge, wrap); into a
  Conv only when the shift is zero or the Conv reads no zero padding.

Everything else stays, with the reason in the report. Arithmetic is `bnfold.foldmath` (float64,
rounded once to the weight dtype; float16 weights too). The folded graph keeps the BN's output
tensor name (a backward fold renames the layer's output to it), so graph outputs and per-layer
probes keep their names.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnfold import foldmath
from bnfold.bundle import FoldRow
from bnfold.foldreport import PADDED_REASON, FoldReport
from bnfold.toolchain.affine import (
    POOL_OPS,
    Affine,
    Layer,
    Refused,
    batchnorm_affine,
    bias_name,
    check_layer,
    commuting_pool,
    copying_pad,
    is_matmul_bias,
    layer_at,
    mul_add_chain,
    mul_add_step,
    reads_zero_padding,
)
from bnfold.toolchain.graph import (
    SHAPE_OPS,
    Channel,
    Graph,
    attr,
    check_light,
    describe,
    map_axis,
    node_name,
    set_float_attr,
)

MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit for one serialized ModelProto


class FoldError(ValueError):
    """The model cannot be folded at all (not per node: those are refusals in the report)."""


@dataclass
class _Plan:
    """A fold decided: the layer, the shape-only nodes between, (s, t) per layer channel."""

    layer: Layer
    s: np.ndarray
    t: np.ndarray


class _NoLayer(Refused):
    """Refused because no layer sits on that side (the other side's reason may matter more)."""


# ---------------------------------------------------------------- public API


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every per-channel affine map of `model` that folds exactly; a new model + report.

    The input is left untouched. Opset, IR version, graph inputs and outputs (names and
    dynamic axes) are kept. Raises FoldError for a model that cannot be processed at all.
    """
    _check_input(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _name_unnamed_nodes(work.graph)
    graph = Graph(work)
    used_before = graph.used_names()
    opset = _default_opset(work)
    rows = _fold_until_done(graph, opset)
    graph.drop_orphans(used_before)
    try:
        check_light(work)  # its weights are numpy's, made here
    except Exception as exc:  # a bug here, not bad input: say so plainly
        raise FoldError(f"the folded model fails onnx.checker ({exc}); please report it") from exc
    return work, FoldReport(rows)


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """Name every unnamed node after its first output as the file has it, before any fold moves
    output names from one node to another, so report rows keep naming the right layer."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            base = node.output[0] if node.output and node.output[0] else f"{node.op_type}_{i}"
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            taken.add(name)


def _fold_until_done(graph: Graph, opset: int) -> list[FoldRow]:
    """Pass over the maps until a pass folds nothing: one fold can enable another (a Mul
    before a BN folds forward once the BN has gone into the next conv). One row per map, in
    graph order: how it folded, else the last reason it did not."""
    rows: dict[str, FoldRow] = {}
    progressed = True
    while progressed:
        progressed = False
        for key, affine in _affine_maps(graph, opset):  # lazily: each sees earlier folds
            row = _fold_one(graph, affine)
            progressed |= row.folded
            rows[key] = row
    return list(rows.values())


def fold_onnx_file(src: Path, dst: Path) -> FoldReport:
    """Load `src` (external data included), fold it, write `dst` atomically; the report.

    Loading is `bnfold.toolchain.load.load_onnx` (not ONNX, truncated, checker, missing or short
    external data, over 2 GB: each a one-line FoldError). The folded model is written as one
    file, external data inlined.
    """
    from bnfold.toolchain.load import ModelImportError, load_onnx

    src, dst = Path(src), Path(dst)
    try:
        model = load_onnx(src).model
    except ModelImportError as exc:
        raise FoldError(exc.message) from None
    folded, report = fold_onnx(model)
    write_model_atomically(folded, dst)
    return report


# ---------------------------------------------------------------- finding the maps


def _affine_maps(graph: Graph, opset: int):
    """Yield (first output, map) for each BN / Mul-Add chain in graph order (a FoldRow for a
    BN refused outright)."""
    keys = [n.output[0] for n in graph.g.node if n.output and n.op_type in _CANDIDATE_OPS]
    seen: set[str] = set()
    for key in keys:
        node = graph.producer.get(key)
        if node is None or key in seen or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "BatchNormalization":
            try:
                affine = batchnorm_affine(graph, node, opset)
            except Refused as refused:
                affine = FoldRow(bn=node_name(node), folded=False, reason=str(refused))
            yield key, affine
            continue
        step = mul_add_step(graph, node)
        if step is None or is_matmul_bias(graph, step):
            continue
        chain = mul_add_chain(graph, step)
        seen.update(n.output[0] for n in chain.nodes)
        yield key, chain


_CANDIDATE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


# ---------------------------------------------------------------- deciding


def _fold_one(graph: Graph, affine: Affine | FoldRow) -> FoldRow:
    """Fold one map backward, else forward, else say why not."""
    if isinstance(affine, FoldRow):
        return affine
    lo, hi = foldmath.scale_range(affine.s)
    row = FoldRow(
        bn=affine.name, op=affine.op, folded=False, scale_min=lo, scale_max=hi,
        warning=foldmath.scale_warning(affine.s),
    )  # fmt: skip
    if not (np.isfinite(affine.s).all() and np.isfinite(affine.t).all()):
        return row.model_copy(update={"reason": "not folded: non-finite scale or shift"})
    try:
        plan = _plan_backward(graph, affine)
        _apply_backward(graph, affine, plan)
        return _folded(row, plan, "backward", affine.y)
    except Refused as refused:
        back = refused
    try:
        plan = _plan_forward(graph, affine)
        _apply_forward(graph, affine, plan)
        return _folded(row, plan, "forward", plan.layer.output)
    except _NoLayer as fwd:
        reason = f"not folded: {back}; its {fwd}" if isinstance(back, _NoLayer) else str(back)
    except Refused as fwd:
        reason = str(fwd) if isinstance(back, _NoLayer) else str(back)
    return row.model_copy(update={"reason": reason})


def _folded(row: FoldRow, plan: _Plan, direction: str, probe: str) -> FoldRow:
    into = node_name(plan.layer.node)
    update = {"folded": True, "into": into, "direction": direction, "probe": probe}
    return row.model_copy(update=update)


def _plan_backward(graph: Graph, affine: Affine) -> _Plan:
    """The layer behind the map and (s, t) per output channel, or Refused."""
    path, cur = [], affine.x
    while (p := graph.producer.get(cur)) is not None and p.op_type in SHAPE_OPS:
        path.insert(0, p)
        cur = p.input[0]
    layer = layer_at(graph, graph.producer.get(cur))
    if layer is None:
        src = graph.producer.get(cur)
        where = describe(src) if src else f"the graph input '{cur}'"
        raise _NoLayer(f"input comes from {where}, not a Conv/ConvTranspose/Gemm/MatMul")
    on_path = [layer.node, layer.bias_add, *path, affine.nodes[0]]
    for tensor in [layer.node.output[0], layer.output] + [n.output[0] for n in path]:
        if not graph.private(tensor):
            others = [n for n in graph.consumers.get(tensor, []) if n not in on_path]
            also = ", ".join(describe(n) for n in others)
            if tensor in graph.graph_outputs:
                also = ", ".join(filter(None, [also, "a graph output"]))
            raise Refused(
                f"not folded: '{tensor}' (output of {describe(graph.producer[tensor])}) is also "
                f"read by {also}"
            )
    check_layer(graph, layer)
    out_rank = graph.rank(layer.output)
    axis = out_rank - 1 if layer.kind == "MatMul" and out_rank else 1
    if layer.kind == "MatMul" and out_rank is None:
        raise Refused(f"not folded: rank of {describe(layer.node)} output unknown")
    axis, repeat, tile = _through(graph, path, (axis, 1, 1), layer)
    if affine.axis is not None and (axis != affine.axis or (repeat, tile) != (1, 1)):
        raise Refused(
            f"not folded: it scales axis {affine.axis} of '{affine.x}', not the output "
            f"channels of {describe(layer.node)}"
        )
    n = foldmath.out_channels(layer.w.shape, layer.layout(), layer.groups)
    return _Plan(layer, *affine.expand(n))


def _plan_forward(graph: Graph, affine: Affine) -> _Plan:
    """The layer after the map and (s, t) per input channel, or Refused."""
    path, cur = [], affine.y
    # Shape/Size readers (Keras computes its Flatten's target shape) see no value change
    while (c := graph.sole_value_reader(cur)) is not None and (
        c.op_type in SHAPE_OPS or commuting_pool(graph, c) or copying_pad(graph, c)
    ):
        if c.input[0] != cur:
            break
        path.append(c)
        cur = c.output[0]
    layer = layer_at(graph, graph.sole_value_reader(cur), data=cur)
    if layer is None:
        raise _NoLayer(
            f"output feeds {graph.users_text(cur)}, not one Conv/Gemm/MatMul it can fold into"
        )
    if layer.kind == "ConvTranspose":
        raise Refused("not folded: forward fold into ConvTranspose is not supported")
    _attach_matmul_bias(graph, layer)
    check_layer(graph, layer)
    in_axis = _input_axis(graph, layer)
    axis, repeat, tile = (in_axis, 1, 1)
    if affine.axis is not None:
        axis, repeat, tile = _through(graph, path, (affine.axis, 1, 1), layer)
    if axis != in_axis or (layer.kind == "Conv" and (repeat, tile) != (1, 1)):
        raise Refused(
            f"not folded: its channels are not the input channels of {describe(layer.node)}"
        )
    maxpool = next((p for p in path if p.op_type in ("MaxPool", "GlobalMaxPool")), None)
    if maxpool is not None and np.any(affine.s < 0):
        raise Refused(f"not folded: a negative scale does not commute with {describe(maxpool)}")
    n = foldmath.in_channels(layer.w.shape, layer.layout(), layer.groups)
    s, t = affine.expand(n, repeat, tile)
    if layer.kind == "Conv" and np.any(t != 0) and reads_zero_padding(layer):
        raise Refused(PADDED_REASON)
    return _Plan(layer, s, t)


def _through(graph: Graph, path: list, at: Channel, layer: Layer) -> Channel:
    """Follow the channel (axis, repeat, tile) through shape-only nodes and pools, or Refused."""
    for node in path:
        if node.op_type in POOL_OPS or node.op_type == "Pad":
            if at != (1, 1, 1):
                raise Refused(f"not folded: it scales axis {at[0]}, not the channels of "
                              f"{describe(node)}")  # fmt: skip
            continue
        moved = map_axis(node, at, graph.dims.get(node.input[0]), graph.dims.get(node.output[0]))
        if moved is None:
            raise Refused(
                f"not folded: {describe(node)} between it and {describe(layer.node)} does not "
                "keep the channel axis (or its shapes are unknown)"
            )
        at = moved
    return at


def _input_axis(graph: Graph, layer: Layer) -> int:
    if layer.kind == "Gemm":
        return 0 if attr(layer.node, "transA", 0) else 1
    if layer.kind == "MatMul":
        rank = graph.rank(layer.node.input[0])
        if rank is None:
            raise Refused(f"not folded: rank of {describe(layer.node)} input unknown")
        return rank - 1
    return 1


def _attach_matmul_bias(graph: Graph, layer: Layer) -> None:
    """A MatMul whose output only feeds a constant bias Add: fold the shift into that bias."""
    if layer.kind != "MatMul":
        return
    nxt = graph.sole_consumer(layer.node.output[0])
    step = mul_add_step(graph, nxt) if nxt is not None else None
    if step is not None and is_matmul_bias(graph, step):
        layer.bias_add = nxt


# ---------------------------------------------------------------- applying


def _apply_backward(graph: Graph, affine: Affine, plan: _Plan) -> None:
    """New weights for the layer; the map's nodes removed; the layer side takes the map's name."""
    layer, s, t = plan.layer, plan.s, plan.t
    conv_bias = _bias_value(graph, layer) if layer.kind.startswith("Conv") else None
    w_new, b_new = foldmath.fold_backward(
        layer.w, conv_bias, s, t, layout=layer.layout(), groups=layer.groups
    )
    graph.set_constant(layer.node.input[1], w_new, layer.node)
    if layer.kind in ("Conv", "ConvTranspose"):
        _set_bias(graph, layer, b_new)
    elif layer.kind == "Gemm":
        beta = float(attr(layer.node, "beta", 1.0))
        c = _bias_value(graph, layer)
        c_new = t if c is None else foldmath.f64(c) * beta * s + t  # (N,) or C's shape
        _set_bias(graph, layer, c_new.astype(layer.w.dtype))
        set_float_attr(layer.node, "beta", 1.0)
    else:  # MatMul: its bias lives in the Add after it
        b = _bias_value(graph, layer)
        b_new = t if b is None else foldmath.f64(b) * s + t
        _set_bias(graph, layer, b_new.astype(layer.w.dtype))
    graph.remove_nodes(affine.nodes)
    graph.rename_tensor(affine.x, affine.y)


def _apply_forward(graph: Graph, affine: Affine, plan: _Plan) -> None:
    """New weights for the next layer; the map's nodes removed; the layer reads the map's input."""
    layer, s, t = plan.layer, plan.s, plan.t
    layout, groups = layer.layout(), layer.groups
    w_new, _ = foldmath.fold_forward(layer.w, None, s, t, layout=layout, groups=groups)
    shift = foldmath.forward_shift(layer.w, t, layout=layout, groups=groups)  # float64 (out,)
    graph.set_constant(layer.node.input[1], w_new, layer.node)
    b = _bias_value(graph, layer)
    if layer.kind == "Gemm":
        alpha, beta = float(attr(layer.node, "alpha", 1.0)), float(attr(layer.node, "beta", 1.0))
        b_new = alpha * shift if b is None else beta * foldmath.f64(b) + alpha * shift
        set_float_attr(layer.node, "beta", 1.0)
    else:
        b_new = shift if b is None else foldmath.f64(b) + shift
    _set_bias(graph, layer, b_new.astype(layer.w.dtype))
    graph.remove_nodes(affine.nodes)
    graph.rename_tensor(affine.y, affine.x)


def _bias_value(graph: Graph, layer: Layer) -> np.ndarray | None:
    name = bias_name(layer)
    return None if name is None else graph.constant(name)


def _set_bias(graph: Graph, layer: Layer, value: np.ndarray) -> None:
    """Write the layer's bias: in place, as a new input, or as a new Add after a MatMul."""
    name = bias_name(layer)
    if name is not None:
        graph.set_constant(name, value, layer.bias_add or layer.node)
        return
    if not np.any(value != 0):
        return  # nothing to add
    node = layer.node
    if layer.kind != "MatMul":
        new = graph.new_constant(f"{node_name(node)}_bias", value)
        if len(node.input) > 2:
            node.input[2] = new
        else:
            node.input.append(new)
        graph.refresh()
        return
    out = node.output[0]
    product = graph.fresh_name(f"{out}_matmul")
    bias = graph.new_constant(f"{node_name(node)}_bias", value)
    node.output[0] = product  # the MatMul alone; its readers now read the Add's output
    add = onnx.helper.make_node(
        "Add", [product, bias], [out], name=graph.fresh_name(f"{node_name(node)}_bias_add")
    )
    graph.insert_after(node, add)
    layer.bias_add = add  # the layer's output is the Add's (the MatMul's old name)


# ---------------------------------------------------------------- input and output checks


def _check_input(model: onnx.ModelProto) -> None:
    if not isinstance(model, onnx.ModelProto):
        raise FoldError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise FoldError(
                f"initializer '{init.name}' is stored as external data that is not loaded: "
                "load the model with onnx.load(path) (external data next to it) or use "
                "fold_onnx_file"
            )
    if _weight_bytes(model) > MAX_MODEL_BYTES // 2 and model.ByteSize() > MAX_MODEL_BYTES:
        raise FoldError("the model is over protobuf's 2 GB limit; it cannot be folded here")
    try:  # structure and types: a file's weights are checked where it is read (load_onnx)
        check_light(model)
    except Exception as exc:
        raise FoldError(f"the model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def _weight_bytes(model: onnx.ModelProto) -> int:
    """The initializers' raw bytes: most of a CNN's size, read without walking the whole
    message (ByteSize takes a second on a 500 MB model); the exact size is asked only near the
    limit."""
    return sum(
        len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data))
        + 8 * (len(t.int64_data) + len(t.double_data))
        for t in model.graph.initializer
    )  # fmt: skip


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise FoldError("the model imports no default-domain (ai.onnx) opset")


def write_model_atomically(model: onnx.ModelProto, dst: Path) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written dst."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is meant to be shared
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
