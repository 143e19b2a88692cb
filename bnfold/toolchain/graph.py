"""An editable index over one ONNX graph: producers, consumers, constants, shapes, renames.

What the ONNX fold needs to decide and apply a fold, and nothing else. Torch-free.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

# Nodes that move elements without changing values: a per-channel map commutes with them as
# long as the channel axis survives (checked with shapes, see map_axis).
SHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Identity"})
# Float types the fold handles: float16 is folded in float64 and rounded once to float16.
FLOAT_DTYPES = (np.float32, np.float64, np.float16)

Dim = int | str | None  # a known size, a symbolic one (dim_param), or unknown
MAX_CONSTANT_NODES = 32  # a computed constant bigger than this is not evaluated
_NO_NODE = onnx.NodeProto()


class Graph:
    """Index of `model.graph` (mutated in place by the fold)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.dims, self.dtypes = _infer_shapes(model)
        self._names = itertools.count()
        self.refresh()

    # ------------------------------------------------------------ index

    def refresh(self) -> None:
        """Rebuild producer / consumer maps after an edit."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in _node_reads(node):
                self.consumers[name].append(node)
        self.inits = {i.name: i for i in self.g.initializer}
        self.graph_inputs = {i.name for i in self.g.input}
        self.graph_outputs = {o.name for o in self.g.output}
        self._computed: dict[str, np.ndarray | None] = {}

    def used_names(self) -> set[str]:
        """Every tensor name some node reads, or the graph outputs."""
        return set(self.consumers) | self.graph_outputs

    def private(self, name: str) -> bool:
        """True when exactly one node reads `name` and it is not a graph output."""
        return len(self.consumers.get(name, [])) == 1 and name not in self.graph_outputs

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        return self.consumers[name][0] if self.private(name) else None

    def sole_value_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node that reads the values of `name`; Shape/Size readers, which see only
        its shape (a per-channel map keeps it), do not count. None for a graph output."""
        readers = [n for n in self.consumers.get(name, []) if not _shape_only_reader(n)]
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

    def users_text(self, name: str, besides: onnx.NodeProto | None = None) -> str:
        """Who else reads `name`: for refusal reasons."""
        others = [describe(n) for n in self.consumers.get(name, []) if n is not besides]
        if name in self.graph_outputs:
            others.append("a graph output")
        return ", ".join(others) or "nothing"

    # ------------------------------------------------------------ constants

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is a constant (initializer or Constant node), else None.

        An initializer that is also a graph input can be overridden at run time: not constant.
        """
        if not name or name in self.graph_inputs:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return _constant_node_value(node)
        if name not in self._computed:
            self._computed[name] = self._evaluate(name)
        return self._computed[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        """The value of a tensor computed from constants only (e.g. torch's exported zero bias
        `Expand(0, Shape(W))`), by onnx.reference on those nodes; None when it reads anything
        else or cannot be evaluated."""
        nodes, stack, seen = [], [name], set()
        while stack:
            t = stack.pop()
            if t in seen or (t in self.inits and t not in self.graph_inputs):
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is None or not _pure(node) or len(nodes) >= MAX_CONSTANT_NODES:
                return None
            if node not in nodes:
                nodes.append(node)
                # CastLike reads its second input for the dtype alone (see _as_cast)
                reads = node.input[:1] if node.op_type == "CastLike" else node.input
                stack.extend(i for i in reads if i)
        position = {o: k for k, n in enumerate(self.g.node) for o in n.output}
        nodes.sort(key=lambda n: position[n.output[0]])  # graph order is topological
        nodes = [self._as_cast(n) if n.op_type == "CastLike" else n for n in nodes]
        if None in nodes:
            return None
        inits = {i: self.inits[i] for n in nodes for i in n.input if i in self.inits}
        graph = onnx.helper.make_graph(
            nodes, "constant", [], [onnx.helper.make_empty_tensor_value_info(name)],
            list(inits.values()),
        )  # fmt: skip
        model = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
        try:
            from onnx.reference import ReferenceEvaluator

            return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
        except Exception:  # any evaluation failure: treat the tensor as not constant
            return None

    def _as_cast(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """CastLike(x, like) as Cast(x, to=dtype of like), when that dtype is known."""
        to = self.dtypes.get(node.input[1])
        if not to:
            return None
        return onnx.helper.make_node("Cast", node.input[:1], list(node.output), to=to)

    def not_constant_reason(self, name: str) -> str:
        if name in self.graph_inputs:
            return f"'{name}' is a graph input (overridable at run time), not a constant"
        node = self.producer.get(name)
        return f"'{name}' is computed by {describe(node)}, not a constant" if node else "missing"

    def set_constant(self, name: str, value: np.ndarray, reader: onnx.NodeProto) -> None:
        """`reader` reads `value` where it read the constant `name`.

        An initializer or Constant node (only `reader` reads it, see shared_with) is replaced
        in place, under its own name; a computed constant stays for its other readers and
        `reader` gets a new initializer.
        """
        if name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        node = self.producer[name]
        if node.op_type == "Constant":  # becomes an initializer of the same name
            self.g.node.remove(node)
            self.g.initializer.append(numpy_helper.from_array(value, name))
        else:
            new = self.new_constant(f"{name}_folded", value)
            for i, inp in enumerate(reader.input):
                if inp == name:
                    reader.input[i] = new
        self.refresh()

    def shared_with(self, name: str, readers: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Other nodes that read the values of the stored constant `name` (a fold would change
        them too). Shape/Size read only the shape, which a fold keeps; a computed constant is
        never edited in place (see set_constant)."""
        if name not in self.inits and self.producer.get(name, _NO_NODE).op_type != "Constant":
            return []
        return [
            n for n in self.consumers.get(name, [])
            if n not in readers and n.op_type not in ("Shape", "Size")
        ]  # fmt: skip

    def new_constant(self, hint: str, value: np.ndarray) -> str:
        """Add an initializer under a fresh name derived from `hint`; returns the name."""
        name = self.fresh_name(hint)
        self.g.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def fresh_name(self, hint: str) -> str:
        taken = set(self.producer) | set(self.inits) | set(self.consumers) | self.graph_inputs
        name = hint
        while name in taken:
            name = f"{hint}_{next(self._names)}"
        return name

    # ------------------------------------------------------------ edits

    def remove_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        for node in nodes:
            self.g.node.remove(node)
        self.refresh()

    def rename_tensor(self, old: str, new: str) -> None:
        """Every node output / input `old` becomes `new` (old's value_info is dropped)."""
        for node in self.g.node:
            for i, out in enumerate(node.output):
                if out == old:
                    node.output[i] = new
            for i, inp in enumerate(node.input):
                if inp == old:
                    node.input[i] = new
        self.dims.setdefault(new, self.dims.get(old))
        self._drop_value_info({old})
        self.refresh()

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        index = list(self.g.node).index(anchor)
        self.g.node.insert(index + 1, node)
        self.refresh()

    def drop_orphans(self, used_before: set[str]) -> None:
        """Remove the nodes and initializers the fold left unread (and their value_info).

        Only what was read before the fold: whatever the input model already left dangling
        stays as it was.
        """
        while True:
            used = self.used_names()
            dead = [
                n for n in self.g.node
                if n.output and not any(o in used for o in n.output)
                and any(o in used_before for o in n.output)
            ]  # fmt: skip
            if not dead:
                break
            self.remove_nodes(dead)
        used = self.used_names()
        gone = {n for n in used_before - used if n not in self.graph_inputs}
        for init in [i for i in self.g.initializer if i.name in gone]:
            self.g.initializer.remove(init)
        present = {o for n in self.g.node for o in n.output} | {i.name for i in self.g.initializer}
        self._drop_value_info({v.name for v in self.g.value_info} - present)
        self.refresh()

    def _drop_value_info(self, names: set[str]) -> None:
        for vi in [v for v in self.g.value_info if v.name in names]:
            self.g.value_info.remove(vi)

    # ------------------------------------------------------------ shapes

    def rank(self, name: str) -> int | None:
        dims = self.dims.get(name)
        return None if dims is None else len(dims)


def describe(node: onnx.NodeProto | None) -> str:
    """`Conv 'conv1'` (or the output name for an unnamed node)."""
    if node is None:
        return "nothing"
    return f"{node.op_type} '{node_name(node)}'"


def node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, float(value)))


Channel = tuple[int, int, int]  # (axis, repeat, tile): see map_axis


def map_axis(
    node: onnx.NodeProto, at: Channel, src: list[Dim] | None, dst: list[Dim] | None
) -> Channel | None:
    """Where the channel of a shape-only node's input lands in its output, or None.

    `at` = (axis, repeat, tile): along `axis`, index j holds channel (j // repeat) % C, over
    C * repeat * tile indices. A plain channel axis is (axis, 1, 1); a Flatten that merges the
    channel with the dims after it (NCHW) raises `repeat`, one that merges it with the dims
    before it (NHWC, how Keras flattens) raises `tile`. A Reshape moves the channel exactly
    when the dims before the merged group keep their product (or, the totals being equal, the
    dims from it on); anything else (a split, a shuffle across the channel) is refused.
    """
    axis, repeat, tile = at
    if node.op_type == "Identity":
        return at
    if node.op_type == "Transpose":
        rank = len(src) if src is not None else None
        perm = attr(node, "perm") or (list(range(rank))[::-1] if rank else None)
        return None if perm is None else (list(perm).index(axis), repeat, tile)
    if src is None or dst is None or not isinstance(src[axis], int):
        return None
    for p in range(axis, -1, -1):  # merge src[p:m] (p <= axis < m) into one dst axis
        prefix, suffix = _prod(src[:p]), _prod(src[p:])
        for j in range(len(dst)):
            # The dims before must hold as many elements: equal products before, or (the
            # total being equal) after; shape inference may name the batch anew ('unk__0')
            before = prefix is not None and _prod(dst[:j]) == prefix
            after = suffix is not None and _prod(dst[j:]) == suffix
            if not isinstance(dst[j], int) or not (before or after):
                continue
            for m in range(axis + 1, len(src) + 1):
                if _prod(src[p:m]) == (dst[j], ()):
                    inner, outer = _prod(src[axis + 1 : m]), _prod(src[p:axis])
                    return j, repeat * inner[0], tile * outer[0]
    return None


def _prod(dims: list[Dim]) -> tuple[int, tuple[str, ...]] | None:
    """A product of dims as (known factor, sorted symbols); None when a dim is unknown."""
    known, symbols = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            known *= d
        else:
            symbols.append(d)
    return known, tuple(sorted(symbols))


LIGHT_KEEP = 1024  # initializers up to this many values keep their values for shape inference


def check_light(model: onnx.ModelProto) -> None:
    """onnx.checker's full check (structure, then strict shape inference) of the weightless
    copy: for a graph whose initializers are known good (this tool made them, or the file's
    own check passed), without serializing the weights into the C++ checker."""
    onnx.checker.check_model(_weightless(model), full_check=True)


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose initializers of more than LIGHT_KEEP values are graph inputs of the same
    type and shape (the small ones keep their values: they may decide shapes)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    g = light.graph
    inputs = {i.name for i in g.input}
    kept = []
    for t in g.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= LIGHT_KEEP:
            kept.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]
    g.initializer.extend(kept)
    return light


def infer_shapes_light(model: onnx.ModelProto, data_prop: bool = False) -> onnx.ModelProto:
    """onnx's shape inference on a copy whose large initializers are graph inputs of the same
    type and shape: the shapes and types it infers are the same (only small tensors, such as a
    Reshape's target or a Resize's scales, decide shapes by their values), and the weights are
    not serialized into and parsed out of the C++ inference (seconds for a 100 MB model). Its
    exceptions are onnx's."""
    return onnx.shape_inference.infer_shapes(_weightless(model), data_prop=data_prop)


def _infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, list[Dim]], dict[str, int]]:
    """Dims and element types of every tensor shape inference can see."""
    try:
        inferred = infer_shapes_light(model, data_prop=True)
    except Exception:  # onnx raises InferenceError and others: fall back to declared shapes
        inferred = model
    dims: dict[str, list[Dim]] = {}
    dtypes: dict[str, int] = {}
    g = inferred.graph
    for vi in itertools.chain(g.input, g.value_info, g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            dims[vi.name] = [_dim(d) for d in tt.shape.dim]
    for init in g.initializer:
        dims[init.name] = list(init.dims)
        dtypes[init.name] = init.data_type
    return dims, dtypes


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param if d.HasField("dim_param") and d.dim_param else None


def _shape_only_reader(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx")


def _pure(node: onnx.NodeProto) -> bool:
    """A default-domain node without subgraphs or randomness: safe to evaluate once."""
    if node.domain not in ("", "ai.onnx") or node.op_type.startswith("Random"):
        return False
    return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute)  # fmt: skip


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.array(onnx.helper.get_attribute_value(a), dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(a), dtype=np.int64)
    return None  # sparse_value / value_string(s): not a float constant we fold


def _node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """The node's inputs, plus outer-scope names its subgraphs (If/Loop/Scan bodies) read."""
    yield from (i for i in node.input if i)
    for a in node.attribute:
        graphs = [a.g] if a.HasField("g") else list(a.graphs)
        for sub in graphs:
            yield from _outer_reads(sub)


def _outer_reads(graph: onnx.GraphProto) -> Iterator[str]:
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        for name in _node_reads(node):
            if name not in local:
                yield name
        local.update(node.output)
    yield from (o.name for o in graph.output if o.name not in local)
