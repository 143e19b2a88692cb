"""training/sync_bn.py: SyncBatchNorm on 2 gloo ranks against nn.BatchNorm on the whole batch.

The reference is torch's own nn.BatchNorm*d, run in this process on the concatenation of the
ranks' inputs: forward outputs, input gradients, parameter gradients (summed over ranks, as DDP
does before averaging), running statistics after every step, and eval outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.training.two_ranks import run_on_ranks
from training.model import ModelConfig, build_model, count_batchnorms
from training.sync_bn import SyncBatchNorm, convert_to_sync_batchnorm, revert_sync_batchnorm

# Uneven per-rank batches: the element count has to be all-reduced, not assumed equal.
RANK_ROWS = (3, 5)
# name: (BatchNorm class, per-sample shape (C, ...), momentum, affine, training steps)
SCENARIOS = {
    "bn2d": (nn.BatchNorm2d, (3, 4, 4), 0.1, True, 3),
    "bn1d_cumulative": (nn.BatchNorm1d, (5,), None, True, 4),
    "bn1d_seq_no_affine": (nn.BatchNorm1d, (4, 6), 0.3, False, 2),
    "bn3d": (nn.BatchNorm3d, (2, 3, 2, 2), 0.1, True, 2),
}
# float32 in and out; SyncBatchNorm sums in float64 and in another order than nn.BatchNorm, so
# the two agree to some float32 ulps of O(1)-O(10) values: measured max |diff| 2.9e-6 (an eval
# output), most below 1e-6. 1e-5 leaves room for other CPUs' kernels; a missing all-reduce, a
# biased running variance or an all-reduce without autograd each fail these tests.
ATOL = RTOL = 1e-5


def make_bn(cls, channels: int, momentum, affine: bool) -> nn.Module:
    bn = cls(channels, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(1 + 0.25 * torch.arange(channels))
            bn.bias.copy_(0.1 * torch.arange(channels) - 0.2)
    return bn


def step_data(name: str, step: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (sum(RANK_ROWS), *shape) of a step and the upstream gradient for it."""
    gen = torch.Generator().manual_seed(1000 * list(SCENARIOS).index(name) + step)
    n = sum(RANK_ROWS)
    scale = 0.5 + torch.rand(shape[0], generator=gen)  # per-channel spread and offset
    offset = 3 * torch.randn(shape[0], generator=gen)
    view = (1, -1) + (1,) * (len(shape) - 1)
    x = torch.randn(n, *shape, generator=gen) * scale.view(view) + offset.view(view)
    return x, torch.randn(n, *shape, generator=gen)


def rank_slice(rank: int) -> slice:
    start = sum(RANK_ROWS[:rank])
    return slice(start, start + RANK_ROWS[rank])


def run_steps(bn: nn.Module, name: str, rows: slice, reduce_grads) -> dict:
    """Train steps then one eval forward on rows of each global batch; everything recorded."""
    _, shape, _, affine, steps = SCENARIOS[name]
    rec: dict[str, list] = {k: [] for k in ("y", "x_grad", "w_grad", "b_grad", "mean", "var")}
    bn.train()
    for step in range(steps):
        x_all, g_all = step_data(name, step, shape)
        x = x_all[rows].clone().requires_grad_()
        y = bn(x)
        (y * g_all[rows]).sum().backward()
        rec["y"].append(y.detach())
        rec["x_grad"].append(x.grad)
        if affine:
            rec["w_grad"].append(reduce_grads(bn.weight.grad.clone()))
            rec["b_grad"].append(reduce_grads(bn.bias.grad.clone()))
            bn.weight.grad = bn.bias.grad = None
        rec["mean"].append(bn.running_mean.clone())
        rec["var"].append(bn.running_var.clone())
    rec["batches_tracked"] = int(bn.num_batches_tracked)
    bn.eval()
    with torch.no_grad():
        rec["eval_y"] = bn(step_data(name, steps, shape)[0][rows])
    return rec


def sync_worker(ctx, out_dir: str) -> None:
    """On each rank: every scenario through SyncBatchNorm; torch's SyncBatchNorm on CPU."""
    import torch.distributed as dist

    import training.sync_bn as sync_bn

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    results: dict = {}
    for name, (cls, shape, momentum, affine, _) in SCENARIOS.items():
        bn = convert_to_sync_batchnorm(make_bn(cls, shape[0], momentum, affine))
        assert isinstance(bn, SyncBatchNorm)
        results[name] = run_steps(bn, name, rank_slice(ctx.rank), all_reduce)
    # Eval mode must not communicate: a collective here would fail loudly.
    bn.eval()
    real = sync_bn.differentiable_all_reduce
    sync_bn.differentiable_all_reduce = None
    try:
        bn(step_data(name, 0, shape)[0][rank_slice(ctx.rank)])
    finally:
        sync_bn.differentiable_all_reduce = real
    try:
        nn.SyncBatchNorm(3).train()(torch.randn(4, 3, 2, 2))
        results["torch_syncbn_cpu"] = "ran"
    except ValueError as exc:
        results["torch_syncbn_cpu"] = str(exc)
    torch.save(results, Path(out_dir) / f"rank{ctx.rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sync_bn")
    run_on_ranks(sync_worker, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_batchnorm_on_the_concatenated_batch(ranks, name):
    cls, shape, momentum, affine, steps = SCENARIOS[name]
    ref = run_steps(make_bn(cls, shape[0], momentum, affine), name, slice(None), lambda g: g)
    r0, r1 = ranks[0][name], ranks[1][name]

    def close(a, b, what):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")

    for step in range(steps):
        close(torch.cat([r0["y"][step], r1["y"][step]]), ref["y"][step], f"output step {step}")
        grads = torch.cat([r0["x_grad"][step], r1["x_grad"][step]])
        close(grads, ref["x_grad"][step], f"input grad step {step}")
        for key in ("w_grad", "b_grad", "mean", "var"):
            if ref[key]:
                close(r0[key][step], ref[key][step], f"{key} step {step}")
                # Both ranks hold the same statistics and the same reduced gradients.
                assert torch.equal(r0[key][step], r1[key][step]), key
    assert r0["batches_tracked"] == r1["batches_tracked"] == ref["batches_tracked"] == steps
    close(torch.cat([r0["eval_y"], r1["eval_y"]]), ref["eval_y"], "eval output")


def test_running_variance_is_unbiased_over_the_global_batch(ranks):
    """The first running_var step: (1 - m) * 1 + m * var_unbiased over all 8 samples."""
    _, shape, momentum, _, _ = SCENARIOS["bn2d"]
    x, _ = step_data("bn2d", 0, shape)
    unbiased = x.double().transpose(0, 1).reshape(shape[0], -1).var(dim=1, correction=1)
    expected = (1 - momentum) + momentum * unbiased
    torch.testing.assert_close(ranks[0]["bn2d"]["var"][0].double(), expected, atol=1e-6, rtol=1e-6)


def test_torch_syncbatchnorm_refuses_cpu(ranks):
    """Why this module exists: torch 2.13's SyncBatchNorm will not train on CPU tensors."""
    assert "expected input tensor to be on GPU" in ranks[0]["torch_syncbn_cpu"]


# ---------------------------------------------------------------- one process, no group


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_plain_batchnorm(momentum):
    ref = make_bn(nn.BatchNorm2d, 3, momentum, True)
    sync = convert_to_sync_batchnorm(make_bn(nn.BatchNorm2d, 3, momentum, True))
    for step in range(3):
        x, _ = step_data("bn2d", step, (3, 4, 4))
        assert torch.equal(sync(x), ref(x))
    assert torch.equal(sync.running_var, ref.running_var)
    assert torch.equal(sync.running_mean, ref.running_mean)
    sync.eval()
    ref.eval()
    assert torch.equal(sync(x), ref(x))


def test_convert_shares_state_and_revert_restores_the_classes():
    cfg = ModelConfig(widths=[4, 8], hidden=8, residual=True)
    model = build_model(cfg)
    plain_types = [type(m) for m in model.modules()]
    params = list(model.parameters())
    x, _ = step_data("bn2d", 0, (1, 8, 8))
    synced = convert_to_sync_batchnorm(model)
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in synced.modules())
    assert n_sync == count_batchnorms(build_model(cfg)) == 7
    # The same tensors: an optimizer built before the conversion keeps working.
    assert [id(p) for p in synced.parameters()] == [id(p) for p in params]
    assert list(synced.state_dict()) == list(build_model(cfg).state_dict())
    synced(x)  # one training step moves the shared running statistics
    reverted = revert_sync_batchnorm(synced)
    assert [type(m) for m in reverted.modules()] == plain_types
    fresh = build_model(cfg)
    fresh.load_state_dict(reverted.state_dict())  # strict: exactly BatchNorm's keys
    assert torch.equal(fresh.eval()(x), reverted.eval()(x))


def test_cuda_conversion_uses_torch_syncbatchnorm_and_reverts():
    model = build_model(ModelConfig(widths=[4], hidden=8))
    synced = convert_to_sync_batchnorm(model, device_type="cuda")
    kinds = {type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}
    reverted = revert_sync_batchnorm(synced)
    assert isinstance(reverted.stem.bn, nn.BatchNorm2d)
    assert isinstance(reverted.bn_fc, nn.BatchNorm1d)


def test_revert_refuses_a_syncbatchnorm_of_unknown_origin():
    with pytest.raises(ValueError, match="cannot tell which BatchNorm"):
        revert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(4)))
