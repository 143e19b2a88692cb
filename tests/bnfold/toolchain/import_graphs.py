"""Small hand-built ONNX image classifiers for the import tests: the patterns users bring.

NCHW (PyTorch-style: Conv -> BatchNormalization -> Relu) and NHWC (Keras-style: Transpose ->
Conv -> Mul -> Add -> Relu), a fixed or variable batch axis, random non-trivial BN statistics.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C_MID = 4  # conv output channels


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _bn_params(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 2.0, c),
        "beta": rng.normal(0, 0.5, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.2, 3.0, c),
    }


def classifier(
    layout: str = "NCHW",
    affine: str | None = "bn",
    batch: int | str = 1,
    channels: int = 3,
    size: int | str = 8,
    classes: int = 3,
    opset: int = 17,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> [Transpose] -> Conv 3x3 pad 1 -> affine -> Relu -> GlobalAveragePool -> Flatten -> Gemm.

    affine: "bn" (BatchNormalization), "muladd" (constant (1, C, 1, 1) Mul then Add, how Keras
    exports BN), "input_bn" (a BN on the graph input itself: nothing to fold it into backward,
    and the padded conv after it refuses a forward fold), or None.
    """
    rng = np.random.default_rng(seed)
    shape = [batch, channels, size, size] if layout == "NCHW" else [batch, size, size, channels]
    nodes, inits, x = [], [], "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        x = "x_nchw"
    if affine == "input_bn":
        p = _bn_params(rng, channels)
        inits += [_init(f"in_{k}", v) for k, v in p.items()]
        nodes.append(
            helper.make_node(
                "BatchNormalization", [x] + [f"in_{k}" for k in p], ["x_bn"], name="input_bn"
            )
        )
        x = "x_bn"
    inits += [
        _init("conv_w", rng.normal(0, 0.5, (C_MID, channels, 3, 3))),
        _init("conv_b", rng.normal(0, 0.3, C_MID)),
    ]
    nodes.append(helper.make_node("Conv", [x, "conv_w", "conv_b"], ["h"], pads=[1, 1, 1, 1]))
    h = _affine(affine, rng, nodes, inits)
    inits += [
        _init("fc_w", rng.normal(0, 0.5, (classes, C_MID))),
        _init("fc_b", rng.normal(0, 0.3, classes)),
    ]
    nodes += [
        helper.make_node("Relu", [h], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _affine(affine, rng, nodes, inits) -> str:
    """Append the per-channel affine after the conv output 'h'; the name of its output."""
    if affine == "bn":
        p = _bn_params(rng, C_MID)
        inits += [_init(f"bn_{k}", v) for k, v in p.items()]
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                ["h"] + [f"bn_{k}" for k in p],
                ["hb"],
                name="bn",
                epsilon=1e-3,
            )
        )
        return "hb"
    if affine == "muladd":
        inits += [
            _init("bn_mul", rng.uniform(0.5, 2.0, (1, C_MID, 1, 1))),
            _init("bn_add", rng.normal(0, 0.5, (1, C_MID, 1, 1))),
        ]
        nodes += [
            helper.make_node("Mul", ["h", "bn_mul"], ["hm"], name="bn/mul"),
            helper.make_node("Add", ["hm", "bn_add"], ["ha"], name="bn/add"),
        ]
        return "ha"
    return "h"


def with_two_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A second real input (a scale the image is multiplied by): the server cannot feed it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]))
    first = m.graph.node[0]
    m.graph.node.insert(0, helper.make_node("Mul", ["x", "gain"], ["x_gain"]))
    for i, name in enumerate(first.input):
        if name == "x":
            first.input[i] = "x_gain"
    onnx.checker.check_model(m, full_check=True)
    return m


def simple_model(input_type: int, shape: list, opset: int = 17) -> onnx.ModelProto:
    """x -> Cast(float) -> Flatten -> logits: a graph for the input type and rank cases."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["xf"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "simple",
        [helper.make_tensor_value_info("x", input_type, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "F"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def with_fixed_batch_reshape(model: onnx.ModelProto) -> onnx.ModelProto:
    """Flatten replaced by Reshape to the constant [1, C]: batch 1 is baked into the graph."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    i = next(k for k, n in enumerate(m.graph.node) if n.op_type == "Flatten")
    flat = m.graph.node[i]
    m.graph.initializer.append(numpy_helper.from_array(np.int64([1, C_MID]), "flat_shape"))
    m.graph.node[i].CopyFrom(
        helper.make_node("Reshape", [flat.input[0], "flat_shape"], [flat.output[0]])
    )
    onnx.checker.check_model(m, full_check=True)
    return m
