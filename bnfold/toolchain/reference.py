"""A float64 evaluation of any ONNX graph: the reference both variants are measured against.

`onnx.reference.ReferenceEvaluator` (numpy kernels) runs a copy of the graph in which every
float tensor is float64: initializers, Constant nodes, ConstantOfShape values, Cast targets and
the graph's inputs and outputs. The rest of the graph (shape arithmetic in int64, ...) is kept
as it is. Numpy's float64 kernels round about 2^29 times finer than float32, so the result is
the exact function of the weights as stored, to well below any float32 difference we measure.
Slow (pure numpy): meant for a few hundred small images, not for serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_batch_normalization import (
    _batchnorm_test_mode,
    _batchnorm_training_mode,
)
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose

# Float types cast to float64; bfloat16 has no numpy dtype of its own, so it is left alone.
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype"}


def _tensor64(t: TensorProto) -> TensorProto:
    """A float tensor (data inline, external data already loaded) as float64, same name."""
    if t.data_type not in FLOAT_TYPES or t.data_type == TensorProto.DOUBLE:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)


def _cast_value_info(vi: onnx.ValueInfoProto) -> None:
    tt = vi.type.tensor_type
    if tt.elem_type in FLOAT_TYPES:
        tt.elem_type = TensorProto.DOUBLE


def _cast_node(node: onnx.NodeProto) -> None:
    """Cast float tensors held in attributes, retarget float dtype attributes, recurse."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            attr.t.CopyFrom(_tensor64(attr.t))
        elif attr.type == onnx.AttributeProto.GRAPH:
            _cast_graph(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                _cast_graph(g)
        elif attr.name == DTYPE_ATTRS.get(node.op_type) and attr.i in FLOAT_TYPES:
            attr.i = TensorProto.DOUBLE
    if node.op_type == "Constant" and node.attribute[0].name in ("value_float", "value_floats"):
        # value_float(s) always make float32: replace by an equal float64 tensor
        a = node.attribute[0]
        values = np.asarray(a.f if a.name == "value_float" else list(a.floats), dtype=np.float64)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(values)))


def _cast_graph(graph: onnx.GraphProto) -> None:
    for i, t in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_tensor64(t))
    for vi in (*graph.input, *graph.output):
        _cast_value_info(vi)
    del graph.value_info[:]  # intermediate float32 annotations would contradict the copy
    for node in graph.node:
        _cast_node(node)


def float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64 (external data must already be loaded)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _cast_graph(out.graph)
    return out


class GroupedConvTranspose(_RefConvTranspose):
    """onnx.reference's ConvTranspose one group at a time: its grouped path raises a reshape
    error in onnx 1.23. Each group is an ordinary transposed convolution of its own channels."""

    op_domain = ""

    def _run(self, X, W, B=None, group=None, **attrs):  # noqa: N803 - onnx's argument names
        groups = int(group or 1)
        if groups == 1:
            return super()._run(X, W, B, group=1, **attrs)
        biases = np.split(B, groups) if B is not None else [None] * groups
        parts = zip(np.split(X, groups, axis=1), np.split(W, groups, axis=0), biases, strict=True)
        outs = [super(GroupedConvTranspose, self)._run(x, w, b, group=1, **attrs)[0]
                for x, w, b in parts]  # fmt: skip
        return (np.concatenate(outs, axis=1),)


GroupedConvTranspose.__name__ = "ConvTranspose"  # replaces the built-in kernel by op name


class InferenceBatchNormalization(OpRun):
    """BatchNormalization as the spec and onnxruntime run it, in every opset.

    onnx.reference's BatchNormalization-9 (opsets 9-13) normalizes with the batch's own
    statistics whenever `momentum` is set, and PyTorch's TorchScript exporter always sets it:
    the float64 reference of every such model was wrong. Up to opset 13 a node is in training
    mode only when it has the statistics outputs (opset 6: `is_test=0`); from 14 on, when
    `training_mode=1`. Inference mode uses the running mean and variance (inputs 3 and 4).
    """

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, **attrs):
        n_out = sum(1 for o in self.onnx_node.output if o)
        training = bool(attrs.get("training_mode")) or attrs.get("is_test") == 0 or n_out > 1
        eps = 1e-5 if epsilon is None else epsilon
        if not training:
            return (_batchnorm_test_mode(x, scale, bias, mean, var, epsilon=eps),)
        m = 0.9 if momentum is None else momentum
        y, saved_mean, saved_var, run_mean, run_var = _batchnorm_training_mode(
            x, scale, bias, mean, var, momentum=m, epsilon=eps
        )
        if "training_mode" in attrs:  # opset 14+: (Y, running_mean, running_var)
            return (y, run_mean, run_var)[:n_out]
        return (y, run_mean, run_var, saved_mean, saved_var)[:n_out]  # opsets 7-13


InferenceBatchNormalization.__name__ = "BatchNormalization"  # replaces the built-in kernel


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx.reference on the float64 copy of `model`, with the grouped ConvTranspose and
    inference-mode BatchNormalization fixes."""
    return ReferenceEvaluator(
        float64_model(model), new_ops=[GroupedConvTranspose, InferenceBatchNormalization]
    )


class Float64Reference:
    """Evaluates one model in float64; build once, call for each batch."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.evaluator = reference_evaluator(model)

    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        """The named outputs (default: the graph's outputs) as float64 arrays."""
        feeds64 = {
            k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in feeds.items()
        }
        results = self.evaluator.run(list(outputs) if outputs else None, feeds64)
        return [np.asarray(r, dtype=np.float64) for r in results]


def evaluate_float64(
    model: onnx.ModelProto,
    input_name: str,
    x: np.ndarray,
    batch: int = 32,
    output: str | None = None,
) -> np.ndarray:
    """The model's `output` (default: its first) in float64 for x, in chunks of `batch` rows."""
    ref = Float64Reference(model)
    name = output or model.graph.output[0].name
    chunks = [ref.run({input_name: x[i : i + batch]}, [name])[0] for i in range(0, len(x), batch)]
    return np.concatenate(chunks)
