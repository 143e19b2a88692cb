"""The float64 reference's own kernels (Conv, MaxPool, AveragePool, GlobalAveragePool, Relu,
Add, Erf, Gelu, MatMul) against onnx.reference's numpy kernels on the same float64 graph
(float64 rounding apart, where onnx.reference computes the spec's function) and against
onnxruntime in float32 (float32 rounding apart, including the ceil_mode pool sizes
onnx.reference gets wrong), on small random single-node graphs drawn over every attribute the
kernels implement."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.toolchain.reference import Float64Reference, float64_model

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _single_node(op: str, x_shape, inits: dict, opset: int = 19, **attrs) -> onnx.ModelProto:
    names = ["x", *inits]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ours(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return Float64Reference(model).run({"x": x})[0]


def _onnx_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnx.reference's own kernels on the float64 copy (no new_ops)."""
    return ReferenceEvaluator(float64_model(model)).run(None, {"x": x.astype(np.float64)})[0]


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _f32_close(got: np.ndarray, f32: np.ndarray, terms: int) -> None:
    """Within float32 rounding of a sum of `terms` O(1) products (1e-6 each, generously)."""
    assert got.shape == f32.shape
    np.testing.assert_allclose(f32, got, rtol=0, atol=1e-6 * max(terms, 1) + 1e-6)


# ------------------------------------------------------------------------------------- Conv


@st.composite
def conv_cases(draw):
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise", "depthwise_x2"]))
    groups = {"plain": 1, "grouped": draw(st.sampled_from([2, 3])), "depthwise": 4,
              "depthwise_x2": 3}[kind]  # fmt: skip
    cg = 1 if kind.startswith("depthwise") else draw(st.integers(1, 3))
    mg = 2 if kind == "depthwise_x2" else draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 2)) for _ in range(nd)]
    sizes = [draw(st.integers((k - 1) * d + 1, (k - 1) * d + 6 if nd < 3 else (k - 1) * d + 3))
             for k, d in zip(kernel, dilations, strict=True)]  # fmt: skip
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = {"group": groups, "strides": strides, "dilations": dilations, "auto_pad": auto_pad}
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * nd)]
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 3))
    x = rng.standard_normal((n, cg * groups, *sizes)).astype(np.float32)
    inits = {"w": rng.standard_normal((mg * groups, cg, *kernel)).astype(np.float32)}
    if draw(st.booleans()):
        inits["b"] = rng.standard_normal(mg * groups).astype(np.float32)
    return x, inits, attrs, cg * int(np.prod(kernel))


@SETTINGS
@given(conv_cases())
def test_conv_matches_onnx_reference_and_onnxruntime(case):
    x, inits, attrs, terms = case
    model = _single_node("Conv", list(x.shape), inits, **attrs)
    got = _ours(model, x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _onnx_reference(model, x), rtol=1e-12, atol=1e-12)
    if attrs["auto_pad"].startswith("SAME") and max(attrs["dilations"]) > 1:
        return  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER"
    _f32_close(got, _onnxruntime(model, x), terms)


@pytest.mark.parametrize("group", [1, 3])
def test_conv_batch_is_each_image_alone(group):
    """Conv splits a batch's images over the cores: each image's result is the one it gets
    alone, bit for bit, whatever the core count, and so is the batch's."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 40, 40)).astype(np.float32)  # over PARALLEL_WORK
    w = rng.standard_normal((6, 3 // group, 3, 3)).astype(np.float32)
    model = _single_node("Conv", list(x.shape), {"w": w}, pads=[1, 1, 1, 1], group=group)
    whole = _ours(model, x)
    one = _single_node("Conv", [1, 3, 40, 40], {"w": w}, pads=[1, 1, 1, 1], group=group)
    alone = np.concatenate([_ours(one, x[i : i + 1]) for i in range(5)])
    np.testing.assert_array_equal(whole, alone)
    np.testing.assert_allclose(whole, _onnx_reference(model, x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ pools


@st.composite
def pool_cases(draw):
    op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 2)) for _ in range(nd)]
    sizes = [draw(st.integers((k - 1) * d + 1, (k - 1) * d + 7 if nd < 3 else (k - 1) * d + 3))
             for k, d in zip(kernel, dilations, strict=True)]  # fmt: skip
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER",
                                     "VALID"]))  # fmt: skip
    attrs = {"kernel_shape": kernel, "strides": strides, "auto_pad": auto_pad,
             "ceil_mode": draw(st.integers(0, 1))}  # fmt: skip
    if draw(st.booleans()):
        attrs["dilations"] = dilations
    else:
        dilations = [1] * nd
    if auto_pad == "NOTSET":  # onnxruntime: a pad smaller than the kernel
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel * 2]
    if op == "AveragePool":
        attrs["count_include_pad"] = draw(st.integers(0, 1))
    if auto_pad.startswith("SAME"):
        attrs["ceil_mode"] = 0  # onnxruntime sizes SAME windows without it
    n = draw(st.integers(1, 2))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((n, 2, *sizes))
    return op, x.astype(np.float32), attrs


def _onnxruntime_differs_from_spec(x: np.ndarray, attrs) -> bool:
    """auto_pad SAME with a dilation: onnxruntime pads for the undilated kernel and outputs
    fewer than ceil(size / stride) values, the spec's SAME size (we follow the spec). SAME
    where the spec's padding max(0, (out - 1) x stride + kernel - size) clamps a negative
    value: onnxruntime refuses it ("padding values must be non-negative")."""
    if not attrs["auto_pad"].startswith("SAME"):
        return False
    dilations = attrs.get("dilations", [1] * len(attrs["kernel_shape"]))
    if max(dilations) > 1:
        return True
    spans = zip(x.shape[2:], attrs["kernel_shape"], attrs["strides"], dilations, strict=True)
    return any((-(-n // s) - 1) * s + (k - 1) * d + 1 < n for n, k, s, d in spans)


@SETTINGS
@given(pool_cases())
def test_pools_match_onnxruntime_and_onnx_reference(case):
    """onnxruntime is the judge, on every case it accepts. onnx.reference (1.23) only where it
    is right: explicit symmetric pads, no ceil_mode. Its ceil_mode sizes disagree with
    onnxruntime and PyTorch (GoogLeNet's Concat), and so do its auto_pad SAME and asymmetric
    pad windows; some of those it cannot evaluate at all."""
    op, x, attrs = case
    model = _single_node(op, list(x.shape), {}, **attrs)
    got = _ours(model, x)
    if not _onnxruntime_differs_from_spec(x, attrs):
        _f32_close(got, _onnxruntime(model, x), int(np.prod(attrs["kernel_shape"])))
    pads = attrs.get("pads", [])
    if (
        attrs["auto_pad"] != "NOTSET"
        or attrs["ceil_mode"]
        or pads[: len(pads) // 2] != pads[len(pads) // 2 :]
    ):
        return
    try:
        want = _onnx_reference(model, x)
    except (ValueError, IndexError):  # e.g. kernel (2, 1) with pads 1: an onnx.reference bug
        return
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [14, 15, 28])
def test_googlenet_block_ceil_mode_pools_concat(size):
    """GoogLeNet's inception block Concats a MaxPool(3, 1, 1, ceil_mode=True) branch with a
    1x1 conv branch, then pools with MaxPool(3, 2, ceil_mode=True): onnx.reference made the
    first pool 2 pixels larger (30 for 28) and the Concat failed in numpy."""
    rng = np.random.default_rng(size)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node(
            "MaxPool", ["x"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], ceil_mode=1
        ),  # fmt: skip
        helper.make_node("Concat", ["c", "p"], ["cat"], axis=1),
        helper.make_node(
            "MaxPool", ["cat"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
        ),  # fmt: skip
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 2, size, size)).astype(np.float32)
    got = _ours(model, x)
    out = -(-(size - 3) // 2) + 1  # PyTorch's ceil_mode size: the last window starts inside
    assert got.shape == (2, 5, out, out)
    _f32_close(got, _onnxruntime(model, x), 2)


def test_global_average_pool_relu_add():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    b = rng.standard_normal((3, 1, 4)).astype(np.float32)
    for op, inits in (("GlobalAveragePool", {}), ("Relu", {}), ("Add", {"b": b})):
        model = _single_node(op, list(x.shape), inits)
        got = _ours(model, x)
        np.testing.assert_allclose(got, _onnx_reference(model, x), rtol=1e-15)
        _f32_close(got, _onnxruntime(model, x), 20)


def test_erf_of_a_gelu_is_float64():
    """PyTorch exports GELU as x / 2 (1 + Erf(x / sqrt 2)): onnx.reference's Erf rounded every
    value to float32. Ours is float64, as math.erf computes it."""
    x = np.random.default_rng(4).standard_normal((3, 50)).astype(np.float32) * 3
    model = _single_node("Erf", list(x.shape), {})
    got = _ours(model, x)
    want = np.vectorize(math.erf)(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-16)
    assert np.abs(_onnx_reference(model, x) - want).max() > 1e-10  # onnx.reference: float32


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_gelu_is_the_spec_function_in_float64(approximate):
    """Gelu (opset 20): the spec's formula, element by element with math.erf / math.tanh in
    float64 (onnx.reference expands it into its float32-Erf function body), and onnxruntime's
    float32 Gelu within float32 rounding."""
    x = np.random.default_rng(5).standard_normal((2, 3, 40)).astype(np.float32) * 3
    attrs = {} if approximate is None else {"approximate": approximate}
    model = _single_node("Gelu", list(x.shape), {}, opset=20, **attrs)
    got = _ours(model, x)
    v = x.astype(np.float64).ravel()
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        want = [0.5 * t * (1 + math.tanh(c * (t + 0.044715 * t**3))) for t in v]
    else:
        want = [0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in v]
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-14, atol=1e-15)
    _f32_close(got, _onnxruntime(model, x), 4)


def test_sigmoid_is_the_float64_function_everywhere():
    """Sigmoid in float64, from x = -800 to 800: within 2 ulps of the stable formula
    onnx.reference uses, or 0 where sigmoid is under 1e-307 (x < -709, exp(-x) overflows),
    0 and 1 at the ends, and onnxruntime's float32 within float32 rounding; a batch large
    enough to be split over the cores included."""
    rng = np.random.default_rng(8)
    ends = np.float32([-800, -710, -40, -1e-8, 0, 1e-8, 40, 710, 800])
    for x in (ends.reshape(1, -1), (rng.standard_normal((4, 8, 96, 96)) * 12).astype(np.float32)):
        model = _single_node("Sigmoid", list(x.shape), {})
        got = _ours(model, x)
        want = _onnx_reference(model, x)
        np.testing.assert_allclose(got, want, rtol=4.5e-16, atol=1e-307)
        _f32_close(got, _onnxruntime(model, x), 1)
    got = _ours(_single_node("Sigmoid", [1, 9], {}), ends.reshape(1, -1))[0]
    assert got[0] == 0.0 and got[-1] == 1.0 and got[4] == 0.5


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4, 16, 96, 96)])
def test_hard_swish_is_the_spec_function_in_float64(shape):
    """HardSwish, x * max(0, min(1, x / 6 + 1/2)) element by element in Python floats (the
    spec's 1/6, not onnx.reference's float32 attribute), small and split over the cores, and
    onnxruntime's float32 within float32 rounding."""
    x = (np.random.default_rng(10).standard_normal(shape) * 5).astype(np.float32)
    model = _single_node("HardSwish", list(shape), {}, opset=14)
    got = _ours(model, x)
    v = x.astype(np.float64).ravel()
    want = [t * max(0.0, min(1.0, t / 6 + 0.5)) for t in v.tolist()]
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-15, atol=0)
    _f32_close(got, _onnxruntime(model, x), 2)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4, 16, 96, 96)])
def test_batch_normalization_over_the_cores_is_the_formula(shape):
    """Inference BatchNormalization, small and split over the cores: (x - mean) * scale /
    sqrt(var + eps) + bias in float64, written out by hand."""
    rng = np.random.default_rng(9)
    c = shape[1]
    stats = {"g": rng.uniform(-2, 2, c), "b": rng.normal(size=c), "m": rng.normal(size=c),
             "v": rng.uniform(0.1, 3, c)}  # fmt: skip
    x = rng.standard_normal(shape).astype(np.float32)
    inits = {k: v.astype(np.float32) for k, v in stats.items()}
    model = _single_node("BatchNormalization", list(shape), inits, epsilon=1e-3)
    g, b, m, v = (inits[k].astype(np.float64).reshape(1, c, 1, 1) for k in "gbmv")
    want = (x.astype(np.float64) - m) * (g / np.sqrt(v + np.float64(np.float32(1e-3)))) + b
    np.testing.assert_allclose(_ours(model, x), want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("a_shape", [(2, 5, 7, 6), (3, 6), (4, 2, 6)])
def test_matmul_of_a_stack_by_a_matrix(a_shape):
    """A channels-last Linear ((N, H, W, K) x (K, M)) as one BLAS call: onnx.reference's
    MatMul on the same float64 values, and onnxruntime's float32."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal(a_shape).astype(np.float32)
    w = rng.standard_normal((a_shape[-1], 9)).astype(np.float32)
    model = _single_node("MatMul", list(x.shape), {"w": w})
    got = _ours(model, x)
    np.testing.assert_allclose(got, _onnx_reference(model, x), rtol=1e-13, atol=1e-14)
    _f32_close(got, _onnxruntime(model, x), a_shape[-1])
