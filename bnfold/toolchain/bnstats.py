"""BatchNorm running statistics against the data a model sees: the check, and recalibration.

A BN layer normalizes with the running mean and variance it carries. When they do not describe
the inputs it sees (estimated on batches too small to be stable, never updated after
fine-tuning, left at their initial values, or serving preprocessing that differs from
training's), the model is wrong before any fold. The check measures each BN input's per-channel
mean and variance on sample images, in graph order (the first layer that drifts is the cause;
later ones inherit), and compares them with the running statistics, per channel c:

    z_c = (data mean - running mean) / sqrt(running var + eps)      (mean shift, in stds)
    r_c = (data var + eps) / (running var + eps)                     (variance ratio)

Thresholds come from what a healthy model shows by chance on N images: a channel's data mean
over N images has a standard error of at most one running std / sqrt(N) (an image's mean varies
less than its pixels), and ln r_c of about sqrt(2 / N) (a variance estimated from N independent
values). A layer is flagged when the RMS of z_c over its channels exceeds max(0.5, 4 / sqrt(N))
or the RMS of ln r_c exceeds max(ln 2, 4 sqrt(2 / N)): four standard errors, and never less than
half a std of shift or a factor 2 of variance, which is where a change of prediction begins.
Below MIN_IMAGES images those chance floors pass the fixed ones and the check would be noise.

Recalibration re-estimates the statistics on the images, layer by layer in graph order (each
layer sees the inputs that the layers before it produce with their new statistics): the mean
and the unbiased variance over every value of the channel, what PyTorch's cumulative average
(`momentum=None`) reaches over one pass of all the images as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.bundle import BnLayerCheck, BnStatisticsCheck
from bnfold.errors import BnfoldError
from bnfold.toolchain.sessions import make_session, within_budget

MIN_IMAGES = 32
MEAN_SHIFT_FLOOR = 0.5  # running stds
LOG_VAR_FLOOR = math.log(2.0)  # a factor 2 of variance
CHUNK_VALUES = 2**20  # input values per run: every BN input of the chunk is held at once


class TooFewImages(BnfoldError):
    """Fewer images than the check or a recalibration needs."""


@dataclass
class BnNode:
    """One BatchNormalization node with constant statistics."""

    node: onnx.NodeProto
    mean: np.ndarray  # (C,) float64
    var: np.ndarray  # (C,) float64
    eps: float

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def x(self) -> str:
        return self.node.input[0]


def thresholds(n: int) -> tuple[float, float]:
    """(mean shift, log variance ratio) thresholds for n images."""
    return max(MEAN_SHIFT_FLOOR, 4 / math.sqrt(n)), max(LOG_VAR_FLOOR, 4 * math.sqrt(2 / n))


def batchnorm_nodes(model: onnx.ModelProto) -> list[BnNode]:
    """The BatchNormalization nodes whose statistics are constants, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 5 or not all(n in inits for n in node.input[3:5]):
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in node.input[3:5])
        out.append(BnNode(node, mean, var, float(eps)))
    return out


def _chunks(x: np.ndarray):
    step = within_budget(x[0].size, len(x), CHUNK_VALUES)
    for i in range(0, len(x), step):
        yield x[i : i + step]


def channel_moments(
    model: onnx.ModelProto, input_name: str, tensors: list[str], x: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, unbiased variance) of each named tensor (channel axis 1) over every
    image and position, accumulated in float64 chunk by chunk (Chan's parallel update)."""
    inner = [t for t in dict.fromkeys(tensors) if t != input_name]  # the input: x itself
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    # only the tensors asked for: the nodes after the last of them need not run
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inner)
    session = make_session(probe.SerializeToString(), "folded") if inner else None
    acc: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for part in _chunks(x):
        values = session.run(inner, {input_name: part}) if session else []
        if input_name in tensors:
            values, names = [*values, part], [*inner, input_name]
        else:
            names = inner
        for name, value in zip(names, values, strict=True):
            acc[name] = _combine(acc.get(name), np.asarray(value, dtype=np.float64))
    return {name: (mean, m2 / max(1, n - 1)) for name, (n, mean, m2) in acc.items()}


def _combine(prev, value: np.ndarray):
    """(count, mean, M2) of prev merged with value's channels (axis 1)."""
    axes = tuple(a for a in range(value.ndim) if a != 1)
    n = int(np.prod([value.shape[a] for a in axes]))
    mean = value.mean(axis=axes)
    m2 = ((value - np.expand_dims(mean, axes)) ** 2).sum(axis=axes)
    if prev is None:
        return n, mean, m2
    n0, mean0, m20 = prev
    delta = mean - mean0
    total = n0 + n
    return total, mean0 + delta * n / total, m20 + m2 + delta**2 * n0 * n / total


def check_statistics(
    model: onnx.ModelProto, input_name: str, x: np.ndarray, inputs: str
) -> BnStatisticsCheck:
    """The check on images x (the model's input layout), every BN in graph order."""
    bns = batchnorm_nodes(model)
    if not bns:
        return BnStatisticsCheck(checked=False, note=_no_statistics_note(model), inputs=inputs)
    if len(x) < MIN_IMAGES:
        return BnStatisticsCheck(
            checked=False, note=too_few_message(len(x)), inputs=inputs, n_images=len(x)
        )
    try:
        moments = channel_moments(model, input_name, [b.x for b in bns], x)
    except Exception as exc:  # onnxruntime's own error types (a BN input it cannot expose)
        reason = " ".join(str(exc).split())[:200]
        note = f"not measured: onnxruntime cannot expose the BN inputs ({reason})"
        return BnStatisticsCheck(checked=False, note=note, inputs=inputs, n_images=len(x))
    t_mean, t_var = thresholds(len(x))
    layers = [_layer(b, *moments[b.x], t_mean, t_var) for b in bns]
    flagged = [row.bn for row in layers if row.flagged]
    return BnStatisticsCheck(
        checked=True,
        inputs=inputs,
        n_images=len(x),
        mean_shift_threshold=t_mean,
        log_var_ratio_threshold=t_var,
        layers=layers,
        flagged=flagged,
        causes=likely_causes(layers),
    )


def _layer(b: BnNode, mean: np.ndarray, var: np.ndarray, t_mean: float, t_var: float):
    std = np.sqrt(b.var + b.eps)
    z = (mean - b.mean) / std
    log_r = np.log((var + b.eps) / (b.var + b.eps))
    rms_z, rms_log = float(np.sqrt(np.mean(z**2))), float(np.sqrt(np.mean(log_r**2)))
    return BnLayerCheck(
        bn=b.name,
        channels=len(b.mean),
        mean_shift_rms=rms_z,
        mean_shift_max=float(np.max(np.abs(z))),
        var_ratio_median=float(np.exp(np.median(log_r))),
        log_var_ratio_rms=rms_log,
        initial_statistics=bool(np.all(b.mean == 0) and np.all(b.var == 1)),
        flagged=bool(rms_z > t_mean or rms_log > t_var),
    )


def likely_causes(layers: list[BnLayerCheck]) -> list[str]:
    """What the flagged layers point at, most specific first."""
    causes = []
    initial = [r.bn for r in layers if r.initial_statistics]
    if initial:
        causes.append(
            f"{len(initial)} of {len(layers)} layers carry the initial statistics (mean 0, "
            "variance 1): they were never estimated (BN never ran in training mode, or the "
            "model was saved without its BN buffers); recalibrate on representative images"
        )
    if not any(r.flagged for r in layers):
        return causes
    first = layers[0]
    later = layers[1:]
    if first.flagged and not first.initial_statistics:
        in_line = sum(not r.flagged for r in later)
        causes.append(
            f"the first BatchNormalization ({first.bn}) already sees data unlike its statistics "
            f"(mean shift {first.mean_shift_rms:.2g} stds, variance x{first.var_ratio_median:.2g})"
            f"{f', {in_line} later layers in line' if in_line else ''}: the images likely reach "
            "the model differently from training: check the pixel scale, --mean/--std, the "
            "channel order (RGB vs BGR) and the layout (NCHW vs NHWC)"
        )
    elif not first.flagged:
        where = next(r.bn for r in layers if r.flagged)
        causes.append(
            f"the first layers are in line and drift starts at {where}: statistics that do not "
            "describe this data (estimated on batches too small to be stable, not updated after "
            "fine-tuning, or images unlike the training data); if the images are "
            "representative, recalibrate on them"
        )
    return causes


def _no_statistics_note(model: onnx.ModelProto) -> str:
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return "no BatchNormalization with constant statistics (they are inputs or computed)"
    return (
        "no BatchNormalization nodes: nothing to check (a BN exported as constant Mul/Add, as "
        "Keras exports do, carries no statistics to compare)"
    )


def too_few_message(n: int) -> str:
    t_mean, t_var = thresholds(max(n, 1))
    return (
        f"{n} images; at least {MIN_IMAGES} are needed: with {n}, a healthy model's "
        f"statistics differ from the data's by chance up to {t_mean:.2g} stds of mean and a "
        f"factor {math.exp(t_var):.2g} of variance, too close to a real drift to tell"
    )


def recalibrate(model: onnx.ModelProto, input_name: str, x: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` whose BN running statistics are re-estimated on x, in graph order: each
    pass measures every BN whose upstream BNs are already re-estimated."""
    if len(x) < MIN_IMAGES:
        raise TooFewImages(f"--recalibrate: {too_few_message(len(x))}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _own_statistics(out)
    pending = [b.name for b in batchnorm_nodes(out)]
    upstream = _upstream_batchnorms(out)
    while pending:
        ready = [n for n in pending if not upstream[n] & set(pending)]
        bns = {b.name: b for b in batchnorm_nodes(out) if b.name in ready}
        moments = channel_moments(out, input_name, [b.x for b in bns.values()], x)
        for b in bns.values():
            _set_statistics(out, b.node, *moments[b.x])
        pending = [n for n in pending if n not in ready]
    return out


def _own_statistics(model: onnx.ModelProto) -> None:
    """Give each BN node mean/variance initializers of its own (a shared one would be
    re-estimated for one node and silently changed for the others)."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "BatchNormalization"):
        for k in (3, 4):
            name = node.input[k] if len(node.input) > k else ""
            if name in inits and name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__bn{i}"
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
            seen.add(name)


def _set_statistics(model: onnx.ModelProto, node, mean: np.ndarray, var: np.ndarray) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    for name, value in ((node.input[3], mean), (node.input[4], var)):
        t = inits[name]
        dtype = numpy_helper.to_array(t).dtype
        t.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))


def _upstream_batchnorms(model: onnx.ModelProto) -> dict[str, set[str]]:
    """For each BN node name, the BN nodes whose outputs reach its input (graph order)."""
    producer_bns: dict[str, set[str]] = {}  # tensor -> BNs upstream of it (inclusive)
    result = {}
    for node in model.graph.node:
        ups = set().union(*(producer_bns.get(i, set()) for i in node.input if i))
        if node.op_type == "BatchNormalization":
            name = node.name or node.output[0]
            result[name] = set(ups)
            ups = ups | {name}
        for o in node.output:
            producer_bns[o] = ups
    return result


def agreement(before: np.ndarray, after: np.ndarray) -> float:
    """Top-1 agreement of two logit arrays (N, classes)."""
    return float(np.mean(before.argmax(1) == after.argmax(1))) if len(before) else 1.0


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float(np.mean(logits.argmax(1) == labels))


def summary_lines(check: BnStatisticsCheck) -> list[str]:
    """The check as the command line prints it: a header, one line per layer, the causes."""
    if not check.checked:
        return [f"BN statistics: not checked: {check.note}"]
    lines = [
        f"BN statistics vs {check.inputs}: flagged when the RMS mean shift exceeds "
        f"{check.mean_shift_threshold:.2g} stds or the RMS log variance ratio "
        f"{check.log_var_ratio_threshold:.2g}",
        f"  {'layer':<32} {'ch':>5} {'shift rms':>9} {'max':>6} {'var x':>7}",
    ]
    for r in check.layers:
        flag = "  FLAGGED" if r.flagged else ""
        lines.append(
            f"  {r.bn[-32:]:<32} {r.channels:>5} {r.mean_shift_rms:>9.3f} "
            f"{r.mean_shift_max:>6.2f} {r.var_ratio_median:>7.3f}{flag}"
        )
    verdict = f"{len(check.flagged)} of {len(check.layers)} layers flagged"
    lines.append(f"BN statistics: {verdict}" if check.flagged else "BN statistics: all in line")
    lines += [f"likely cause: {c}" for c in check.causes]
    return lines
