"""The ONNX fold over hand-built graphs: every pattern, every refusal, properties.

Reference: onnxruntime on the unfolded graph with optimizations disabled (BN really runs);
the tolerance is the float32 summation bound of `graphs.assert_folds_equal`.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.toolchain.fold import PADDED_REASON, FoldError, fold_onnx, fold_onnx_file
from tests.bnfold.toolchain.graphs import (
    Builder,
    assert_folds_equal,
    assert_well_formed,
    count_ops,
    foldable_mul_add,
    run,
    run64,
)

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# BN statistics as the torch fold's property tests draw them: tiny variances, huge gammas.
BN_STATS = st.fixed_dictionaries(
    {
        "var_lo": st.sampled_from([1e-8, 1e-4, 0.1]),
        "gamma": st.sampled_from([1e-2, 1.0, 1e3]),
        "eps": st.sampled_from([1e-8, 1e-5, 1e-3, 0.1]),
    }
)


def fold_and_check(model, x, folded_rows: int, extra: float = 0.0):
    """Fold; assert well-formed, nothing foldable left, equal within the float32 bound."""
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before, "fold_onnx modified its input"
    assert_well_formed(model, folded)
    assert len(report.folded) == folded_rows, report.summary()
    assert count_ops(folded, "BatchNormalization") == len(report.refused)
    assert_folds_equal(model, folded, x, extra)
    return folded, report


def only_row(report):
    assert len(report.rows) == 1, report.summary()
    return report.rows[0]


# ---------------------------------------------------------------- backward folds


def conv_bn(
    dim=2, cin=3, cout=4, k=3, groups=1, stride=1, pad=1, dil=1, bias=True, seed=0, stats=None
):
    b = Builder(seed)
    w = b.const(b.randn(cout, cin // groups, *[k] * dim))
    inputs = ["x", w] + ([b.const(b.randn(cout))] if bias else [])
    conv = b.node(
        "Conv", inputs, name="conv", group=groups, strides=[stride] * dim,
        pads=[pad] * 2 * dim, dilations=[dil] * dim,
    )  # fmt: skip
    out = b.bn(conv, cout, **(stats or {}))
    size = 2 * (k - 1) * dil + 3
    x = b.randn(2, cin, *[size] * dim).astype(np.float32)
    return b.model(["N", cin, *[size] * dim], out), x


def test_conv_bn_folds_backward_and_keeps_the_output_name():
    model, x = conv_bn()
    folded, report = fold_and_check(model, x, 1)
    row = only_row(report)
    assert (row.bn, row.into, row.direction) == ("bn", "conv", "backward")
    assert row.op == "BatchNormalization"
    assert row.probe == "bn_out" and folded.graph.output[0].name == "bn_out"
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert 0 < row.scale_min <= row.scale_max and row.warning is None


def test_unnamed_nodes_are_reported_by_op_and_position_not_by_a_moved_tensor_name():
    model, x = conv_bn()
    for node in model.graph.node:
        node.name = ""  # exporters may leave every node unnamed
    folded, report = fold_and_check(model, x, 1)
    row = only_row(report)
    # The conv's own output name ('conv_out'), not the BN output name it takes over.
    assert (row.bn, row.into) == ("bn_out", "conv_out"), row
    assert [n.output[0] for n in folded.graph.node] == ["bn_out"]


@PROPERTY
@given(
    dim=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    cpg=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    dil=st.integers(1, 2),
    k=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    stats=BN_STATS,
)
def test_property_conv_bn(dim, groups, cpg, stride, pad, dil, k, bias, seed, stats):
    model, x = conv_bn(
        dim, groups * cpg, 2 * groups, k, groups, stride, pad, dil, bias, seed, stats
    )
    fold_and_check(model, x, 1)


def conv_transpose_bn(
    groups=2, cpg=2, opg=3, k=3, stride=2, out_pad=1, bias=False, seed=0, stats=None
):
    b = Builder(seed)
    cin, cout = groups * cpg, groups * opg
    w = b.const(b.randn(cin, opg, k, k))
    inputs = ["x", w] + ([b.const(b.randn(cout))] if bias else [])
    conv = b.node(
        "ConvTranspose", inputs, name="deconv", group=groups, strides=[stride, stride],
        output_padding=[out_pad, out_pad], pads=[1, 1, 1, 1],
    )  # fmt: skip
    x = b.randn(2, cin, 4, 4).astype(np.float32)
    return b.model(["N", cin, 4, 4], b.bn(conv, cout, **(stats or {}))), x


@PROPERTY
@given(
    groups=st.sampled_from([1, 2, 3]),
    cpg=st.integers(1, 3),
    opg=st.integers(1, 3),
    k=st.integers(2, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    stats=BN_STATS,
)
def test_property_grouped_conv_transpose_bn(groups, cpg, opg, k, stride, bias, seed, stats):
    model, x = conv_transpose_bn(groups, cpg, opg, k, stride, stride - 1, bias, seed, stats)
    _, report = fold_and_check(model, x, 1)
    assert only_row(report).into == "deconv"


def gemm_bn(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(5,), seed=0, stats=None):
    b = Builder(seed)
    m, k, n = 3, 6, 5
    w = b.const(b.randn(*((n, k) if trans_b else (k, n))))
    inputs = ["x", w] + ([b.const(b.randn(*c_shape))] if c_shape is not None else [])
    gemm = b.node("Gemm", inputs, name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    x = b.randn(*((k, m) if trans_a else (m, k))).astype(np.float32)
    return b.model(list(x.shape), b.bn(gemm, n, **(stats or {}))), x


@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (3, 5), (3, 1), (), None])
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_bn_with_alpha_beta_and_broadcast_c(trans_a, trans_b, c_shape):
    model, x = gemm_bn(trans_a, trans_b, alpha=0.7, beta=2.5, c_shape=c_shape)
    folded, report = fold_and_check(model, x, 1)
    assert only_row(report).into == "fc"
    gemm = folded.graph.node[0]
    assert next(a.f for a in gemm.attribute if a.name == "beta") == 1.0  # beta went into C


@PROPERTY
@given(
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.25, -3.0]),
    beta=st.sampled_from([1.0, 0.0, 2.5]),
    c_shape=st.sampled_from([(5,), (1, 5), (3, 5), (), None]),
    seed=st.integers(0, 2**16),
    stats=BN_STATS,
)
def test_property_gemm_bn(trans_a, trans_b, alpha, beta, c_shape, seed, stats):
    model, x = gemm_bn(trans_a, trans_b, alpha, beta, c_shape, seed, stats)
    fold_and_check(model, x, 1)


def test_matmul_bias_bn_folds_into_the_bias_add():
    b = Builder(1)
    mm = b.node("MatMul", ["x", b.const(b.randn(6, 5))], name="dense")
    biased = b.node("Add", [mm, b.const(b.randn(5))], name="dense_bias")
    model = b.model(["N", 6], b.bn(biased, 5))
    folded, report = fold_and_check(model, b.randn(4, 6).astype(np.float32), 1)
    assert only_row(report).into == "dense"
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_matmul_without_bias_gets_one_bias_add():
    b = Builder(2)
    mm = b.node("MatMul", ["x", b.const(b.randn(6, 5))])
    model = b.model(["N", 7, 6], b.node("Mul", [mm, b.const(b.randn(5))]))
    folded, report = fold_and_check(model, b.randn(2, 7, 6).astype(np.float32), 1)
    assert only_row(report).op == "Mul/Add"
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]  # a pure scale needs no bias
    b = Builder(2)
    mm = b.node("MatMul", ["x", b.const(b.randn(6, 5))], name="dense")
    model = b.model(["N", 6], b.bn(mm, 5))
    folded, _ = fold_and_check(model, b.randn(3, 6).astype(np.float32), 1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert folded.graph.output[0].name == "bn_out"


def test_keras_conv_mul_add_chain():
    """Keras 3 / tf2onnx: Conv(bias) -> Mul(1,C,1,1) -> Add(1,C,1,1) -> Relu."""
    b = Builder(3)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 3, 3)), b.const(b.randn(4))], pads=[1] * 4)
    mul = b.node("Mul", [conv, b.const(b.randn(1, 4, 1, 1))], name="bn_mul")
    add = b.node("Add", [b.const(b.randn(1, 4, 1, 1)), mul], name="bn_add")  # const first
    model = b.model(["N", 3, 5, 5], b.node("Relu", [add]))
    folded, report = fold_and_check(model, b.randn(2, 3, 5, 5).astype(np.float32), 1)
    row = only_row(report)
    assert (row.bn, row.op, row.direction) == ("bn_mul+bn_add", "Mul/Add", "backward")
    assert foldable_mul_add(folded) == 0 and count_ops(folded, "Conv") == 1


def test_sub_div_chains_fold_and_constant_over_x_does_not():
    """(h - mean) / std after a Conv folds backward; x / 255 after a ReLU folds forward into
    a padded Conv (no shift); 2 / x is no affine map and stays."""
    b = Builder(33)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 3, 3))], pads=[1] * 4)
    sub = b.node("Sub", [conv, b.const(b.randn(1, 4, 1, 1))], name="sub")
    div = b.node("Div", [sub, b.const(np.abs(b.randn(4, 1, 1)) + 0.5)], name="div")
    scaled = b.node("Div", [b.node("Relu", [div]), b.const(255.0)], name="scale")
    conv2 = b.node("Conv", [scaled, b.const(b.randn(2, 4, 3, 3))], name="next", pads=[1] * 4)
    inv = b.node("Div", [b.const(2.0), b.node("Sigmoid", [conv2])], name="inverse")
    model = b.model(["N", 3, 5, 5], inv)
    x = b.randn(2, 3, 5, 5).astype(np.float32)
    folded, report = fold_and_check(model, x, 2)
    assert [(r.bn, r.direction) for r in report.rows] == [("sub+div", "backward"),
                                                          ("scale", "forward")]  # fmt: skip
    assert [n.op_type for n in folded.graph.node].count("Div") == 1  # 2 / x


def test_keras_dense_matmul_add_mul_add():
    """Keras 3 BN after Dense: MatMul -> Add(bias) -> Mul(C,) -> Add(C,)."""
    b = Builder(4)
    mm = b.node("MatMul", ["x", b.const(b.randn(8, 6))], name="dense")
    biased = b.node("Add", [mm, b.const(b.randn(6))], name="dense_bias")
    mul = b.node("Mul", [biased, b.const(b.randn(6))], name="bn_mul")
    add = b.node("Add", [mul, b.const(b.randn(6))], name="bn_add")
    model = b.model(["N", 8], add)
    folded, report = fold_and_check(model, b.randn(5, 8).astype(np.float32), 1)
    assert (only_row(report).bn, only_row(report).into) == ("bn_mul+bn_add", "dense")
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert foldable_mul_add(folded) == 0


@pytest.mark.parametrize("opset", [13, 18])
def test_dynamo_gemm_unsqueeze_bn_squeeze(opset):
    """torch dynamo optimize=False: BatchNorm1d after Linear, Gemm -> Unsqueeze -> BN -> Squeeze."""
    b = Builder(5)
    gemm = b.node("Gemm", ["x", b.const(b.randn(4, 6)), b.const(b.randn(4))], transB=1)
    unsq = b.node("Unsqueeze", [gemm, b.i64([2])])
    sq = b.node("Squeeze", [b.bn(unsq, 4), b.i64([2])])
    model = b.model(["s0", 6], sq, opset=opset)
    folded, _ = fold_and_check(model, b.randn(3, 6).astype(np.float32), 1)
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Unsqueeze", "Squeeze"]


def test_through_reshape_and_transpose():
    b = Builder(6)
    mm = b.node("MatMul", ["x", b.const(b.randn(6, 4))])
    resh = b.node("Reshape", [mm, b.i64([-1, 4, 1])])  # (N, 4, 1): the channel on axis 1
    tr = b.node("Transpose", [resh], perm=[0, 2, 1])  # (N, 1, 4)
    tr2 = b.node("Transpose", [tr], perm=[0, 2, 1])  # back to (N, 4, 1)
    model = b.model([3, 6], b.bn(tr2, 4))
    fold_and_check(model, b.randn(3, 6).astype(np.float32), 1)


def test_conv_weights_from_constant_nodes():
    b = Builder(7)
    w = b.randn(4, 3, 3, 3).astype(np.float32)
    b.nodes.append(h.make_node("Constant", [], ["w"], value=nh.from_array(w)))
    conv = b.node("Conv", ["x", "w"], name="conv")
    model = b.model(["N", 3, 5, 5], b.bn(conv, 4))
    folded, _ = fold_and_check(model, b.randn(1, 3, 5, 5).astype(np.float32), 1)
    assert count_ops(folded, "Constant") == 0


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_every_batchnorm_opset(opset):
    b = Builder(8)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 3, 3))], name="conv")
    extra = {"spatial": 1} if opset < 9 else {}
    model = b.model(["N", 3, 5, 5], b.bn(conv, 4, **extra), opset=opset, ir=7)
    fold_and_check(model, b.randn(2, 3, 5, 5).astype(np.float32), 1)


def test_sequence_of_maps_and_huge_scale_warning():
    """Conv -> BN (var 1e-8, gamma 1e3) -> Mul -> Add: both fold; the scale warns."""
    b = Builder(9)
    conv = b.node("Conv", ["x", b.const(b.randn(3, 2, 1, 1))], name="conv")
    bn = b.bn(conv, 3, eps=1e-8, var_lo=1e-8, gamma=1e3)
    b.inits[-1].CopyFrom(nh.from_array(np.full(3, 1e-8, np.float32), b.inits[-1].name))
    mul = b.node("Mul", [bn, b.const(b.randn(1, 3, 1, 1))])
    model = b.model(["N", 2, 4, 4], b.node("Add", [mul, b.const(b.randn(3, 1, 1))]))
    _, report = fold_and_check(model, b.randn(2, 2, 4, 4).astype(np.float32), 2)
    assert "amplifies float32 rounding" in report.rows[0].warning
    assert report.rows[0].scale_max > 1e3


def test_computed_zero_bias_like_torch_dynamo_is_evaluated_and_its_nodes_dropped():
    """torch dynamo optimize=False, bias-free conv: bias = Expand(CastLike(0, act), Shape(W))."""
    b = Builder(19)
    w = b.const(b.randn(4, 3, 3, 3))
    act = b.node("Relu", ["x"], name="act")
    shape = b.node("Shape", [w], start=0, end=1)  # reads only W's shape: not a sharer
    zero = b.node("CastLike", [b.const(np.zeros(())), act])  # dtype of a data tensor
    bias = b.node("Expand", [zero, shape])
    conv = b.node("Conv", [act, w, bias], name="conv")
    model = b.model(["N", 3, 5, 5], b.bn(conv, 4))
    folded, report = fold_and_check(model, b.randn(2, 3, 5, 5).astype(np.float32), 1)
    assert only_row(report).into == "conv"
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


def test_stats_from_a_data_dependent_subgraph_are_refused():
    b = Builder(20)
    conv = b.node("Conv", ["x", b.const(b.randn(3, 3, 1, 1))], name="conv")
    bn = b.bn(conv, 3)
    model = b.model(["N", 3, 2, 2], bn)
    shift = h.make_node("ReduceMean", ["x"], ["mean_x"], axes=[0, 2, 3], keepdims=0)
    model.graph.node.insert(0, shift)
    old_mean = model.graph.node[-1].input[3]
    model.graph.node[-1].input[3] = "mean_x"  # the BN's mean now depends on the input
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == old_mean))
    reason = refused(model)
    assert reason == "not folded: mean 'mean_x' is computed by ReduceMean 'mean_x', not a constant"


# ---------------------------------------------------------------- forward folds


def relu_bn_then(layer: str, pads=0, auto_pad=None, seed=0):
    b = Builder(seed)
    act = b.node("Relu", ["x"])
    bn = b.bn(act, 4)
    if layer == "Gemm":
        flat = b.node("Flatten", [bn])  # (N, 4*3*3): each channel repeated 9 times
        out = b.node("Gemm", [flat, b.const(b.randn(5, 36)), b.const(b.randn(5))],
                     name="next", transB=1, alpha=0.5, beta=3.0)  # fmt: skip
    elif layer == "MatMul":
        tr = b.node("Transpose", [bn], perm=[0, 2, 3, 1])  # channels last
        out = b.node("MatMul", [tr, b.const(b.randn(4, 5))], name="next")
    else:
        attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": [pads] * 4}
        out = b.node("Conv", [bn, b.const(b.randn(6, 2, 3, 3))], name="next", group=2, **attrs)
    model = b.model(["N", 4, 3, 3], out)
    return model, b.randn(2, 4, 3, 3).astype(np.float32)


@pytest.mark.parametrize("layer", ["Gemm", "MatMul", "Conv"])
def test_bn_after_relu_folds_forward(layer):
    model, x = relu_bn_then(layer)
    folded, report = fold_and_check(model, x, 1)
    row = only_row(report)
    assert (row.direction, row.into) == ("forward", "next")
    assert row.probe == folded.graph.output[0].name


@PROPERTY
@given(
    dim=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    cpg=st.integers(1, 3),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    k=st.integers(1, 3),
    pad=st.integers(0, 1),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    stats=BN_STATS,
)
def test_property_bn_after_relu_into_conv(dim, groups, cpg, stride, dil, k, pad, bias, seed, stats):
    """Folds forward exactly when nothing reads zero padding (k = 1 pads nothing); else refused."""
    b = Builder(seed)
    cin, cout = groups * cpg, 2 * groups
    bn = b.bn(b.node("Relu", ["x"]), cin, **stats)
    w = b.const(b.randn(cout, cpg, *[k] * dim))
    inputs = [bn, w] + ([b.const(b.randn(cout))] if bias else [])
    out = b.node(
        "Conv", inputs, name="next", group=groups, strides=[stride] * dim,
        dilations=[dil] * dim, pads=[pad] * 2 * dim,
    )  # fmt: skip
    size = (k - 1) * dil + 3
    model = b.model(["N", cin, *[size] * dim], out)
    x = b.randn(2, cin, *[size] * dim).astype(np.float32)
    if pad:
        assert only_row(fold_onnx(model)[1]).reason == PADDED_REASON
    else:
        assert only_row(fold_and_check(model, x, 1)[1]).direction == "forward"


def test_a_fold_that_enables_another_is_found():
    """Relu -> Mul -> BN -> Conv: the Mul folds forward once the BN went into the Conv."""
    b = Builder(27)
    mul = b.node("Mul", [b.node("Relu", ["x"]), b.const(b.randn(1, 3, 1, 1))], name="scale")
    conv = b.node("Conv", [b.bn(mul, 3), b.const(b.randn(2, 3, 1, 1))], name="next")
    model = b.model(["N", 3, 4, 4], conv)
    folded, report = fold_and_check(model, b.randn(2, 3, 4, 4).astype(np.float32), 2)
    assert [r.bn for r in report.rows] == ["scale", "bn"]
    assert foldable_mul_add(folded) == 0 and not fold_onnx(folded)[1].rows


def test_bn_after_relu_folds_forward_through_a_keras_nhwc_flatten():
    """Keras Conv -> ReLU -> BN -> Flatten -> Dense: tf2onnx flattens NHWC (Transpose, then a
    Reshape whose target is computed from Shape of the BN's output), so channel c of the dense
    input is every C-th value (tiled, not repeated), and a Shape node reads the BN output."""
    b = Builder(31)
    relu = b.node("Relu", [b.node("Conv", ["x", b.const(b.randn(4, 3, 3, 3))])])  # (N,4,3,3)
    mul = b.node("Mul", [relu, b.const(b.randn(1, 4, 1, 1))], name="bn_mul")
    add = b.node("Add", [mul, b.const(b.randn(1, 4, 1, 1))], name="bn_add")
    nhwc = b.node("Transpose", [add], perm=[0, 2, 3, 1])  # (N, 3, 3, 4)
    batch = b.node("Slice", [b.node("Shape", [add]), b.i64([0]), b.i64([1])])
    target = b.node("Concat", [batch, b.i64([36])], axis=0)
    flat = b.node("Reshape", [nhwc, target])  # (N, 36): index j holds channel j % 4
    out = b.node("MatMul", [flat, b.const(b.randn(36, 5))], name="dense")
    model = b.model(["N", 3, 5, 5], out)
    folded, report = fold_and_check(model, b.randn(3, 3, 5, 5).astype(np.float32), 1)
    assert (only_row(report).direction, only_row(report).into) == ("forward", "dense")
    assert foldable_mul_add(folded) == 0


def _affine_pool_gemm(scale: np.ndarray, pool: str, **attrs):
    """x -> Relu -> Mul(scale) -> Add -> pool -> Flatten -> Gemm: a BN after the activation
    with a pool between it and the dense layer (Keras: ReLU, BN, MaxPooling2D, Flatten)."""
    b = Builder(34)
    mul = b.node("Mul", [b.node("Relu", ["x"]), b.const(scale.reshape(1, 4, 1, 1))], name="s")
    add = b.node("Add", [mul, b.const(b.randn(1, 4, 1, 1))], name="t")
    pooled = b.node(pool, [add], **attrs)
    flat = b.node("Flatten", [pooled])
    n_in = 4 * (1 if pool.startswith("Global") else 9)
    out = b.node("Gemm", [flat, b.const(b.randn(3, n_in)), b.const(b.randn(3))], name="dense",
                 transB=1)  # fmt: skip
    return b.model(["N", 4, 6, 6], out), b.randn(2, 4, 6, 6).astype(np.float32)


@pytest.mark.parametrize(
    "pool, attrs",
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ],
)
def test_bn_after_relu_folds_forward_through_a_pool(pool, attrs):
    """max(s x + t) = s max(x) + t for s >= 0 (MaxPool pads with -inf); mean(s x + t) =
    s mean(x) + t when no zero padding is counted (count_include_pad=0, the default)."""
    model, x = _affine_pool_gemm(np.array([0.5, 2.0, 1.5, 0.0]), pool, **attrs)
    folded, report = fold_and_check(model, x, 1)
    assert (only_row(report).direction, only_row(report).into) == ("forward", "dense")


@pytest.mark.parametrize(
    "pool, attrs, reason",
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, "negative scale"),
        ("GlobalMaxPool", {}, "negative scale"),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                         "count_include_pad": 1}, "feeds AveragePool"),
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1,
                         "count_include_pad": 1}, "feeds AveragePool"),
    ],
)  # fmt: skip
def test_pools_that_do_not_commute_are_refused(pool, attrs, reason):
    model, x = _affine_pool_gemm(np.array([0.5, -2.0, 1.5, 1.0]), pool, **attrs)
    assert reason in refused(model, x)


def test_a_split_channel_axis_is_refused_not_folded():
    """Reshape (N, 36) -> (N, 6, 6) after an NHWC flatten splits the channel period: no fold."""
    b = Builder(32)
    relu = b.node("Relu", ["x"])  # (N, 4, 3, 3)
    bn = b.bn(relu, 4)
    flat = b.node("Reshape", [b.node("Transpose", [bn], perm=[0, 2, 3, 1]), b.i64([0, 6, 6])])
    out = b.node("MatMul", [flat, b.const(b.randn(6, 5))])
    model = b.model(["N", 4, 3, 3], out)
    assert "does not keep the channel axis" in refused(model, b.randn(2, 4, 3, 3).astype("f4"))


@pytest.mark.parametrize("attrs", [{"pads": 1}, {"auto_pad": "SAME_UPPER"}])
def test_forward_into_zero_padded_conv_is_refused(attrs):
    model, x = relu_bn_then("Conv", **attrs)
    folded, report = fold_onnx(model)
    assert only_row(report).reason == PADDED_REASON
    assert count_ops(folded, "BatchNormalization") == 1
    assert_folds_equal(model, folded, x)


def test_pure_scale_folds_forward_even_into_a_padded_conv():
    """A Mul alone (t = 0) commutes with zero padding: s * 0 = 0."""
    b = Builder(10)
    mul = b.node("Mul", [b.node("Relu", ["x"]), b.const(b.randn(1, 4, 1, 1))])
    out = b.node("Conv", [mul, b.const(b.randn(3, 4, 3, 3))], name="next", pads=[1] * 4)
    model = b.model(["N", 4, 5, 5], out)
    _, report = fold_and_check(model, b.randn(2, 4, 5, 5).astype(np.float32), 1)
    assert only_row(report).direction == "forward"


# ---------------------------------------------------------------- refusals


def refused(model, x=None):
    folded, report = fold_onnx(model)
    assert_well_formed(model, folded)
    if x is not None:
        assert_folds_equal(model, folded, x)
    return only_row(report).reason


def test_refuses_bn_params_that_are_graph_inputs():
    b = Builder(11)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))])
    model = b.model(["N", 3, 2, 2], b.bn(conv, 4))
    mean = model.graph.initializer[3]
    model.graph.input.append(h.make_tensor_value_info(mean.name, 1, [4]))
    assert "is a graph input" in refused(model)


def test_refuses_producer_output_with_another_user():
    b = Builder(12)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))], name="conv")
    bn = b.bn(conv, 4)
    model = b.model(["N", 3, 2, 2], b.node("Add", [bn, conv], name="skip"))
    reason = refused(model, b.randn(1, 3, 2, 2).astype(np.float32))
    assert "also read by Add 'skip'" in reason


def test_refuses_producer_output_that_is_a_graph_output():
    b = Builder(13)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))], name="conv")
    model = b.model(["N", 3, 2, 2], b.bn(conv, 4))
    model.graph.output.append(h.make_tensor_value_info(conv, 1, ["N", 4, 2, 2]))
    assert "a graph output" in refused(model)


def test_refuses_weights_shared_by_two_layers():
    b = Builder(14)
    w = b.const(b.randn(3, 3, 1, 1))
    c1 = b.node("Conv", ["x", w], name="conv_a")
    c2 = b.node("Conv", [b.bn(c1, 3), w], name="conv_b")
    reason = refused(b.model(["N", 3, 2, 2], c2), b.randn(1, 3, 2, 2).astype(np.float32))
    assert "Conv 'conv_a' shares its parameter" in reason and "Conv 'conv_b'" in reason


@pytest.mark.parametrize("source", ["Concat", "Add", "input"])
def test_refuses_bn_without_foldable_neighbour(source):
    b = Builder(15)
    if source == "input":
        x = "x"
    else:
        attrs = {"axis": 1} if source == "Concat" else {}
        x = b.node(source, ["x", "x"], name="src", **attrs)
    c = 6 if source == "Concat" else 3
    model = b.model(["N", 3, 2, 2], b.node("Relu", [b.bn(x, c)], name="act"))
    reason = refused(model, b.randn(1, 3, 2, 2).astype(np.float32))
    where = "the graph input 'x'" if source == "input" else f"{source} 'src'"
    assert reason == (
        f"not folded: input comes from {where}, not a Conv/ConvTranspose/Gemm/MatMul; its "
        "output feeds Relu 'act', not one Conv/Gemm/MatMul it can fold into"
    )


def test_refuses_training_mode_and_spatial_zero():
    b = Builder(16)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))])
    model = b.model(["N", 3, 2, 2], b.bn(conv, 4, training_mode=1), opset=15)
    model.graph.node[-1].output.extend(["running_mean", "running_var"])
    model.graph.output[0].CopyFrom(h.make_tensor_value_info("bn_out", 1, ["N", 4, 2, 2]))
    assert refused(model) == "not folded: training_mode=1 (normalizes with batch statistics)"


def test_refuses_spatial_zero_and_used_statistics_outputs():
    b = Builder(21)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))])
    model = b.model(["N", 3, 2, 2], b.bn(conv, 4, spatial=0), opset=7, ir=7)
    assert refused(model) == "not folded: spatial=0 (per-activation statistics), not per channel"
    b = Builder(22)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))])
    bn = b.bn(conv, 4)
    b.nodes[-1].output.extend(["run_mean", "run_var", "saved_mean", "saved_var"])
    model = b.model(["N", 3, 2, 2], bn, opset=9, ir=7)
    model.graph.output.append(h.make_tensor_value_info("run_mean", 1, [4]))
    assert refused(model) == "not folded: its statistics output 'run_mean' is used"


def test_refuses_a_producer_read_inside_a_subgraph():
    """An If branch reading the conv output from the outer scope is another user."""
    b = Builder(23)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))], name="conv")
    bn = b.bn(conv, 4)
    branch = h.make_graph(
        [h.make_node("Identity", [conv], ["branch_out"])], "branch", [],
        [h.make_tensor_value_info("branch_out", 1, ["N", 4, 2, 2])],
    )  # fmt: skip
    flag = b.const(np.array(True), name="flag")
    b.inits[-1].CopyFrom(nh.from_array(np.array(True), "flag"))
    b.nodes.append(h.make_node("If", [flag], ["picked"], name="if", then_branch=branch,
                               else_branch=branch))  # fmt: skip
    model = b.model(["N", 3, 2, 2], bn)
    model.graph.output.append(h.make_tensor_value_info("picked", 1, ["N", 4, 2, 2]))
    assert "also read by If 'if'" in refused(model)


def test_refuses_non_finite_statistics_and_constant_left_matmul():
    b = Builder(24)
    conv = b.node("Conv", ["x", b.const(b.randn(2, 3, 1, 1))])
    model = b.model(["N", 3, 2, 2], b.bn(conv, 2))
    var = model.graph.initializer[-1]
    var.CopyFrom(nh.from_array(np.array([1.0, -1.0], np.float32), var.name))
    assert refused(model) == "not folded: non-finite scale or shift"
    b = Builder(25)
    mm = b.node("MatMul", [b.const(b.randn(5, 3)), "x"], name="left")  # weight on the left
    reason = refused(b.model([3, 4], b.node("Relu", [b.bn(mm, 4)])))
    assert reason == (
        "not folded: weight of MatMul 'left': 'x' is a graph input (overridable at run time), "
        "not a constant"
    )


def test_refuses_dtypes_other_than_float():
    b = Builder(17, dtype=np.float64)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 1, 1))])
    model = b.model(["N", 3, 2, 2], b.bn(conv, 4))
    for init in model.graph.initializer[1:]:  # BN params as bfloat16
        arr = nh.to_array(init)
        init.CopyFrom(h.make_tensor(init.name, onnx.TensorProto.BFLOAT16, arr.shape, arr.tolist()))
    model.opset_import[0].version = 15  # scale/B/mean/var may differ from X since opset 15
    assert "dtype bfloat16" in refused(model)


def test_float16_folds_in_float64_rounded_once():
    b = Builder(18, dtype=np.float16)
    conv = b.node("Conv", ["x", b.const(b.randn(4, 3, 3, 3))], name="conv")
    model = b.model(["N", 3, 5, 5], b.bn(conv, 4, var_lo=0.5))
    x = b.randn(2, 3, 5, 5).astype(np.float16)
    folded, report = fold_onnx(model)
    assert only_row(report).folded and folded.graph.initializer[0].data_type == 10
    exact = run64(model, x)
    # float16: u = 2^-11; 27 terms per output, weights rounded once: the same 2*(K+8)*u*M
    # bound with M <= 4 * max|exact| for these sizes is loose; compare the errors instead.
    err_folded = np.abs(run(folded, x) - exact).max()
    err_unfolded = np.abs(run(model, x) - exact).max()
    assert err_folded <= 2 * err_unfolded + 2**-11 * np.abs(exact).max()


# ---------------------------------------------------------------- files


def test_fold_onnx_file_with_external_data(tmp_path):
    model, x = conv_bn()
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(
        onnx.ModelProto.FromString(model.SerializeToString()),
        src,
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )  # fmt: skip (save_model moves the data out of its argument)
    dst = tmp_path / "out" / "folded.onnx"
    report = fold_onnx_file(src, dst)
    assert len(report.folded) == 1 and sorted(p.name for p in dst.parent.iterdir()) == [
        "folded.onnx"
    ]
    folded = onnx.load(dst)
    assert_folds_equal(model, folded, x)
    (src.parent / "model.onnx.data").unlink()
    with pytest.raises(FoldError, match="which is missing next to the model"):
        fold_onnx_file(src, tmp_path / "out" / "again.onnx")
    assert not (tmp_path / "out" / "again.onnx").exists()


def test_fold_onnx_file_refuses_non_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf \xff\xfe")
    with pytest.raises(FoldError, match="not a readable ONNX model"):
        fold_onnx_file(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_fold_onnx_file_refuses_models_over_the_protobuf_limit(tmp_path, monkeypatch):
    """The limit is protobuf's 2 GB; lowered here so a small file stands in for a huge one."""
    import bnfold.toolchain.load

    model, _ = conv_bn()
    src = tmp_path / "model.onnx"
    onnx.save_model(model, src)
    monkeypatch.setattr(bnfold.toolchain.load, "MAX_PROTO_BYTES", 100)
    with pytest.raises(FoldError, match="over protobuf's 2 GiB limit"):
        fold_onnx_file(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_report_summary_names_the_pattern():
    b = Builder(26)
    conv = b.node("Conv", ["x", b.const(b.randn(2, 3, 1, 1))], name="conv")
    mul = b.node("Mul", [conv, b.const(b.randn(1, 2, 1, 1))], name="scale")
    _, report = fold_onnx(b.model(["N", 3, 2, 2], mul))
    assert report.summary().startswith("scale (Mul/Add): folded backward into conv  |s| in [")
