"""The fold arithmetic, once: numpy float64, rounded once to the weight's dtype.

In inference BN (and any per-channel `Mul`/`Add` chain) is `y = s * x + t` per channel, with
`s = gamma / sqrt(var + eps)` and `t = beta - mean * s`. Both folds below are exact in real
arithmetic; computing in float64 and rounding once gives the nearest representable weights.

- backward (the map follows a layer): `W'[o] = W[o] * s[o]`, `b' = b * s + t`
  (= `(b - mean) * s + beta` for a BN);
- forward (the map precedes a layer, e.g. BN after the activation):
  `W'[:, c] = W[:, c] * s[c]`, `b' = b + sum_{c,k} W[:, c, k] * t[c]`. Exact for a dense layer
  and a conv that reads no zero padding (the padding would see `t`, not 0).

Weight layouts (where the output and input channels live):

- `"out_in"`: (out, in/groups, k...): Conv weights, Gemm `B` with transB=1, torch Linear;
- `"in_out"`: (in, out): MatMul weights, Gemm `B` with transB=0;
- `"transposed"`: (in, out/groups, k...): ConvTranspose; output channel `g*opg + j` is
  `W[g*in/groups:(g+1)*in/groups, j]`.

Imports numpy only, so the torch fold and the ONNX fold share it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Layout = Literal["out_in", "in_out", "transposed"]
LAYOUTS: tuple[str, ...] = ("out_in", "in_out", "transposed")
SCALE_WARN_THRESHOLD = 1e3


def f64(x: object) -> np.ndarray:
    """A float64 copy of an array-like (numpy array, list, scalar)."""
    return np.array(x, dtype=np.float64)


def bn_scale_shift(
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BN as `y = s * x + t`, (C,) each, float64; gamma=1, beta=0 when absent."""
    var64 = f64(var)
    gamma64 = np.ones_like(var64) if gamma is None else f64(gamma)
    beta64 = np.zeros_like(var64) if beta is None else f64(beta)
    with np.errstate(invalid="ignore", divide="ignore"):  # callers check isfinite
        s = gamma64 / np.sqrt(var64 + float(eps))
        return s, beta64 - f64(mean) * s


def scale_range(s: np.ndarray) -> tuple[float, float]:
    """(min |s|, max |s|): what the fold report shows."""
    mags = np.abs(f64(s))
    return float(mags.min()), float(mags.max())


def scale_warning(s: np.ndarray) -> str | None:
    """A warning when |s| is large enough to amplify float32 rounding, else None."""
    _, hi = scale_range(s)
    if hi > SCALE_WARN_THRESHOLD:
        return (
            f"scale up to {hi:.3g} amplifies float32 rounding: running_var near zero with a "
            "large gamma?"
        )
    return None


def out_channels(shape: tuple[int, ...], layout: Layout, groups: int = 1) -> int:
    """Number of output channels of a weight of `shape` in `layout`."""
    _check_layout(layout, groups)
    if layout == "out_in":
        return shape[0]
    if layout == "in_out":
        return shape[1]
    return groups * shape[1]


def in_channels(shape: tuple[int, ...], layout: Layout, groups: int = 1) -> int:
    """Number of input channels of a weight of `shape` in `layout`."""
    _check_layout(layout, groups)
    if layout == "out_in":
        return groups * shape[1]
    return shape[0]


def fold_backward(
    w: np.ndarray,
    b: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    *,
    layout: Layout = "out_in",
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold `y = s * layer(x) + t` into the layer: (W', b') in w's dtype, b' of shape (out,).

    `b` may be None (no bias). `s`, `t` are (out,).
    """
    w64 = f64(w)
    cout = out_channels(w64.shape, layout, groups)
    s64, t64 = _per_channel(s, cout, "output"), _per_channel(t, cout, "output")
    w_new = w64 * _out_broadcast(s64, w64.shape, layout, groups)
    b64 = np.zeros(cout) if b is None else f64(b).reshape(cout)
    return _round(w_new, w), _round(b64 * s64 + t64, w)


def fold_backward_bias(b: np.ndarray, s: np.ndarray, t: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`b * s + t` for a bias of any shape broadcasting against (out,) (e.g. Gemm's C).

    The result has the broadcast shape of b, s and t, rounded once to `dtype`.
    """
    return (f64(b) * f64(s) + f64(t)).astype(dtype)


def fold_forward(
    w: np.ndarray,
    b: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    *,
    layout: Layout = "out_in",
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold `x -> s * x + t` (per input channel) into the layer after it: (W', b') in w's dtype.

    Exact for a dense layer, and for a conv only when no tap reads zero padding (the caller
    checks). b' has shape (out,); `b` may be None.
    """
    if layout == "transposed":
        raise ValueError(
            "forward fold into a ConvTranspose is not supported: only Conv (out, in/groups, k...) "
            "and dense (in, out) / (out, in) weights can absorb a preceding per-channel map"
        )
    w64 = f64(w)
    cin = in_channels(w64.shape, layout, groups)
    s64, t64 = _per_channel(s, cin, "input"), _per_channel(t, cin, "input")
    cout = out_channels(w64.shape, layout, groups)
    if layout == "in_out":  # (in, out)
        w_new = w64 * s64[:, None]
        shift = t64 @ w64  # (out,)
    else:
        # (out, in/g, k...) -> (g, out/g, in/g, k...): input channel g*ipg + i
        ipg, kernel = w64.shape[1], w64.shape[2:]
        grouped = w64.reshape(groups, cout // groups, ipg, *kernel)
        per_channel = (groups, 1, ipg, *[1] * len(kernel))
        w_new = (grouped * s64.reshape(per_channel)).reshape(w64.shape)
        shift = (grouped * t64.reshape(per_channel)).sum(axis=tuple(range(2, grouped.ndim)))
        shift = shift.reshape(cout)
    b64 = np.zeros(cout) if b is None else f64(b).reshape(cout)
    return _round(w_new, w), _round(b64 + shift, w)


def forward_shift(
    w: np.ndarray, t: np.ndarray, *, layout: Layout = "out_in", groups: int = 1
) -> np.ndarray:
    """`sum_{c,k} W[:, c, k] * t[c]`, float64 (out,): what a forward fold adds to the bias."""
    _, shift = fold_forward(f64(w), None, np.ones_like(f64(t)), t, layout=layout, groups=groups)
    return shift


def _out_broadcast(s: np.ndarray, shape: tuple[int, ...], layout: Layout, groups: int):
    """`s` (out,) reshaped to multiply a weight of `shape` along its output channels."""
    if layout == "out_in":
        return s.reshape(-1, *[1] * (len(shape) - 1))
    if layout == "in_out":
        return s.reshape(1, -1)
    # (in, out/g, k...) viewed as (g, in/g, out/g, k...) would need a reshape of w; instead
    # build the (in, out/g, 1...) factor: row r belongs to group r // (in/g).
    cin, opg = shape[0], shape[1]
    factor = s.reshape(groups, 1, opg).repeat(cin // groups, axis=1).reshape(cin, opg)
    return factor.reshape(cin, opg, *[1] * (len(shape) - 2))


def _per_channel(v: np.ndarray, n: int, what: str) -> np.ndarray:
    """v as float64 (n,); callers expand a scalar Mul/Add themselves (no silent broadcast)."""
    v64 = f64(v).reshape(-1)
    if v64.size != n:
        raise ValueError(f"BN has {v64.size} channels but the layer has {n} {what} channels")
    return v64


def _check_layout(layout: str, groups: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {LAYOUTS}")
    if groups < 1 or (layout == "in_out" and groups != 1):
        raise ValueError(f"groups={groups} is not valid for layout {layout!r}")


def _round(x64: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Round once to the dtype of `like` (float64 stays float64)."""
    dtype = like.dtype if isinstance(like, np.ndarray) else np.asarray(like).dtype
    return x64.astype(dtype)
