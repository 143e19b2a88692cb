"""A float64 evaluation of any ONNX graph: the reference both variants are measured against.

`onnx.reference.ReferenceEvaluator` (numpy kernels) runs a copy of the graph in which every
float tensor is float64: initializers, Constant nodes, ConstantOfShape values, Cast targets and
the graph's inputs and outputs. The rest of the graph (shape arithmetic in int64, ...) is kept
as it is. Numpy's float64 kernels round about 2^29 times finer than float32, so the result is
the exact function of the weights as stored, to well below any float32 difference we measure.

The hot ops have kernels of our own (float64 BLAS for Conv, whole-tensor numpy for pools and
activations, in place where an input dies), their images split over the usable cores with BLAS
on one thread each: every published CNN family at 224x224 runs within a few times
onnxruntime's float32 time, not minutes. Pools are sized as onnxruntime and PyTorch size them
(ceil_mode). Float64Reference runs the nodes itself, dropping each intermediate after its last
use, computing the nodes that depend on the feeds' shapes alone once per shape, and any node it
cannot evaluate raises ReferenceUnavailable naming the node: never the user's error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
from collections import ChainMap
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_add import Add as _RefAdd
from onnx.reference.ops.op_average_pool import AveragePool_19 as _RefAveragePool
from onnx.reference.ops.op_batch_normalization import (
    _batchnorm_test_mode,
    _batchnorm_training_mode,
)
from onnx.reference.ops.op_conv import Conv as _RefConv
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose
from onnx.reference.ops.op_erf import Erf as _RefErf
from onnx.reference.ops.op_matmul import MatMul as _RefMatMul
from onnx.reference.ops.op_max_pool import MaxPool as _RefMaxPool
from scipy.special import erf
from threadpoolctl import threadpool_limits

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


def _cast_graph(graph: onnx.GraphProto, initializers: bool = True) -> None:
    if initializers:
        for i, t in enumerate(graph.initializer):
            graph.initializer[i].CopyFrom(_tensor64(t))
    for vi in (*graph.input, *graph.output):
        _cast_value_info(vi)
    del graph.value_info[:]  # intermediate float32 annotations would contradict the copy
    for node in graph.node:
        _cast_node(node)


def float64_model(model: onnx.ModelProto, initializers: bool = True) -> onnx.ModelProto:
    """A copy of `model` computing in float64 (external data must already be loaded);
    `initializers=False` leaves the main graph's initializers as they are, for a caller that
    casts them as arrays (`reference_evaluator`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _cast_graph(out.graph, initializers)
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
    scratch = False  # set by Float64Reference.run when x dies here and may be overwritten

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, **attrs):
        n_out = sum(1 for o in self.onnx_node.output if o)
        training = bool(attrs.get("training_mode")) or attrs.get("is_test") == 0 or n_out > 1
        eps = 1e-5 if epsilon is None else epsilon
        if not training:
            if x.dtype != np.float64 or x.ndim < 2:
                return (_batchnorm_test_mode(x, scale, bias, mean, var, epsilon=eps),)
            shape = (-1,) + (1,) * (x.ndim - 2)  # (x - mean) * scale / sqrt(var + eps) + bias
            mean, k = mean.reshape(shape), (scale / np.sqrt(var + eps)).reshape(shape)
            bias = bias.reshape(shape)
            y = x if self.scratch else np.empty_like(x)

            def image(i: int) -> None:  # three passes over x, not six; images over the cores
                np.subtract(x[i], mean, out=y[i])
                y[i] *= k
                y[i] += bias

            _over_cores(image, len(x), x.size)
            return (y,)
        m = 0.9 if momentum is None else momentum
        y, saved_mean, saved_var, run_mean, run_var = _batchnorm_training_mode(
            x, scale, bias, mean, var, momentum=m, epsilon=eps
        )
        if "training_mode" in attrs:  # opset 14+: (Y, running_mean, running_var)
            return (y, run_mean, run_var)[:n_out]
        return (y, run_mean, run_var, saved_mean, saved_var)[:n_out]  # opsets 7-13


InferenceBatchNormalization.__name__ = "BatchNormalization"  # replaces the built-in kernel


# ---------------------------------------------------------------------------------------------
# Fast float64 kernels. onnx.reference's numpy Conv gathers its im2col with fancy indexing and
# its pools loop in Python: a 224x224 ResNet-50 took minutes. These compute the same functions
# with float64 BLAS (Conv) and whole-tensor numpy over the kernel offsets (pools, depthwise).


_POOL: list[ThreadPoolExecutor] = []  # one per process, made on first use


PARALLEL_WORK = 2**18  # values (or multiply-adds): below this a hand-off costs more than it saves
DEPTHWISE_BLOCK = 2**18  # output values a depthwise piece of work gathers from several images


def _over_cores(work: Callable[[int], None], parts: int, size: int) -> None:
    """work(0) ... work(parts - 1), `size` values of work in all, split over the usable cores
    (numpy releases the GIL in its loops): the reference's kernels would otherwise use one core
    of several. One pool serves every kernel; a `work` must not call _over_cores itself."""
    cores = min(len(os.sched_getaffinity(0)), parts)
    if cores <= 1 or size < PARALLEL_WORK:
        for i in range(parts):
            work(i)
        return
    if not _POOL or _POOL[0]._max_workers < cores:
        _POOL[:] = [ThreadPoolExecutor(len(os.sched_getaffinity(0)), "bnfold-reference")]
    list(_POOL[0].map(work, range(parts)))


def _attr_str(value) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    return value or "NOTSET"


def _spatial_pads(auto_pad, sizes, kernel, strides, dilations, pads) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis, with auto_pad resolved as the spec says."""
    nd = len(kernel)
    mode = _attr_str(auto_pad)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            b = total // 2 if mode == "SAME_UPPER" else total - total // 2
            begin.append(b)
            end.append(total - b)
        return begin, end
    if mode == "VALID" or not pads:
        return [0] * nd, [0] * nd
    if mode != "NOTSET":
        raise ValueError(f"unknown auto_pad {mode!r}")
    return [int(p) for p in pads[:nd]], [int(p) for p in pads[nd:]]


def _in_parts(work: Callable[[int, int], None], length: int, most: int, size: int) -> None:
    """work(lo, hi) over `length` rows cut into equal parts, at most `most` of them and one per
    usable core, run over the cores (`size`: the values of work in all, as for _over_cores)."""
    parts = max(1, min(len(os.sched_getaffinity(0)), most))
    bounds = np.linspace(0, length, parts + 1).astype(int)
    _over_cores(lambda i: work(bounds[i], bounds[i + 1]), parts, size)


def _window(offsets, strides, dilations, out_sizes) -> tuple[slice, ...]:
    """The spatial slices that kernel tap `offsets` multiplies, one entry per output."""
    return tuple(
        slice(o * d, o * d + (n - 1) * s + 1, s)
        for o, s, d, n in zip(offsets, strides, dilations, out_sizes, strict=True)
    )


def _tap(xp: np.ndarray, offsets, strides, dilations, out_sizes) -> np.ndarray:
    """The view of padded `xp` (N, C, *spatial) that kernel tap `offsets` multiplies."""
    return xp[(slice(None), slice(None), *_window(offsets, strides, dilations, out_sizes))]


def _pad(x: np.ndarray, begin, end, value: float, channels_last: bool = False) -> np.ndarray:
    """x (N, C, *spatial) padded on its spatial axes with `value`; or, channels_last, the
    padded (N, *spatial, C) copy in the same single pass (np.pad makes several)."""
    if not any(begin) and not any(end) and not channels_last:
        return x
    sizes = x.shape[2:]
    padded = [n + b_ + e for n, b_, e in zip(sizes, begin, end, strict=True)]
    inner = tuple(slice(b_, b_ + n) for b_, n in zip(begin, sizes, strict=True))
    if channels_last:
        out = np.full((x.shape[0], *padded, x.shape[1]), value, dtype=x.dtype)
        out[(slice(None), *inner)] = np.moveaxis(x, 1, -1)
    else:
        out = np.full((*x.shape[:2], *padded), value, dtype=x.dtype)
        out[(slice(None), slice(None), *inner)] = x
    return out


def conv_float64(x, w, b=None, *, auto_pad=None, dilations=None, group=None,
                 kernel_shape=None, pads=None, strides=None) -> np.ndarray:  # fmt: skip
    """ONNX Conv, any number of spatial axes: im2col + matmul per group (BLAS), a 1x1 kernel
    as a plain matmul, a depthwise kernel as a sum over its taps; one image at a time (padded
    there, in cache), the images split over the usable cores with BLAS on one thread each."""
    nd = x.ndim - 2
    kernel = [int(k) for k in (kernel_shape or w.shape[2:])]
    strides = [int(s) for s in (strides or [1] * nd)]
    dilations = [int(d) for d in (dilations or [1] * nd)]
    groups = int(group or 1)
    n, c = x.shape[:2]
    m = w.shape[0]
    cg, mg = c // groups, m // groups
    if cg * groups != c or mg * groups != m or w.shape[1] != cg:
        raise ValueError(f"Conv: input {x.shape}, weight {w.shape} and group={groups} disagree")
    begin, end = _spatial_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    padded = [n_ + b_ + e for n_, b_, e in zip(x.shape[2:], begin, end, strict=True)]
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    out_sizes = [(p - e) // s + 1 for p, e, s in zip(padded, eff, strides, strict=True)]
    if min(out_sizes) <= 0:
        raise ValueError(f"Conv: kernel {kernel} larger than the padded input {padded}")
    p = int(np.prod(out_sizes))
    taps = int(np.prod(kernel))
    y = np.empty((n, m, *out_sizes), dtype=np.float64)
    bias = None if b is None else b.reshape((m,) + (1,) * nd)
    block = 1  # images per piece of work
    if cg == 1 and groups > 1:  # depthwise (times a channel multiplier)
        xr = np.repeat(x, mg, axis=1) if mg > 1 else x
        images = _depthwise(xr, w.reshape(m, taps), kernel, strides, dilations, begin, end, y)
        cores = len(os.sched_getaffinity(0))  # small maps: fewer, larger numpy calls
        block = max(1, min(-(-n // cores), DEPTHWISE_BLOCK // (m * p)))
    else:
        wg = w.reshape(groups, mg, cg * taps)
        axes = tuple(range(2, 2 + nd))
        sl = (slice(None), slice(None), *(slice(None, None, s) for s in strides),
              *(slice(None, None, d) for d in dilations))  # fmt: skip
        perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))

        def images(lo: int, hi: int) -> None:  # per image, one BLAS call per group
            for i in range(lo, hi):
                xi = _pad(x[i : i + 1], begin, end, 0.0)
                if taps == 1:  # 1x1: the input's own (strided) pixels are the columns
                    cols = _tap(xi, [0] * nd, strides, dilations, out_sizes)
                else:
                    win = sliding_window_view(xi, eff, axis=axes)[sl]  # (1, c, *out, *kernel)
                    cols = win.transpose(perm)  # (1, c, *kernel, *out)
                cols = np.ascontiguousarray(cols).reshape(groups, cg * taps, p)
                np.matmul(wg, cols, out=y[i].reshape(groups, mg, p))

    def piece(j: int) -> None:
        lo, hi = j * block, min(n, (j + 1) * block)
        images(lo, hi)
        if bias is not None:
            y[lo:hi] += bias

    _over_cores(piece, -(-n // block), y.size * cg * taps)
    return y


def _depthwise(x, wk, kernel, strides, dilations, begin, end, y) -> Callable[[int, int], None]:
    """The work for images lo..hi-1 of a depthwise conv into y[lo:hi]: a sum over its taps, a
    few images at a time so that the running sum and the product stay in cache (a whole-batch
    sum reads and writes memory at every tap). Each tap is one numpy loop whose innermost run
    is the longer of an output row and the channels: channels-last when there are more
    channels than output columns (a 7x7 map of 1152 channels would be 7-element runs)."""
    m, out_sizes = y.shape[1], y.shape[2:]
    offsets = list(np.ndindex(*kernel))
    channels_last = m > out_sizes[-1]
    if channels_last:
        w_taps = list(np.ascontiguousarray(wk.T))  # (m,) per tap
    else:
        w_taps = [wk[:, t].reshape((m,) + (1,) * len(kernel)) for t in range(wk.shape[1])]

    def images(lo: int, hi: int) -> None:
        xs = _pad(x[lo:hi], begin, end, 0.0, channels_last)
        shape = (hi - lo, *out_sizes, m) if channels_last else (hi - lo, m, *out_sizes)
        acc, tmp = np.empty(shape), np.empty(shape)
        for t, (w_t, o) in enumerate(zip(w_taps, offsets, strict=True)):
            window = _window(o, strides, dilations, out_sizes)
            view = (
                xs[(slice(None), *window)]
                if channels_last
                else xs[(slice(None), slice(None), *window)]
            )
            np.multiply(view, w_t, out=acc if t == 0 else tmp)
            if t:
                acc += tmp
        y[lo:hi] = np.moveaxis(acc, -1, 1) if channels_last else acc

    return images


def pool_float64(x, mode: str, *, kernel_shape, auto_pad=None, ceil_mode=None, dilations=None,
                 pads=None, strides=None, count_include_pad=None) -> np.ndarray:  # fmt: skip
    """ONNX MaxPool ("MAX") / AveragePool ("AVG") as onnxruntime and PyTorch size them: with
    ceil_mode the last window must start inside the input or its left padding; an average
    divides by the taps inside the input (count_include_pad=0) or inside input and explicit
    padding (1), never by the taps ceil_mode adds past the padding."""
    nd = x.ndim - 2
    kernel = [int(k) for k in kernel_shape]
    strides = [int(s) for s in (strides or [1] * nd)]
    dilations = [int(d) for d in (dilations or [1] * nd)]
    sizes = x.shape[2:]
    begin, end = _spatial_pads(auto_pad, sizes, kernel, strides, dilations, pads)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    out_sizes = []
    for size, b, e, k, s in zip(sizes, begin, end, eff, strides, strict=True):
        if _attr_str(auto_pad) in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // s)
        elif ceil_mode:
            out = -(-(size + b + e - k) // s) + 1
            if (out - 1) * s >= size + b:  # the last window would start in the right padding
                out -= 1
        else:
            out = (size + b + e - k) // s + 1
        out_sizes.append(out)
    if min(out_sizes) <= 0:
        raise ValueError(f"pool: kernel {kernel} larger than the padded input {sizes}")
    spans = zip(out_sizes, strides, eff, sizes, begin, end, strict=True)
    extra = [max(0, (o - 1) * s + k - (n + b + e)) for o, s, k, n, b, e in spans]
    tail = [e + x_ for e, x_ in zip(end, extra, strict=True)]
    taps = list(np.ndindex(*kernel))
    y = np.empty((*x.shape[:2], *out_sizes), dtype=x.dtype)
    if mode == "MAX":
        fill, combine, count = -np.inf, np.maximum, None
    else:
        fill, combine = 0.0, np.add
        ones = np.ones((1, 1, *sizes))
        if count_include_pad:  # padded region counts, the ceil_mode tail does not
            mask = _pad(_pad(ones, begin, end, 1.0), [0] * nd, extra, 0.0)
        else:
            mask = _pad(ones, begin, tail, 0.0)
        count = sum(_tap(mask, o, strides, dilations, out_sizes) for o in taps)[0]

    def image(i: int) -> None:  # over the taps, one image at a time (in cache)
        xp = _pad(x[i : i + 1], begin, tail, fill)
        yi = y[i]
        yi[...] = _tap(xp, taps[0], strides, dilations, out_sizes)[0]
        for offsets in taps[1:]:
            combine(yi, _tap(xp, offsets, strides, dilations, out_sizes)[0], out=yi)
        if count is not None:
            yi /= count

    _over_cores(image, len(x), y.size * len(taps))
    return y


class FastConv(_RefConv):
    """Conv in float64 BLAS (see conv_float64); other dtypes go to onnx.reference's kernel."""

    op_domain = ""

    def _run(self, X, W, B=None, **attrs):  # noqa: N803 - onnx's argument names
        if X.dtype != np.float64 or W.dtype != np.float64 or X.ndim < 3:
            return super()._run(X, W, B, **attrs)
        return (conv_float64(X, W, B, **attrs),)


FastConv.__name__ = "Conv"


class FastMaxPool(_RefMaxPool):
    """MaxPool in float64, sized as onnxruntime and PyTorch do (see pool_float64); the Indices
    output and other dtypes go to onnx.reference's kernel."""

    op_domain = ""

    def _run(self, x, storage_order=None, **attrs):
        n_out = sum(1 for o in self.onnx_node.output if o)
        if n_out > 1 or x.dtype != np.float64:
            return super()._run(x, storage_order=storage_order, **attrs)
        return (pool_float64(x, "MAX", **attrs),)


FastMaxPool.__name__ = "MaxPool"


class FastAveragePool(_RefAveragePool):
    """AveragePool in float64, every opset (see pool_float64)."""

    op_domain = ""

    def _run(self, x, **attrs):
        if x.dtype != np.float64:
            return super()._run(x, **attrs)
        return (pool_float64(x, "AVG", **attrs),)


FastAveragePool.__name__ = "AveragePool"


class FastGlobalAveragePool(OpRun):
    """GlobalAveragePool as one mean over the spatial axes, dims kept."""

    op_domain = ""

    def _run(self, x):
        return (x.mean(axis=tuple(range(2, x.ndim)), keepdims=True),)


FastGlobalAveragePool.__name__ = "GlobalAveragePool"


class FastRelu(OpRun):
    """Relu in one pass (onnx.reference's copies its result once more), in place when the
    input dies here."""

    op_domain = ""
    scratch = False

    def _run(self, x):
        return (np.maximum(x, x.dtype.type(0), out=x if self.scratch else None),)


FastRelu.__name__ = "Relu"


class FastAdd(_RefAdd):
    """Add, into its first input's memory when that input dies here and has the result's
    shape and dtype (a residual Add of ResNet)."""

    op_domain = ""
    scratch = False

    def _run(self, a, b):
        if self.scratch and a.shape == np.broadcast_shapes(a.shape, b.shape):
            return (np.add(a, b, out=a),)
        return super()._run(a, b)


FastAdd.__name__ = "Add"


class Float64Erf(_RefErf):
    """Erf in float64 (scipy's, to float64 ulps): onnx.reference's returns float32 values."""

    op_domain = ""

    def _run(self, x):
        if x.dtype != np.float64:
            return super()._run(x)
        return (erf(x),)


Float64Erf.__name__ = "Erf"


class Float64Gelu(OpRun):
    """Gelu (opset 20) in float64 and whole-tensor numpy: onnx.reference expands it into its
    function body, whose Erf is float32 and element by element (minutes for a ConvNeXt)."""

    op_domain = ""

    def _run(self, x, approximate=None):
        mode = _attr_str(approximate)
        if mode == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return (0.5 * x * (1 + np.tanh(inner)),)
        if mode not in ("none", "NOTSET"):
            raise ValueError(f"Gelu: unknown approximate={mode!r}")
        y = erf(x * (1 / math.sqrt(2)))  # four passes over x in place, not seven
        y += 1
        y *= x
        y *= 0.5
        return (y,)


Float64Gelu.__name__ = "Gelu"


def _elementwise(x: np.ndarray, passes: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    """A new float64 array: passes(x_part, y_part) fills y from x, in equal flat parts over the
    usable cores."""
    xf = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    y = np.empty(x.shape, dtype=np.float64)
    yf = y.reshape(-1)
    _in_parts(lambda lo, hi: passes(xf[lo:hi], yf[lo:hi]), yf.size, yf.size // 2**16, yf.size)
    return y


class Float64Sigmoid(OpRun):
    """Sigmoid as 1 / (1 + exp(-x)) in float64, four passes in place, over the usable cores:
    onnx.reference's evaluates both branches of a stable formula (three exponentials and a
    select), most of an EfficientNet's reference time (its SiLU is x * Sigmoid(x)). Below
    x = -709 exp(-x) overflows to inf and the result is 0, where sigmoid is under 1e-307."""

    op_domain = ""

    def _run(self, x):
        def passes(v: np.ndarray, y: np.ndarray) -> None:
            np.negative(v, out=y)
            with np.errstate(over="ignore"):
                np.exp(y, out=y)
            y += 1
            np.reciprocal(y, out=y)

        y = _elementwise(x, passes)
        return (y if x.dtype == np.float64 else y.astype(x.dtype),)


Float64Sigmoid.__name__ = "Sigmoid"


class Float64HardSwish(OpRun):
    """HardSwish, x * max(0, min(1, x / 6 + 1/2)) with the spec's 1/6 in float64, over the
    usable cores: onnx.reference expands it into its function body, whose HardSigmoid takes
    alpha as a float32 attribute (1/6 to 8 digits) and makes several more passes."""

    op_domain = ""

    def _run(self, x):
        def passes(v: np.ndarray, y: np.ndarray) -> None:
            np.divide(v, 6.0, out=y)
            y += 0.5
            np.clip(y, 0.0, 1.0, out=y)
            y *= v

        y = _elementwise(x, passes)
        return (y if x.dtype == np.float64 else y.astype(x.dtype),)


Float64HardSwish.__name__ = "HardSwish"


class FastMatMul(_RefMatMul):
    """MatMul of a stack (N, ..., K) by one matrix (K, M) as a single (N*..., K) x (K, M) BLAS
    call (a ConvNeXt's channels-last Linear): numpy loops over the stack one small matrix at a
    time."""

    op_domain = ""

    def _run(self, a, b):
        if a.ndim > 2 and b.ndim == 2 and a.dtype == b.dtype == np.float64:
            rows = a.reshape(-1, a.shape[-1])
            y = np.empty((len(rows), b.shape[1]))

            def part(lo: int, hi: int) -> None:  # the rows split over the cores, as Conv's images
                np.matmul(rows[lo:hi], b, out=y[lo:hi])

            _in_parts(part, len(rows), len(rows), y.size * rows.shape[1])
            return (y.reshape(*a.shape[:-1], b.shape[1]),)
        return super()._run(a, b)


FastMatMul.__name__ = "MatMul"

FRESH_PRODUCERS = {"Conv", "BatchNormalization", "Relu", "Add"}  # each returns new memory
FAST_OPS = [
    FastConv,
    FastMaxPool,
    FastAveragePool,
    FastGlobalAveragePool,
    FastRelu,
    FastAdd,
    Float64Erf,
    Float64Gelu,
    Float64Sigmoid,
    Float64HardSwish,
    FastMatMul,
]


def reference_evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx.reference on the float64 copy of `model`, with the grouped ConvTranspose and
    inference-mode BatchNormalization fixes and the fast kernels (FAST_OPS). Its own `run`
    keeps every intermediate and raises raw errors: Float64Reference is the one to call."""
    evaluator = ReferenceEvaluator(
        float64_model(model, initializers=False),
        new_ops=[GroupedConvTranspose, InferenceBatchNormalization, *FAST_OPS],
    )
    # the weights cast as arrays: through TensorProtos, a 500 MB VGG's took seconds more
    inits = evaluator.rt_inits_
    for name, value in inits.items():
        if isinstance(value, np.ndarray) and value.dtype in (np.float32, np.float16):
            inits[name] = value.astype(np.float64)
    return evaluator


class ReferenceUnavailable(Exception):  # noqa: N818 - a state, not a programming error
    """The float64 reference could not evaluate the model: an op it has no kernel for, or a
    kernel that raised. Never the user's error: report "float64 reference not measured:
    {op_type} {reason}" and let the onnxruntime comparison decide."""

    def __init__(self, op_type: str, node_name: str, reason: str) -> None:
        self.op_type = op_type
        self.node_name = node_name
        self.reason = " ".join(reason.split())[:300]
        where = f" (node {node_name!r})" if node_name else ""
        super().__init__(f"{op_type}{where}: {self.reason}")

    def not_measured(self) -> str:
        """The line a report shows in place of the float64 figures."""
        where = f" (node {self.node_name!r})" if self.node_name else ""
        return f"float64 reference not measured: {self.op_type}{where} {self.reason}"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name read inside `node`'s subgraphs (an outer value they may capture)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(inner.input)
                names |= _subgraph_names(inner)
    return names


class Float64Reference:
    """Evaluates one model in float64; build once, call for each batch.

    Raises ReferenceUnavailable (building or running) when some node cannot be evaluated.
    Intermediate values are dropped after their last use, so peak memory is the live
    activations of one batch, not all of them."""

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            self.evaluator = reference_evaluator(model)
        except Exception as exc:
            node = _unloadable_node(model, exc)
            raise ReferenceUnavailable(
                node.op_type if node else "model", node.name if node else "", _reason(exc)
            ) from exc
        nodes = self.evaluator.rt_nodes_
        keep = set(self.evaluator.output_names)
        for n in nodes:
            keep |= _subgraph_names(n.onnx_node)
        last: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for name in n.input:
                last[name] = i
        self._drop = [[] for _ in nodes]
        # values our own kernels computed into new memory: only these may be written over
        self._fresh = {
            o for n in nodes if n.onnx_node.op_type in FRESH_PRODUCERS for o in n.output if o
        }
        inits = set(self.evaluator.rt_inits_)
        for name, i in last.items():
            if name and name not in keep and name not in inits:
                self._drop[i].append(name)
        self._static = _feed_independent(nodes, inits)
        self._static_names = {o for n, st in zip(nodes, self._static, strict=True) if st
                              for o in n.output if o}  # fmt: skip
        self._cache_key: tuple = ()
        self._cache: dict[str, object] = {}

    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        """The named outputs (default: the graph's outputs) as float64 arrays."""
        names = list(outputs) if outputs else list(self.evaluator.output_names)
        live: dict[str, object] = {"": None}  # feeds and intermediates; then the weights
        results = ChainMap(live, self.evaluator.rt_inits_)
        live.update(
            (k, v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v)
            for k, v in feeds.items()
        )
        protected = set(feeds) | set(names) | self._static_names
        fresh = self._fresh
        key = tuple(sorted((k, live[k].shape, live[k].dtype.str) for k in feeds))
        reuse, self._cache_key = key == self._cache_key, ()
        if not reuse:
            self._cache = {}
        steps = zip(self.evaluator.rt_nodes_, self._drop, self._static, strict=True)
        for node, drop, static in steps:
            if static and reuse:  # computed by the last run, on feeds of the same shapes
                results.update((k, self._cache[k]) for k in node.output if k)
                values = None
            else:
                values = self._run_node(node, results, drop, protected, fresh)
                results.update((k, v) for k, v in zip(node.output, values, strict=False) if k)
                if static:
                    self._cache.update((k, results[k]) for k in node.output if k)
            for name in drop:
                if name not in names:
                    results.pop(name, None)
        self._cache_key = key
        missing = [n for n in names if n not in results]
        if missing:
            raise ReferenceUnavailable("model", "", f"no value computed for {missing}")
        return [np.asarray(results[n], dtype=np.float64) for n in names]

    @staticmethod
    def _run_node(node, results: ChainMap, drop, protected: set[str], fresh: set[str]):
        """One node's outputs; any failure is the reference's, named by the node."""
        try:
            inputs = [results[i] for i in node.input]
            if hasattr(node, "scratch"):
                node.scratch = node.input[0] in fresh and _may_overwrite(
                    node.input, drop, results.maps[0], protected
                )
            if node.need_context():
                return node.run(*inputs, context=results)
            return node.run(*inputs)
        except Exception as exc:  # MemoryError included: the reference's, not the user's
            raise ReferenceUnavailable(
                node.onnx_node.op_type, node.onnx_node.name, _reason(exc)
            ) from exc


# Ops whose output is not a function of their inputs' values, and ops that see only their
# input's shape.
VOLATILE_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                "Multinomial", "Bernoulli"}  # fmt: skip
SHAPE_OPS = {"Shape", "Size"}


def _feed_independent(nodes, inits: set[str]) -> list[bool]:
    """Per node: whether its outputs depend on the feeds' shapes alone (Constants, weight
    arithmetic, Shape and what is computed from it), so a run on feeds of the same shapes can
    take them from the last run: a dynamo export has several such nodes per layer."""
    known = set(inits) | {""}
    static = []
    for n in nodes:
        op = n.onnx_node
        ok = op.op_type not in VOLATILE_OPS and not any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in op.attribute
        )
        ok = ok and (op.op_type in SHAPE_OPS or all(i in known for i in op.input))
        if ok:
            known.update(op.output)
        static.append(ok)
    return static


def _may_overwrite(inputs, drop, live: dict, protected: set[str]) -> bool:
    """Whether a kernel may write into its first input (one a FRESH_PRODUCERS kernel made): a
    float64 array this node is the last to read, not a feed or a requested output, whose
    memory no other live value shares (Identity or Reshape may have handed it on; `live` holds
    every value but the weights, which never share an intermediate's memory)."""
    name = inputs[0] if inputs else ""
    if not name or name not in drop or name in protected or list(inputs).count(name) > 1:
        return False
    a = live[name]
    if not isinstance(a, np.ndarray) or a.dtype != np.float64 or not a.flags.writeable:
        return False
    owner = a if a.base is None else a.base
    if not isinstance(owner, np.ndarray):
        return False
    return not any(
        v is owner or (isinstance(v, np.ndarray) and v.base is owner)
        for k, v in live.items()
        if k != name
    )


def _unloadable_node(model: onnx.ModelProto, exc: Exception) -> onnx.NodeProto | None:
    """The node whose op type the evaluator's load error names ("Node type 'X' ..."), if any."""
    found = re.search(r"[Nn]ode type:? '([^']+)'", str(exc))
    names = [found.group(1)] if found else [n.op_type for n in model.graph.node]
    for name in names:
        for node in model.graph.node:
            if node.op_type == name and (found or f"'{name}'" in str(exc)):
                return node
    return None


# glibc's mallopt parameters, and where its dynamic mmap threshold settles on 64-bit (32 MiB;
# the trim threshold follows at twice that).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SETTLED_MMAP, SETTLED_TRIM = 32 << 20, 64 << 20


@contextmanager
def reused_heap() -> Iterator[None]:
    """Large arrays from malloc's heap, reused, for the reference's duration.

    glibc serves each block over its mmap threshold (32 MiB at most) with fresh pages from the
    kernel and unmaps it when freed, so every large intermediate of a 224x224 batch faults its
    pages in anew: about half the time of an elementwise kernel. Inside, such blocks stay in
    the heap and are reused; on exit the heap's free memory goes back to the system
    (malloc_trim), so the peak is still the live activations of one batch. Elsewhere than
    glibc (no mallopt) this does nothing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        mallopt = trim = None
    if mallopt is None or not mallopt(M_MMAP_THRESHOLD, 1 << 30):
        yield
        return
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        trim(0)
        mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP)
        mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM)


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
    one_blas_thread = threadpool_limits(1, user_api="blas") if batch > 1 else nullcontext()
    with reused_heap(), one_blas_thread:
        chunks = [
            ref.run({input_name: x[i : i + batch]}, [name])[0] for i in range(0, len(x), batch)
        ]
    return np.concatenate(chunks)
