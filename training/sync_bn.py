"""Synchronized BatchNorm for CPU (gloo), and conversion to and from ordinary BatchNorm.

torch 2.13's `nn.SyncBatchNorm` runs on CUDA only: on CPU it raises "expected input tensor to be
on GPU" and `aten::batch_norm_stats` has no CPU kernel. `SyncBatchNorm` here computes the
statistics over the global batch by all-reducing, per channel, the sum, the sum of squares and
the element count across ranks. The all-reduce is `torch.distributed.nn.functional.all_reduce`,
which is differentiable (its backward all-reduces the gradient), so the gradient reaching each
rank's input is the gradient of the global loss, as if one process had held the whole batch.

Everything else follows `nn.BatchNorm*` exactly: biased variance to normalize, unbiased variance
(global count) for the running estimate, `momentum=None` as a cumulative average over
`num_batches_tracked`, running statistics in eval mode, no synchronization in eval mode.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The attribute a converted module carries to remember the class it came from.
_ORIGIN_ATTR = "bnfold_bn_cls"


def global_batch_stats(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance (float64) and element count over every rank's x.

    x is (N, C, *). Sums are taken in float64: `E[x^2] - E[x]^2` in float32 loses digits to
    cancellation when |mean| is large against the standard deviation.
    """
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    x64 = x.to(torch.float64)
    count = torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)
    packed = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])  # (2C + 1,)
    with warnings.catch_warnings():
        # Deprecated in favour of a private, non-public module; this one is the public,
        # differentiable all-reduce.
        warnings.simplefilter("ignore", FutureWarning)
        packed = differentiable_all_reduce(packed, group=group or dist.group.WORLD)
    total, total_sq, n = packed[:c], packed[c : 2 * c], packed[2 * c]
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0.0)
    return mean, var, n.detach()


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks in `process_group`; works on CPU (gloo).

    Without an initialized process group, or in eval mode, it is exactly `nn.BatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def _needs_sync(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._needs_sync():
            return super().forward(input)  # nn.BatchNorm's own path, bit for bit
        self._check_input_dim(input)
        mean, var, n = global_batch_stats(input, self.process_group)
        if n.item() <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training across ranks, got "
                f"{int(n.item())} in total"
            )
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        shape = (1, -1) + (1,) * (input.dim() - 2)  # broadcast over (N, C, *)
        invstd = torch.rsqrt(var + self.eps).to(input.dtype)
        out = (input - mean.to(input.dtype).view(shape)) * invstd.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """The update nn.BatchNorm does: unbiased variance, momentum or cumulative average."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (n / (n - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_to_sync_batchnorm(
    module: nn.Module,
    device_type: str = "cpu",
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d by a synchronized one, sharing parameters and buffers.

    CUDA gets torch's `nn.SyncBatchNorm` (fused kernels); anything else this module's
    `SyncBatchNorm`. Each new module remembers its original class for `revert_sync_batchnorm`.
    """
    if isinstance(module, _PLAIN_BN):
        cls = nn.SyncBatchNorm if device_type == "cuda" else SyncBatchNorm
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        _share_state(module, out)
        setattr(out, _ORIGIN_ATTR, type(module))
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_to_sync_batchnorm(child, device_type, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn synchronized BN (ours or torch's) back into the nn.BatchNorm*d it was converted from.

    Folding and export work on ordinary BatchNorm, so the bundle is the same kind of artifact as
    single-process training produces.
    """
    if isinstance(module, SyncBatchNorm | nn.SyncBatchNorm):
        cls = getattr(module, _ORIGIN_ATTR, None)
        if cls not in _PLAIN_BN:
            raise ValueError(
                f"cannot tell which BatchNorm{{1,2,3}}d this {type(module).__name__} came from: "
                "convert with training.sync_bn.convert_to_sync_batchnorm, which records it"
            )
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        _share_state(module, out)
        return out
    for name, child in module.named_children():
        module.add_module(name, revert_sync_batchnorm(child))
    return module


def _share_state(src: nn.Module, dst: nn.Module) -> None:
    """dst uses src's parameters and buffers (same tensors), and its train/eval mode."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    if src.track_running_stats:
        dst.running_mean = src.running_mean
        dst.running_var = src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
