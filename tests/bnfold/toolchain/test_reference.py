"""bnfold.toolchain.reference: a float64 evaluation of ONNX graphs, checked against numpy
float64 written out by hand (the independent reference), and shown to really compute in float64;
its failures name the node. Its kernels: test_reference_kernels.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.toolchain.reference import (
    Float64Reference,
    ReferenceUnavailable,
    evaluate_float64,
    float64_model,
)

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def gemm_bn_model(n_in: int = 6, n_out: int = 4):
    """x (N, 6) -> Gemm -> BatchNormalization -> Relu, float32 weights; and the weights."""
    w = RNG.normal(size=(n_out, n_in)).astype(np.float32)
    b = RNG.normal(size=n_out).astype(np.float32)
    gamma, beta = RNG.uniform(0.5, 2, n_out), RNG.normal(size=n_out)
    mean, var = RNG.normal(size=n_out), RNG.uniform(0.1, 3, n_out)
    params = {"w": w, "b": b, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
        helper.make_node(
            "BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["n"], epsilon=1e-3
        ),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    return _model(nodes, [_f32("x", ["N", n_in])], [_f32("y", ["N", n_out])], inits), params


def test_gemm_bn_relu_matches_numpy_float64():
    model, p = gemm_bn_model()
    x = RNG.normal(size=(5, 6)).astype(np.float32)
    got = evaluate_float64(model, "x", x)
    # The same function written out in numpy float64, from the float32 weights as stored.
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    h = x.astype(np.float64) @ p64["w"].T + p64["b"]
    n = (h - p64["mean"]) / np.sqrt(p64["var"] + np.float64(np.float32(1e-3))) * p64["gamma"]
    want = np.maximum(n + p64["beta"], 0)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)  # float64 rounding only


def test_float32_run_differs_where_float64_does_not():
    """onnxruntime in float32 is off the float64 function by float32 rounding; the reference's
    values are not float32 numbers at all: it did not silently run in float32."""
    model, _ = gemm_bn_model(n_in=64)
    x = RNG.normal(size=(64, 64)).astype(np.float32)
    ref = evaluate_float64(model, "x", x)
    positive = ref[ref > 0]
    assert np.mean(positive != positive.astype(np.float32)) > 0.9
    f32 = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(f32 - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())  # float32 rounding
    repeat = Float64Reference(model).run({"x": x})[0]
    np.testing.assert_array_equal(repeat, ref)


def test_constants_casts_and_value_floats_become_float64():
    """Constant(value_float), Constant(value tensor), ConstantOfShape and Cast(to=FLOAT):
    each would round to float32; in the copy each keeps float64."""
    nodes = [
        helper.make_node("Constant", [], ["c1"], value_float=0.1),
        helper.make_node("Constant", [], ["c2"], value_floats=[0.3, 0.7, 1.9]),
        helper.make_node(
            "Constant", [], ["c3"], value=numpy_helper.from_array(np.float32([1 / 3] * 3))
        ),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["c4"], value=numpy_helper.from_array(np.float32([0.2]))
        ),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "c1"], ["a"]),
        helper.make_node("Mul", ["a", "c2"], ["b"]),
        helper.make_node("Div", ["b", "c3"], ["c"]),
        helper.make_node("Add", ["c", "c4"], ["d"]),
        helper.make_node("Add", ["d", "kf"], ["y"]),
    ]
    k = numpy_helper.from_array(np.int64([1, 2, 3]), "k")
    model = _model(nodes, [_f32("x", [2, 3])], [_f32("y", [2, 3])], [k])
    x = np.float32([[1.1, 2.2, 3.3], [4.4, 5.5, 6.6]])
    got = evaluate_float64(model, "x", x)
    f = lambda v: np.float64(np.float32(v))  # noqa: E731 - constants as stored (float32)
    c2 = np.array([f(0.3), f(0.7), f(1.9)])
    want = x.astype(np.float64) * f(0.1) * c2 / f(1 / 3) + f(0.2) + np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(got, want, rtol=1e-14)
    f32 = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(f32 - want).max() > 1e3 * np.abs(got - want).max()


def test_float16_initializers_and_the_original_is_untouched():
    w16 = RNG.normal(size=(3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x16", "w"], ["y"]),
    ]
    model = _model(
        nodes,
        [_f32("x", [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3])],
        [numpy_helper.from_array(w16, "w")],
    )
    before = model.SerializeToString()
    copy = float64_model(model)
    assert model.SerializeToString() == before
    assert copy.graph.initializer[0].data_type == TensorProto.DOUBLE
    x = np.float32([[0.5, -1.25, 2.0]])
    got = evaluate_float64(model, "x", x)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w16.astype(np.float64), rtol=1e-14)


def test_batches_are_evaluated_in_chunks_with_the_same_result():
    model, _ = gemm_bn_model()
    x = RNG.normal(size=(70, 6)).astype(np.float32)
    np.testing.assert_array_equal(
        evaluate_float64(model, "x", x, batch=7), evaluate_float64(model, "x", x, batch=100)
    )


def test_grouped_conv_transpose_matches_onnxruntime():
    """onnx.reference's own grouped ConvTranspose fails (onnx 1.23); ours runs group by group."""

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)  # (Cin, Cout/groups, kH, kW)
    b = rng.standard_normal(12).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], group=2, strides=[2, 2],
                            output_padding=[1, 1])  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8, 5, 5)).astype(np.float32)
    y32 = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    y64 = evaluate_float64(model, "x", x)
    assert y64.shape == y32.shape == (3, 12, 12, 12)
    # Each output sums at most 8/2 x 3 x 3 = 36 products of O(1) values plus a bias: float32
    # rounding stays below 64 x 2^-24 x sum|w x| (~1e-4 here); a wrong group would be O(1).
    np.testing.assert_allclose(y32, y64, rtol=0, atol=1e-4)


def test_an_op_without_a_kernel_is_reference_unavailable_naming_it():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="act"),
        helper.make_node("FancyNorm", ["r"], ["y"], name="norm7", domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "g", [_f32("x", [1, 3])], [_f32("y", [1, 3])])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(ReferenceUnavailable) as info:
        evaluate_float64(model, "x", np.ones((1, 3), np.float32))
    assert (info.value.op_type, info.value.node_name) == ("FancyNorm", "norm7")
    assert "FancyNorm" in str(info.value) and info.value.reason
    assert info.value.not_measured().startswith(
        "float64 reference not measured: FancyNorm (node 'norm7') "
    )


def test_a_kernel_that_raises_is_reference_unavailable_naming_the_node():
    """A numpy error inside a kernel (here a Reshape the input cannot take) comes out as the
    node's op type and name with the reason, the original exception chained."""
    shape = numpy_helper.from_array(np.int64([4, -1]), "shape")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="to_rows"),
    ]
    model = _model(nodes, [_f32("x", ["N", 3])], [_f32("y", [4, None])], [shape])
    ref = Float64Reference(model)
    np.testing.assert_array_equal(ref.run({"x": np.ones((4, 3), np.float32)})[0], np.ones((4, 3)))
    with pytest.raises(ReferenceUnavailable) as info:
        ref.run({"x": np.ones((3, 3), np.float32)})
    err = info.value
    assert (err.op_type, err.node_name) == ("Reshape", "to_rows")
    assert "ValueError" in err.reason and isinstance(err.__cause__, ValueError)
    assert str(err).startswith("Reshape (node 'to_rows'): ValueError")


def test_in_place_kernels_never_write_over_a_value_still_read():
    """BatchNormalization, Relu and Add write into an input that dies at them: not when a
    Reshape's view or an Identity still holds it, not into a Constant's stored tensor, not
    into the caller's feed; an intermediate asked for as an output is kept as computed."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    stats = [rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.int64([2, 4, 5, 5]), "same"),
    ]
    inits += [
        numpy_helper.from_array(v.astype(np.float32), k)
        for k, v in zip(["g", "b", "m", "v"], stats, strict=True)
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Identity", ["r"], ["r1"]),
        helper.make_node("Reshape", ["r", "same"], ["r2"]),  # a view of r's memory
        helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Add", ["n", "r2"], ["s0"]),
        helper.make_node("Add", ["s0", "r1"], ["s"]),
        helper.make_node(
            "Constant", [], ["k"], value=numpy_helper.from_array(np.float32([[[[-1.0]]]]))
        ),
        helper.make_node("Relu", ["k"], ["kr"]),
        helper.make_node("Add", ["s", "kr"], ["y"]),
    ]
    model = _model(nodes, [_f32("x", [2, 2, 5, 5])], [_f32("y", [2, 4, 5, 5])], inits)
    x = rng.standard_normal((2, 2, 5, 5))
    x_before = x.copy()
    want = ReferenceEvaluator(float64_model(model)).run(None, {"x": x})[0]
    ref = Float64Reference(model)
    first = ref.run({"x": x})[0]
    np.testing.assert_allclose(first, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(ref.run({"x": x})[0], first)  # the Constant is intact
    np.testing.assert_array_equal(x, x_before)
    c, y = ref.run({"x": x}, ["c", "y"])
    np.testing.assert_array_equal(y, first)
    c_want = ReferenceEvaluator(float64_model(model)).run(["c"], {"x": x})[0]
    np.testing.assert_allclose(c, c_want, rtol=1e-13, atol=1e-13)


def test_feed_independent_nodes_are_reused_for_feeds_of_the_same_shapes():
    """Nodes whose outputs depend on the feeds' shapes alone (weight arithmetic, Shape and
    what is computed from it) run once per feed shape: a second batch of the same shape takes
    them from the first, a batch of another shape computes them again; every result is
    onnx.reference's, and a kernel that writes in place never writes over a kept one."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((2, 2)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((2, 2)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.int64([2, 2]), "tail"),
        numpy_helper.from_array(np.int64([0]), "zero"),
    ]
    nodes = [
        helper.make_node("Add", ["w1", "w2"], ["wsum"]),  # new memory, dies at the Relu
        helper.make_node("Relu", ["wsum"], ["wr"]),  # in place when it may: not here
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["batch"]),
        helper.make_node("Concat", ["batch", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["x3"]),
        helper.make_node("Mul", ["x3", "wr"], ["y"]),
    ]
    model = _model(nodes, [_f32("x", ["n", 4])], [_f32("y", ["n", 2, 2])], inits)
    ref = Float64Reference(model)
    calls = {"Add": 0, "Concat": 0}
    for node in ref.evaluator.rt_nodes_:
        op = node.onnx_node.op_type
        if op in calls:
            run = node.run

            def counted(*args, _run=run, _op=op, **kw):
                calls[_op] += 1
                return _run(*args, **kw)

            node.run = counted
    want = ReferenceEvaluator(float64_model(model))
    seen = []
    for n in (3, 3, 5, 3):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        got = ref.run({"x": x})[0]
        np.testing.assert_allclose(got, want.run(None, {"x": x.astype(np.float64)})[0], rtol=1e-15)
        seen.append(dict(calls))
    assert seen == [{"Add": 1, "Concat": 1}, {"Add": 1, "Concat": 1},
                    {"Add": 2, "Concat": 2}, {"Add": 3, "Concat": 3}]  # fmt: skip


def test_reused_heap_hands_memory_back():
    """Inside reused_heap large arrays come from malloc's heap and stay there when freed; on
    leaving, that memory goes back to the system: the resident size returns to within a few
    MiB of where it was, not 400 MB above it."""
    import resource  # noqa: F401 - Linux only, as the rest of the suite

    from bnfold.toolchain.reference import reused_heap

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    before = rss_mib()
    with reused_heap():
        for _ in range(4):
            a = np.ones(50 * 2**20 // 8)  # 50 MiB, freed and reused each time
            b = np.ones(50 * 2**20 // 8)
            del a, b
        inside = rss_mib()
    after = rss_mib()
    assert inside > before + 90  # the freed blocks stayed with the process...
    assert after < before + 20  # ...until the end
