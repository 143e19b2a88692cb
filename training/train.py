"""Train a BNNet: seeded, deterministic on CPU, checkpointed, resumable, with metrics and a plot.

Read top to bottom: train_one_epoch(), evaluate(), fit() (the loop), then checkpoint helpers.
One process by default; under torchrun, fit(dist=...) trains data-parallel
(training/distributed.py).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.data import Splits
from training.distributed import (
    DistContext,
    epoch_generator,
    prepare_model,
    shard_loader,
    wrap_ddp,
)
from training.model import ModelConfig, build_model
from training.sync_bn import revert_sync_batchnorm

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    label_smoothing: float = 0.1
    shift: int = 1  # random translation augmentation, in pixels (0 = off)
    sync_bn: bool = False  # distributed only: BN statistics over the global batch
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int, warn_only: bool = False) -> torch.Generator:
    """Same seed, same weights: seeds every RNG and asks torch for deterministic kernels.

    warn_only for CUDA, where some backward kernels (adaptive average pooling) have no
    deterministic implementation.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    return torch.Generator().manual_seed(seed)


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `shift` pixels; edges replicate (the background)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape  # (N, C, H, W)
    padded = nn.functional.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    loss_fn,
    desc: str,
    shift: int = 0,
    generator: torch.Generator | None = None,
    dist: DistContext | None = None,
) -> dict:
    """One pass over the loader. Distributed: this rank's shard; the figures are global."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    show = dist is None or dist.is_main
    bar = tqdm(loader, desc=desc, leave=False, disable=None if show else True)
    for x, y in bar:
        x = random_shift(x, shift, generator)
        if dist is not None:
            x, y = x.to(dist.device), y.to(dist.device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    if dist is not None:
        total_loss, correct, seen = dist.all_reduce_sum([total_loss, correct, seen])
    return {"train_loss": total_loss / seen, "train_acc": correct / seen}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 512,
    device: torch.device | None = None,
) -> dict:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = torch.from_numpy(x[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size])
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        total_loss += loss_fn(logits, yb).item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(1, len(y))
    return {"loss": total_loss / n, "acc": correct / n}


def train_dataset(splits: Splits) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(
        torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    )


def make_loader(splits: Splits, batch_size: int, generator: torch.Generator):
    ds = train_dataset(splits)
    # drop_last avoids a final batch of 1, where BatchNorm's batch variance is undefined.
    drop_last = len(ds) > batch_size
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last
    )


def fit(
    splits: Splits,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: Path,
    resume: Path | None = None,
    dist: DistContext | None = None,
) -> dict:
    """Train (or resume), write checkpoint.pt, metrics.jsonl and curves.png to run_dir.

    dist=None: one process. Otherwise data-parallel (DDP) on this rank's shard with
    train_cfg.batch_size per replica; only rank 0 evaluates and writes, every rank gets the
    summary. Synchronized BN is turned back into nn.BatchNorm before the final evaluation; its
    state dict has BatchNorm's keys, so every checkpoint loads into the plain model.
    """
    run_dir = Path(run_dir)
    main = dist is None or dist.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = None if dist is None else dist.device
    generator = seed_everything(
        train_cfg.seed, warn_only=device is not None and device.type == "cuda"
    )
    model = build_model(model_cfg)
    if dist is None:
        loader, sampler = make_loader(splits, train_cfg.batch_size, generator), None
    else:
        model = prepare_model(model, dist, train_cfg.sync_bn)
        dataset = train_dataset(splits)
        loader, sampler = shard_loader(dataset, train_cfg.batch_size, train_cfg.seed, dist)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_cfg.lr, total_steps=max(1, train_cfg.epochs * len(loader))
    )
    start_epoch, history = 0, []
    if resume is not None:
        ckpt = load_for_resume(resume, dist)
        check_same_architecture(resume, ckpt["model_config"], model_cfg)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
        if start_epoch >= train_cfg.epochs:
            # Nothing would train, and the export would describe weights it did not make.
            raise ValueError(
                f"{resume} already trained {start_epoch} epochs: pass --epochs greater than "
                f"{start_epoch} to continue it"
            )
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    net = model if dist is None else wrap_ddp(model, dist)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    metrics_path = run_dir / "metrics.jsonl"
    if main and resume is None and metrics_path.exists():
        metrics_path.unlink()
    for epoch in range(start_epoch, train_cfg.epochs):
        t0 = time.perf_counter()
        row = {"epoch": epoch + 1}
        desc = f"epoch {epoch + 1}/{train_cfg.epochs}"
        if dist is not None:
            sampler.set_epoch(epoch)  # a new permutation each epoch, the same on every rank
            generator = epoch_generator(train_cfg.seed, epoch, dist.rank)
        row |= train_one_epoch(
            net, loader, optimizer, scheduler, loss_fn, desc, train_cfg.shift, generator, dist
        )
        if not main:
            continue
        val = evaluate(model, splits.val.x, splits.val.y, device=device)
        row |= {"val_loss": val["loss"], "val_acc": val["acc"]}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info(
            "%s loss %.4f acc %.3f val_acc %.3f",
            desc,
            row["train_loss"],
            row["train_acc"],
            row["val_acc"],
        )
        save_checkpoint(
            run_dir / "checkpoint.pt",
            model,
            optimizer,
            scheduler,
            generator,
            epoch + 1,
            history,
            model_cfg,
            train_cfg,
            splits,
            distributed_info(dist, train_cfg),
        )
    if dist is not None:
        model = revert_sync_batchnorm(model)
    summary = None
    if main:
        summary = finish(model, splits, train_cfg, history, run_dir, dist)
    return summary if dist is None else dist.broadcast_object(summary)


def finish(
    model: nn.Module,
    splits: Splits,
    train_cfg: TrainConfig,
    history: list[dict],
    run_dir: Path,
    dist: DistContext | None,
) -> dict:
    """Test accuracy, summary.json and curves.png (rank 0)."""
    test = evaluate(
        model, splits.test.x, splits.test.y, device=None if dist is None else dist.device
    )
    summary = run_summary(test, history, splits, train_cfg.seed)
    if dist is not None:
        summary |= distributed_info(dist, train_cfg)
    plot_curves(history, run_dir / "curves.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_summary(test: dict, history: list[dict], splits: Splits, seed: int) -> dict:
    """What a run measured: epochs trained, test metrics, the last validation accuracy and the
    split sizes (summary.json, and the bundle's training metadata)."""
    return {
        "epochs": len(history),
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "val_acc": history[-1]["val_acc"] if history else None,
        "n_train": len(splits.train.y),
        "n_val": len(splits.val.y),
        "n_test": len(splits.test.y),
        "seed": seed,
    }


def distributed_info(dist: DistContext | None, train_cfg: TrainConfig) -> dict | None:
    """How a data-parallel run was laid out (None for one process without torchrun)."""
    if dist is None:
        return None
    return {
        "world_size": dist.world_size,
        "per_replica_batch": train_cfg.batch_size,
        "global_batch": train_cfg.batch_size * dist.world_size,
        "sync_bn": bool(train_cfg.sync_bn and dist.world_size > 1),
        "backend": dist.backend,
    }


def load_for_resume(path: Path, dist: DistContext | None) -> dict:
    """Rank 0 reads the checkpoint and sends it to the others (no shared disk needed).

    Refuses a checkpoint from a different number of processes: the data order and the length of
    the learning-rate schedule depend on it.
    """
    if dist is None:
        ckpt = load_checkpoint(path)
    else:
        ckpt = dist.broadcast_object(load_checkpoint(path) if dist.is_main else None)
    saved = (ckpt.get("distributed") or {}).get("world_size")
    now = None if dist is None else dist.world_size
    if saved != now:
        raise ValueError(
            f"{path} was trained by {_describe_layout(saved)}, this run is "
            f"{_describe_layout(now)}: resume with the same number of processes"
        )
    return ckpt


def check_same_architecture(path: Path, saved: dict, now: ModelConfig) -> None:
    """A resume continues the same model: name the flags that differ instead of a shape error."""
    differ = [
        f"{k}={saved.get(k)!r} (this run {v!r})"
        for k, v in now.to_dict().items()
        if k in saved and _plain(saved[k]) != _plain(v)
    ]
    if differ:
        raise ValueError(
            f"{path} was trained with {', '.join(differ)}: resume with the same model flags"
        )


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _describe_layout(world_size: int | None) -> str:
    return "one process" if world_size is None else f"{world_size} processes under torchrun"


def save_checkpoint(
    path,
    model,
    optimizer,
    scheduler,
    generator,
    epoch,
    history,
    model_cfg,
    train_cfg,
    splits,
    distributed: dict | None = None,
) -> None:
    ckpt = {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": generator.get_state(),
        "epoch": epoch,
        "history": history,
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(train_cfg),
        "classes": list(splits.train.classes),
        "preprocess": splits.train.spec.model_dump(),
    }
    if distributed is not None:
        ckpt["distributed"] = distributed
    tmp = Path(path).with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint safely (weights_only=True: tensors and plain Python values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax2.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax2.plot(epochs, [r["val_acc"] for r in history], label="val")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
