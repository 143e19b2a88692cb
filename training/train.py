"""Train a BNNet: seeded, deterministic on CPU, checkpointed, resumable, with metrics and a plot.

Read top to bottom: train_one_epoch(), evaluate(), fit() (the loop), then checkpoint helpers.
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
from training.model import ModelConfig, build_model

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
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    """Same seed, same weights: seeds every RNG and asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
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
) -> dict:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=None)
    for x, y in bar:
        x = random_shift(x, shift, generator)
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
    return {"train_loss": total_loss / seen, "train_acc": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> dict:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = torch.from_numpy(x[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size])
        logits = model(xb)
        total_loss += loss_fn(logits, yb).item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(1, len(y))
    return {"loss": total_loss / n, "acc": correct / n}


def make_loader(splits: Splits, batch_size: int, generator: torch.Generator):
    ds = torch.utils.data.TensorDataset(
        torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    )
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
) -> dict:
    """Train (or resume), write checkpoint.pt, metrics.jsonl and curves.png to run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(train_cfg.seed)
    model = build_model(model_cfg)
    loader = make_loader(splits, train_cfg.batch_size, generator)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_cfg.lr, total_steps=max(1, train_cfg.epochs * len(loader))
    )
    start_epoch, history = 0, []
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    metrics_path = run_dir / "metrics.jsonl"
    if resume is None and metrics_path.exists():
        metrics_path.unlink()
    for epoch in range(start_epoch, train_cfg.epochs):
        t0 = time.perf_counter()
        row = {"epoch": epoch + 1}
        desc = f"epoch {epoch + 1}/{train_cfg.epochs}"
        row |= train_one_epoch(
            model, loader, optimizer, scheduler, loss_fn, desc, train_cfg.shift, generator
        )
        val = evaluate(model, splits.val.x, splits.val.y)
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
        )
    test = evaluate(model, splits.test.x, splits.test.y)
    summary = {
        "epochs": train_cfg.epochs,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "val_acc": history[-1]["val_acc"] if history else None,
        "n_train": len(splits.train.y),
        "n_val": len(splits.val.y),
        "n_test": len(splits.test.y),
        "seed": train_cfg.seed,
    }
    plot_curves(history, run_dir / "curves.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_checkpoint(
    path, model, optimizer, scheduler, generator, epoch, history, model_cfg, train_cfg, splits
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
