"""bnfold.foldmath against references that do not use it.

Conv and BatchNormalization references are onnx.reference (numpy, float64); dense layers are
numpy matmuls. Everything runs in float64, so only float64 rounding separates the fold from the
reference: ~1e-16 relative per operation, asserted at 1e-12 of the output magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as h
from onnx.reference import ReferenceEvaluator

from bnfold import foldmath

FEW = settings(max_examples=25, deadline=None)


def conv64(x, w, b=None, groups=1, strides=None, dilations=None, pads=None):
    """onnx.reference Conv in float64."""
    dim = w.ndim - 2
    attrs = {"group": groups, "strides": strides or [1] * dim, "dilations": dilations or [1] * dim}
    attrs["pads"] = pads or [0] * 2 * dim
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    node = h.make_node("Conv", inputs, ["y"], **attrs)
    vi = [h.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in inputs]
    graph = h.make_graph([node], "g", vi, [h.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    feeds = {"x": x, "w": w} | ({"b": b} if b is not None else {})
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    return ReferenceEvaluator(model).run(None, feeds)[0]


def bn64(x, gamma, beta, mean, var, eps):
    """onnx.reference BatchNormalization (inference) in float64, channels on axis 1.

    Tests pass float32-representable eps: the ONNX attribute is a float32.
    """
    assert eps == float(np.float32(eps))
    names = ["x", "g", "b", "m", "v"]
    node = h.make_node("BatchNormalization", names, ["y"], epsilon=eps)
    vi = [h.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names]
    graph = h.make_graph([node], "g", vi, [h.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 15)])
    feeds = dict(zip(names, (x, gamma, beta, mean, var), strict=True))
    return ReferenceEvaluator(model).run(None, feeds)[0]


def f32(eps: float) -> float:
    """eps as the float32 an ONNX attribute stores."""
    return float(np.float32(eps))


def stats(rng, c, var_lo=1e-3, gamma=1.0):
    return (
        rng.normal(size=c) * gamma,  # gamma
        rng.normal(size=c),  # beta
        rng.normal(size=c),  # mean
        np.exp(rng.uniform(np.log(var_lo), np.log(2.0), size=c)),  # var
    )


def assert_close64(got, expected):
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * scale)


def test_bn_scale_shift_is_inference_batchnorm():
    rng = np.random.default_rng(0)
    gamma, beta, mean, var = stats(rng, 5)
    x = rng.normal(size=(3, 5, 2))
    s, t = foldmath.bn_scale_shift(mean, var, f32(1e-3), gamma, beta)
    assert_close64(s[:, None] * x + t[:, None], bn64(x, gamma, beta, mean, var, f32(1e-3)))
    s1, t1 = foldmath.bn_scale_shift(np.zeros(2), np.full(2, 4.0), 0.0)  # no gamma/beta
    assert s1.tolist() == [0.5, 0.5] and t1.tolist() == [0.0, 0.0]


@FEW
@given(
    dim=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 3]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    pad=st.integers(0, 2),
    bias=st.booleans(),
    var_lo=st.sampled_from([1e-8, 1e-2]),
    eps=st.sampled_from([f32(1e-8), f32(1e-5), f32(0.1)]),
    seed=st.integers(0, 2**16),
)
def test_fold_backward_conv_equals_conv_then_bn(dim, groups, k, stride, dil, pad, bias, var_lo,
                                                eps, seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    cout, cpg = 2 * groups, 2
    w = rng.normal(size=(cout, cpg, *[k] * dim))
    b = rng.normal(size=cout) if bias else None
    x = rng.normal(size=(2, groups * cpg, *[(k - 1) * dil + 3] * dim))
    gamma, beta, mean, var = stats(rng, cout, var_lo, 1e3)
    geometry = {"groups": groups, "strides": [stride] * dim, "dilations": [dil] * dim,
                "pads": [pad] * 2 * dim}  # fmt: skip
    expected = bn64(conv64(x, w, b, **geometry), gamma, beta, mean, var, eps)
    s, t = foldmath.bn_scale_shift(mean, var, eps, gamma, beta)
    w2, b2 = foldmath.fold_backward(w, b, s, t, layout="out_in", groups=groups)
    assert w2.shape == w.shape and b2.shape == (cout,)
    assert_close64(conv64(x, w2, b2, **geometry), expected)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_fold_backward_dense_equals_dense_then_bn(layout):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4))  # (in, out)
    b = rng.normal(size=4)
    x = rng.normal(size=(3, 6))
    gamma, beta, mean, var = stats(rng, 4)
    expected = bn64(x @ w + b, gamma, beta, mean, var, f32(1e-5))
    s, t = foldmath.bn_scale_shift(mean, var, f32(1e-5), gamma, beta)
    stored = w if layout == "in_out" else w.T
    w2, b2 = foldmath.fold_backward(stored, b, s, t, layout=layout)
    assert_close64(x @ (w2 if layout == "in_out" else w2.T) + b2, expected)


@pytest.mark.parametrize("groups, cpg, opg", [(1, 3, 2), (2, 2, 3), (3, 1, 1), (4, 2, 1)])
def test_fold_backward_transposed_scales_output_channel_per_group(groups, cpg, opg):
    """ConvTranspose (in, out/g, k...): output channel g*opg + j is W[g*cpg:(g+1)*cpg, j]."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(groups * cpg, opg, 2, 3))
    s, t = rng.normal(size=groups * opg), rng.normal(size=groups * opg)
    b = rng.normal(size=groups * opg)
    w2, b2 = foldmath.fold_backward(w, b, s, t, layout="transposed", groups=groups)
    for g in range(groups):
        for j in range(opg):
            rows = slice(g * cpg, (g + 1) * cpg)
            np.testing.assert_array_equal(w2[rows, j], w[rows, j] * s[g * opg + j])
    np.testing.assert_array_equal(b2, b * s + t)


@FEW
@given(
    dim=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 3]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_forward_conv_equals_bn_then_unpadded_conv(dim, groups, k, stride, dil, bias, seed):
    rng = np.random.default_rng(seed)
    cout, cpg = 2 * groups, 2
    w = rng.normal(size=(cout, cpg, *[k] * dim))
    b = rng.normal(size=cout) if bias else None
    x = rng.normal(size=(2, groups * cpg, *[(k - 1) * dil + 2] * dim))
    gamma, beta, mean, var = stats(rng, groups * cpg)
    geometry = {"groups": groups, "strides": [stride] * dim, "dilations": [dil] * dim}
    expected = conv64(bn64(x, gamma, beta, mean, var, f32(1e-5)), w, b, **geometry)
    s, t = foldmath.bn_scale_shift(mean, var, f32(1e-5), gamma, beta)
    w2, b2 = foldmath.fold_forward(w, b, s, t, layout="out_in", groups=groups)
    assert_close64(conv64(x, w2, b2, **geometry), expected)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_fold_forward_dense_equals_bn_then_dense(layout):
    rng = np.random.default_rng(3)
    w, b, x = rng.normal(size=(6, 4)), rng.normal(size=4), rng.normal(size=(3, 6))
    gamma, beta, mean, var = stats(rng, 6)
    expected = bn64(x, gamma, beta, mean, var, f32(1e-5)) @ w + b
    s, t = foldmath.bn_scale_shift(mean, var, f32(1e-5), gamma, beta)
    stored = w if layout == "in_out" else w.T
    w2, b2 = foldmath.fold_forward(stored, b, s, t, layout=layout)
    assert_close64(x @ (w2 if layout == "in_out" else w2.T) + b2, expected)
    shift = foldmath.forward_shift(stored, t, layout=layout)
    assert_close64(shift, t @ w)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rounds_once_to_the_weight_dtype(dtype):
    """Bit-identical to the float64 fold rounded once: the nearest representable weights."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 3, 3, 3)).astype(dtype)
    b = rng.normal(size=4).astype(dtype)
    s, t = foldmath.bn_scale_shift(*stats(rng, 4)[2:], 1e-5, *stats(rng, 4)[:2])
    for fold in (foldmath.fold_backward, foldmath.fold_forward):
        s_in = s if fold is foldmath.fold_backward else np.resize(s, 3)
        t_in = t if fold is foldmath.fold_backward else np.resize(t, 3)
        w_low, b_low = fold(w, b, s_in, t_in)
        w64, b64 = fold(w.astype(np.float64), b.astype(np.float64), s_in, t_in)
        assert w_low.dtype == b_low.dtype == dtype
        np.testing.assert_array_equal(w_low, w64.astype(dtype))
        np.testing.assert_array_equal(b_low, b64.astype(dtype))


def test_refusals_say_what_is_allowed():
    w = np.ones((4, 3, 3, 3))
    with pytest.raises(ValueError, match="BN has 5 channels but the layer has 4 output"):
        foldmath.fold_backward(w, None, np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match="BN has 4 channels but the layer has 3 input"):
        foldmath.fold_forward(w, None, np.ones(4), np.zeros(4))
    with pytest.raises(ValueError, match="forward fold into a ConvTranspose is not supported"):
        foldmath.fold_forward(w, None, np.ones(4), np.zeros(4), layout="transposed")
    with pytest.raises(ValueError, match="unknown weight layout 'oihw'"):
        foldmath.fold_backward(w, None, np.ones(4), np.zeros(4), layout="oihw")
    with pytest.raises(ValueError, match="groups=2 is not valid for layout 'in_out'"):
        foldmath.fold_backward(np.ones((3, 4)), None, np.ones(4), np.zeros(4), layout="in_out",
                               groups=2)  # fmt: skip


def test_scale_warning_above_1e3():
    assert foldmath.scale_warning(np.array([1.0, -999.0])) is None
    assert "scale up to 1e+03" in foldmath.scale_warning(np.array([0.5, -1000.5]))
    assert foldmath.scale_range(np.array([-3.0, 0.5])) == (0.5, 3.0)
