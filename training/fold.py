"""Fold eval-mode BatchNorm into a neighbouring conv / linear layer, exactly, and report it.

In eval mode BN is a per-channel affine map `y = s * x + t`, `s = gamma / sqrt(var + eps)`,
`t = beta - mean * s`. It folds:

- backward, into the Conv / ConvTranspose / Linear whose output it alone consumes:
  `W'[o] = W[o] * s[o]`, `b' = (b - mean) * s + beta`;
- forward, into the Linear / Conv it alone feeds (BN after the activation):
  `W2'[:, c] = W2[:, c] * s[c]`, `b2' = b2 + sum_{c,k} W2[:, c, k] * t[c]`. The shift term is
  exact only when the conv pads nothing or pads by copying real values (reflect, replicate,
  circular): zero padding would count `t` at border taps that should see zeros.

The math is done in float64 and rounded once to the parameter dtype. Anything that cannot be
folded exactly stays a BN, with the reason in the report.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bnfold import foldmath
from bnfold.bundle import FoldRow
from bnfold.foldreport import PADDED_REASON, FoldReport

logger = logging.getLogger(__name__)

SCALE_WARN_THRESHOLD = foldmath.SCALE_WARN_THRESHOLD
NO_STATS_REASON = (
    "no running statistics (track_running_stats=False): uses batch statistics at eval, "
    "cannot be folded"
)

# Spatial rank of each layer type; Linear pairs with BatchNorm1d (rank 1).
_CONV_RANK = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.Linear: 1}
_CONVT_RANK = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BN_RANK = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None}


# ---------------------------------------------------------------- tensor wrappers over foldmath


def _np64(x: torch.Tensor | None) -> np.ndarray | None:
    return None if x is None else x.detach().to(torch.float64).cpu().numpy()


def _tensor(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A foldmath result (already rounded once to the target dtype) as a tensor like `like`."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype=like.dtype, device=like.device)


def _scale_shift64(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) as float64 numpy; gamma=1, beta=0 when absent (affine=False)."""
    return foldmath.bn_scale_shift(_np64(mean), _np64(var), eps, _np64(gamma), _np64(beta))


def bn_scale_shift(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as `y = s * x + t`, computed in float64, returned in `dtype` (var's)."""
    s, t = _scale_shift64(mean, var, eps, gamma, beta)
    dtype = dtype or var.dtype
    return torch.from_numpy(s).to(dtype), torch.from_numpy(t).to(dtype)


def fold_conv_bn_weights(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN that follows a Conv{1,2,3}d / Linear (or ConvTranspose with transposed=True).

    Returns (W', b') in w's dtype: `W'[o] = W[o] * s[o]`, `b' = (b - mean) * s + beta`.
    """
    s, t = _scale_shift64(mean, var, eps, gamma, beta)
    layout = "transposed" if transposed else "out_in"
    w_new, b_new = foldmath.fold_backward(
        _np64(w), _np64(b), s, t, layout=layout, groups=groups if transposed else 1
    )
    return _tensor(w_new, w), _tensor(b_new, w)


def fold_bn_forward_weights(
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold `y = s * x + t` (per input channel) into the Linear / Conv{1,2,3}d that follows.

    Exact for a Linear and for a conv without zero padding. Returns (W2', b2') in w2's dtype.
    """
    w_new, b_new = foldmath.fold_forward(
        _np64(w2), _np64(b2), _np64(s), _np64(t),
        layout="transposed" if transposed else "out_in", groups=groups,
    )  # fmt: skip
    return _tensor(w_new, w2), _tensor(b_new, w2)


# ---------------------------------------------------------------- graph surgery


def fold_batchnorm(
    model: nn.Module, *, example_input: torch.Tensor | None = None
) -> tuple[fx.GraphModule, FoldReport]:
    """Trace a copy of `model` with torch.fx and fold every BN that folds exactly.

    The input model is left untouched. Folded layers keep their qualified names. Linear +
    BatchNorm1d is assumed to see (N, features); pass `example_input` to check ranks instead.
    """
    if model.training:
        raise ValueError(
            "call model.eval() first: folding uses running statistics, and a model in "
            "training mode normalizes with batch statistics instead"
        )
    work = copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(work)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, NotImplementedError...
        raise ValueError(
            f"{type(model).__name__} is not torch.fx traceable ({type(exc).__name__}: {exc}); "
            "fold_batchnorm needs a model symbolic_trace can follow (no data-dependent "
            "control flow)"
        ) from exc
    surgery = _Surgery(gm, _ranks(gm, example_input))
    report = FoldReport([surgery.fold(n) for n in list(gm.graph.nodes) if surgery.is_bn(n)])
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    # Keep each module's own mode: a refused BN left in training mode must stay so.
    flags = {name: m.training for name, m in work.named_modules()}
    for name, m in gm.named_modules():
        m.training = flags.get(name, False)
    return gm, report


def _ranks(gm: fx.GraphModule, example_input: torch.Tensor | None) -> dict[str, int]:
    """Tensor rank of each node's output, from one run on a throwaway copy (BN stats move)."""
    if example_input is None:
        return {}
    probe = copy.deepcopy(gm)
    with torch.no_grad():
        ShapeProp(probe).propagate(example_input)
    metas = {n.name: n.meta.get("tensor_meta") for n in probe.graph.nodes}
    return {k: len(m.shape) for k, m in metas.items() if hasattr(m, "shape")}


class _Surgery:
    """Decides and applies the fold of each BN node of one GraphModule."""

    def __init__(self, gm: fx.GraphModule, ranks: dict[str, int]) -> None:
        self.gm = gm
        self.ranks = ranks
        self.modules = dict(gm.named_modules())
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def module(self, node: object) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.modules[str(node.target)]
        return None

    def is_bn(self, node: fx.Node) -> bool:
        return type(self.module(node)) in _BN_RANK

    def fold(self, bn_node: fx.Node) -> FoldRow:
        """Fold one BN node backward, else forward, else report why not."""
        name = str(bn_node.target)
        bn = self.modules[name]
        if bn.running_mean is None or bn.running_var is None:
            return FoldRow(bn=name, folded=False, reason=NO_STATS_REASON)
        s, t = _scale_shift64(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        row = _scale_row(name, s)
        direction, reason = self._choose(bn_node, bn, s, t)
        if direction is None:
            logger.info("%s: %s", name, reason)
            return row.model_copy(update={"reason": reason})
        layer_node = bn_node.args[0] if direction == "backward" else next(iter(bn_node.users))
        into = self._apply(bn_node, layer_node, s, t, direction)
        return row.model_copy(update={"folded": True, "into": into, "direction": direction})

    def _choose(self, bn_node: fx.Node, bn: nn.Module, s, t) -> tuple[str | None, str | None]:
        """("backward" or "forward", None) when a fold is exact, else (None, reason)."""
        reason = self._precondition(bn_node, bn, s, t)
        if reason is not None:
            return None, reason
        back = self._backward_blocker(bn_node, bn)
        if back is None:
            return "backward", None
        fwd = self._forward_blocker(bn_node, bn)
        if fwd is None:
            return "forward", None
        # BN right after a conv/linear ("pre"): say why that fold failed; else why forward did.
        src_is_layer = self._layer_type(bn_node.args[0], (_CONV_RANK, _CONVT_RANK))
        return None, back if src_is_layer else fwd

    def _precondition(self, bn_node: fx.Node, bn: nn.Module, s, t) -> str | None:
        if bn.training:
            return "not folded: BN module is in training mode (batch statistics); call .eval()"
        if not (np.isfinite(s).all() and np.isfinite(t).all()):
            return "not folded: running statistics give a non-finite scale or shift"
        if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(bn_node.args[0], fx.Node):
            return "not folded: BN is called with extra arguments"
        return None

    def _layer_type(self, node: object, tables: tuple[dict, ...]) -> type | None:
        kind = type(self.module(node))
        return kind if any(kind in table for table in tables) else None

    def _pairs(self, layer_node: fx.Node, bn_node: fx.Node, bn: nn.Module, rank: int) -> bool:
        """Same spatial rank, and Linear only with BN over (N, features)."""
        if _BN_RANK[type(bn)] not in (None, rank):
            return False
        linear = isinstance(self.module(layer_node), nn.Linear)
        return not linear or self.ranks.get(bn_node.name, 2) == 2

    def _backward_blocker(self, bn_node: fx.Node, bn: nn.Module) -> str | None:
        src = bn_node.args[0]
        kind = self._layer_type(src, (_CONV_RANK, _CONVT_RANK))
        if kind is None:
            return f"not folded: BN input is {self._describe(src)}, not a conv/linear"
        if not self._pairs(src, bn_node, bn, {**_CONV_RANK, **_CONVT_RANK}[kind]):
            return f"not folded: {type(bn).__name__} does not normalize the channels of {src}"
        if self.calls[src.target] > 1:
            return f"not folded: {src.target} is called {self.calls[src.target]} times (reuse)"
        if len(src.users) > 1:
            return f"not folded: output of {src.target} has other users besides the BN"
        return None

    def _forward_blocker(self, bn_node: fx.Node, bn: nn.Module) -> str | None:
        users = list(bn_node.users)
        source = self._describe(bn_node.args[0])
        if len(users) != 1:
            return f"not folded: BN input is {source} and the BN output has {len(users)} users"
        user = users[0]
        kind = self._layer_type(user, (_CONV_RANK,))
        plain_call = user.args == (bn_node,) and not user.kwargs
        if kind is None or not plain_call or not self._pairs(user, bn_node, bn, _CONV_RANK[kind]):
            return (
                f"not folded: BN input is {source} and its only user is "
                f"{self._describe(user)}, neither a conv/linear it can fold into"
            )
        if self.calls[user.target] > 1:
            return f"not folded: {user.target} is called {self.calls[user.target]} times (reuse)"
        if not _pads_nothing_or_copies(self.modules[str(user.target)]):
            return PADDED_REASON
        return None

    def _apply(self, bn_node: fx.Node, layer_node: fx.Node, s, t, direction: str) -> str:
        """Rewrite the layer's parameters, route the BN's users past it, drop the BN node."""
        layer = self.modules[str(layer_node.target)]
        groups = getattr(layer, "groups", 1)
        w64, b64 = _np64(layer.weight), _np64(layer.bias)
        if direction == "backward":
            layout = "transposed" if type(layer) in _CONVT_RANK else "out_in"
            w, b = foldmath.fold_backward(w64, b64, s, t, layout=layout, groups=groups)
        else:
            w, b = foldmath.fold_forward(w64, b64, s, t, layout="out_in", groups=groups)
        # Round once, from float64 to the parameter dtype.
        w, b = _tensor(w, layer.weight), _tensor(b, layer.weight)
        # Fresh Parameters (a missing bias becomes one): never write through shared tensors.
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
        bn_node.replace_all_uses_with(bn_node.args[0])
        self.gm.graph.erase_node(bn_node)
        return str(layer_node.target)

    def _describe(self, node: object) -> str:
        module = self.module(node)
        if module is not None:
            return f"{node.target} ({type(module).__name__})"
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "placeholder":
            return f"the model input {node.target!r}"
        if node.op == "output":
            return "the model output"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _scale_row(name: str, s: np.ndarray) -> FoldRow:
    """A row carrying min/max |s|, with a warning when s is large enough to hurt float32."""
    lo, hi = foldmath.scale_range(s)
    warning = foldmath.scale_warning(s)
    if warning:
        logger.warning("%s: %s", name, warning)
    return FoldRow(bn=name, folded=False, scale_min=lo, scale_max=hi, warning=warning)


def _pads_nothing_or_copies(conv: nn.Module) -> bool:
    """True when no tap reads a zero pad: padding 0 / 'valid', or a copying padding_mode."""
    if not isinstance(conv, nn.modules.conv._ConvNd):
        return True  # Linear
    if conv.padding_mode != "zeros":
        return True  # reflect / replicate / circular pad with real BN outputs: s*x+t commutes
    if conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return all(p == 0 for p in conv.padding)
