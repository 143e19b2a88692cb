"""The two benchmark models as bundles the servers can load, and what folding them costs.

digits: the committed default bundle (models/digits), served as is; its torch module comes from
the training checkpoint when `make train` left one, else from the bundle's architecture with
random weights. heavy: ResNet-18 widths on 3 x 128 x 128, random weights with non-trivial running
statistics, folded and exported by the training code into the benchmark's work folder.
"""

from __future__ import annotations

import io
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from bnfold.bundle import Manifest, load_bundle
from bnfold.preprocess import PreprocessSpec
from training.data import digits_to_uint8, load_digits_dataset
from training.export import export_bundle
from training.fold import fold_batchnorm
from training.model import ModelConfig, build_model, count_batchnorms, resnet18_like

REPO = Path(__file__).resolve().parent.parent
DIGITS_BUNDLE = REPO / "models" / "digits"
DIGITS_CHECKPOINT = REPO / "runs" / "digits" / "checkpoint.pt"
SEED = 0


@dataclass
class BenchModel:
    """One model as every stage of the benchmark needs it."""

    name: str
    serve_dir: Path  # a models folder holding only this bundle: serve_dir/<name>/bundle.json
    module: nn.Module  # eval-mode torch model, BN unfolded
    folded_module: nn.Module  # fold_batchnorm's GraphModule
    spec: PreprocessSpec
    png: bytes  # the one payload every HTTP target receives
    weights: str  # where the weights came from, for the report
    fold_cost: dict = field(default_factory=dict)

    @property
    def bundle_dir(self) -> Path:
        return self.serve_dir / self.name

    @property
    def input_shape(self) -> tuple[int, int, int]:  # (C, H, W)
        return (self.spec.channels, self.spec.height, self.spec.width)


def prepare_digits(work: Path, eval_images: int) -> BenchModel:
    """The committed digits bundle, copied so its server sees only it; re-folded for the cost."""
    serve_dir = work / "serve-digits"
    shutil.copytree(DIGITS_BUNDLE, serve_dir / "digits")
    manifest = load_bundle(serve_dir / "digits")
    module, weights = _digits_module(manifest)
    x, png = _digits_images(eval_images)
    cost = measure_fold_cost(module, manifest, x, work / "refold-digits")
    cost["committed_bundle_equivalence"] = manifest.equivalence.model_dump()
    return BenchModel(
        name="digits",
        serve_dir=serve_dir,
        module=module,
        folded_module=fold_batchnorm(module)[0],
        spec=manifest.input.preprocess,
        png=png,
        weights=weights,
        fold_cost=cost,
    )


def _digits_module(manifest: Manifest) -> tuple[nn.Module, str]:
    """The trained torch model when a checkpoint exists, else the same architecture, random."""
    if DIGITS_CHECKPOINT.exists():
        from training.train import load_checkpoint, model_from_checkpoint

        module = model_from_checkpoint(load_checkpoint(DIGITS_CHECKPOINT))
        return module, f"trained ({DIGITS_CHECKPOINT.relative_to(REPO)})"
    cfg = ModelConfig.from_dict(manifest.architecture)
    return random_bn_model(cfg), "random (no runs/digits checkpoint; `make train` writes one)"


def _digits_images(n: int) -> tuple[np.ndarray, bytes]:
    """The first n handwritten digits, preprocessed (N, 1, 8, 8), and the first as a PNG."""
    first = digits_to_uint8(load_digits().images[:1])[0]  # (8, 8) uint8, ink high
    return load_digits_dataset().x[:n], encode_png(first)


def prepare_heavy(work: Path, size: int, eval_images: int) -> BenchModel:
    """ResNet-18-like model, random weights, folded and exported by the training code."""
    cfg = resnet18_like(size=size)
    module = random_bn_model(cfg)
    spec = PreprocessSpec(
        color_mode="RGB",
        height=size,
        width=size,
        resample="bilinear",
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    x = np.random.default_rng(SEED).normal(size=(eval_images, 3, size, size)).astype(np.float32)
    serve_dir = work / "serve-heavy"
    cost = _export_timed(module, "heavy", spec, x, serve_dir, cfg)
    cost["fold_s"] = time_fold(module)
    return BenchModel(
        name="heavy",
        serve_dir=serve_dir,
        module=module,
        folded_module=fold_batchnorm(module)[0],
        spec=spec,
        png=encode_png(synthetic_rgb(size)),
        weights=f"random (seed {SEED}; running statistics from 3 train-mode passes)",
        fold_cost=cost,
    )


def random_bn_model(cfg: ModelConfig, passes: int = 3, batch: int = 8) -> nn.Module:
    """Random weights; gamma/beta randomized and running statistics moved off 0/1."""
    torch.manual_seed(SEED)
    module = build_model(cfg)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    module.train()
    shape = (batch, cfg.in_channels, cfg.input_height, cfg.input_width)
    with torch.no_grad():
        for _ in range(passes):
            module(torch.randn(shape) * 0.8 + 0.1)
    return module.eval()


def measure_fold_cost(module: nn.Module, manifest: Manifest, x: np.ndarray, out: Path) -> dict:
    """Fold alone, then the whole fold + export + equivalence, into a scratch folder."""
    arch = ModelConfig(**manifest.architecture) if manifest.architecture else None
    cost = _export_timed(module, manifest.name, manifest.input.preprocess, x, out, arch)
    cost["fold_s"] = time_fold(module)
    return cost


def time_fold(module: nn.Module, repeats: int = 3) -> float:
    """Median seconds of fold_batchnorm (trace a copy, rewrite weights, drop BN nodes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fold_batchnorm(module)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _export_timed(
    module: nn.Module,
    name: str,
    spec: PreprocessSpec,
    x: np.ndarray,
    out_dir: Path,
    cfg: ModelConfig | None,
) -> dict:
    start = time.perf_counter()
    manifest = export_bundle(
        module,
        name=name,
        classes=[str(i) for i in range(10)],
        spec=spec,
        eval_x=x,
        split="benchmark",
        out_dir=out_dir,
        architecture=cfg.to_dict() if cfg else None,
    )
    seconds = time.perf_counter() - start
    bundle = out_dir / name
    return {
        "export_s": seconds,
        "bn_layers": count_batchnorms(module),
        "folded": sum(r.folded for r in manifest.fold_report),
        "refused": sum(not r.folded for r in manifest.fold_report),
        "onnx_mb": {v: (bundle / f.path).stat().st_size / 1e6 for v, f in manifest.files.items()},
        "equivalence": manifest.equivalence.model_dump(exclude={"per_layer"}),
    }


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_rgb(size: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: smooth gradients plus mild noise."""
    rng = np.random.default_rng(SEED)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    base = np.stack([np.outer(ramp, ramp), np.outer(1 - ramp, ramp), np.outer(ramp, 1 - ramp)], -1)
    noisy = base * 200 + rng.normal(0, 12, size=base.shape) + 20
    return np.clip(noisy, 0, 255).astype(np.uint8)
