"""Data-parallel training (training/distributed.py, fit(dist=...)) on 2 gloo ranks, loopback.

Exactness: with synchronized BN, 2 ranks x batch B train the same model as 1 process with batch
2B on the same data order. The reference is fit() in this process with plain nn.BatchNorm, one
replica, no process group, batch 2B: DistributedSampler's permutation is the same for any number
of replicas, and step i of the 2 ranks covers exactly the 2B samples of the reference's step i.
Augmentation is off (shift=0) because each rank draws its own shifts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.two_ranks import LOOPBACK_ENV, free_port, run_on_ranks
from training.cli import load_splits, main
from training.data import Splits
from training.distributed import DistContext
from training.model import ModelConfig, build_model, count_batchnorms
from training.train import TrainConfig, fit, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
B = 8  # per-rank batch
STEPS = 4  # per epoch
EPOCHS = 2
MODEL = ModelConfig(widths=[4, 8], hidden=8, residual=True)  # 7 BN layers, 2d and 1d
# Weights and BN statistics of the 2-rank run against the 1-process run, float32. The two runs
# add up the same numbers in different orders (per-rank partial sums, float64 BN sums, DDP's
# gradient average), so results differ by float32 rounding that 8 AdamW steps carry along:
# measured max |diff| 4.6e-07 on weights and 1.5e-07 on running statistics. 1e-5 leaves room
# for other CPUs' kernels and stays far below the per-replica-BN difference (measured 5e-2).
TOL = 1e-5


def train_cfg(batch_size: int, sync_bn: bool) -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, batch_size=batch_size, shift=0, seed=3, sync_bn=sync_bn)


def ddp_worker(ctx: DistContext, splits: Splits, root: str) -> None:
    """Per rank: sync-BN run (keeping its epoch-1 checkpoint), per-replica-BN run, resumed run."""
    import training.train as train_mod

    root_path = Path(root)
    original = train_mod.save_checkpoint

    def keep_epoch1(path, model, optimizer, scheduler, generator, epoch, *rest, **kw):
        original(path, model, optimizer, scheduler, generator, epoch, *rest, **kw)
        if epoch == 1:
            shutil.copy(path, Path(path).parent / "epoch1.pt")

    train_mod.save_checkpoint = keep_epoch1
    summary = fit(splits, MODEL, train_cfg(B, True), root_path / "sync", dist=ctx)
    train_mod.save_checkpoint = original
    (root_path / f"summary_rank{ctx.rank}.json").write_text(json.dumps(summary))
    fit(splits, MODEL, train_cfg(B, False), root_path / "per_replica", dist=ctx)
    resume = root_path / "sync" / "epoch1.pt"
    fit(splits, MODEL, train_cfg(B, True), root_path / "resumed", resume=resume, dist=ctx)


@pytest.fixture(scope="module")
def splits() -> Splits:
    full = load_splits("digits", 0, 8, "L")
    n_train = 2 * B * STEPS
    return Splits(
        full.train.subset(np.arange(n_train)),
        full.val.subset(np.arange(64)),
        full.test.subset(np.arange(64)),
    )


@pytest.fixture(scope="module")
def root(splits: Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    run_on_ranks(ddp_worker, splits, str(root))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:  # the reference: one replica, plain nn.BatchNorm, batch 2B, no process group
        fit(splits, MODEL, train_cfg(2 * B, False), root / "reference", dist=DistContext())
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return root


def state(root: Path, run: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(root / run / "checkpoint.pt")["state_dict"]


def max_diffs(a: dict, b: dict) -> dict[str, float]:
    """Largest |a - b| over the weights, and over the BN running statistics."""
    out = {"weights": 0.0, "bn_stats": 0.0}
    for key, value in a.items():
        if key.endswith("num_batches_tracked"):
            continue
        kind = "bn_stats" if "running_" in key else "weights"
        out[kind] = max(out[kind], (value - b[key]).abs().max().item())
    return out


def test_sync_bn_on_two_ranks_equals_one_process_with_twice_the_batch(root):
    sync, ref = state(root, "sync"), state(root, "reference")
    assert list(sync) == list(ref)
    diffs = max_diffs(sync, ref)
    print(f"\nsync BN, 2 ranks x {B} vs 1 process x {2 * B}: max |diff| {diffs}")
    assert diffs["weights"] <= TOL and diffs["bn_stats"] <= TOL, diffs
    tracked = [v.item() for k, v in sync.items() if k.endswith("num_batches_tracked")]
    assert tracked == [EPOCHS * STEPS] * count_batchnorms(build_model(MODEL))


def test_without_sync_bn_the_statistics_differ(root):
    """Per-replica BN: rank 0's statistics come from its own 8 samples, not the global 16."""
    diffs = max_diffs(state(root, "per_replica"), state(root, "reference"))
    print(f"\nper-replica BN, 2 ranks x {B} vs 1 process x {2 * B}: max |diff| {diffs}")
    assert diffs["bn_stats"] > 1000 * TOL, diffs
    assert diffs["weights"] > 100 * TOL, diffs


def test_resumed_distributed_run_equals_the_uninterrupted_one(root):
    resumed, straight = state(root, "resumed"), state(root, "sync")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_rank0_writes_the_layout_and_every_rank_gets_the_summary(root):
    ckpt = load_checkpoint(root / "sync" / "checkpoint.pt")
    layout = {
        "world_size": 2,
        "per_replica_batch": B,
        "global_batch": 2 * B,
        "sync_bn": True,
        "backend": "gloo",
    }
    assert ckpt["distributed"] == layout
    summaries = [json.loads((root / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert summaries[0] == summaries[1] == json.loads((root / "sync" / "summary.json").read_text())
    assert summaries[0].items() >= layout.items()


def test_resume_refuses_a_different_number_of_processes(root, splits, tmp_path):
    ckpt = root / "sync" / "checkpoint.pt"
    with pytest.raises(ValueError, match="was trained by 2 processes under torchrun, this run is"):
        fit(splits, MODEL, train_cfg(B, True), tmp_path, resume=ckpt)


def test_torchrun_cli_two_processes_exports_a_bundle_that_verifies(tmp_path, capsys):
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "training.cli",
        "train",
        "--name=ddp",
        "--epochs=1",
        "--widths=4,8",
        "--hidden=8",
        "--batch-size=16",
        "--sync-bn",
        f"--runs-dir={tmp_path / 'runs'}",
        f"--models-dir={tmp_path / 'models'}",
    ]
    env = os.environ | LOOPBACK_ENV | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [ln for ln in proc.stdout.splitlines() if ln.startswith("trained ddp")]
    assert len(trained) == 1, proc.stdout  # rank 0 speaks, rank 1 stays quiet
    assert "[2 processes x batch 16, synchronized BN]" in trained[0]
    assert sum(ln.startswith("exported ") for ln in proc.stdout.splitlines()) == 1
    bundle = tmp_path / "models" / "ddp"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["sync_bn"] is True
    # Exported from plain BatchNorm: one BatchNormalization node per BN in the unfolded graph.
    n_bn = count_batchnorms(build_model(ModelConfig(widths=[4, 8], hidden=8)))
    assert manifest["files"]["unfolded"]["batchnorm_nodes"] == n_bn
    capsys.readouterr()
    assert main(["verify", str(bundle)]) == 0
    assert f"{bundle}: verified" in capsys.readouterr().out
