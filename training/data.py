"""Data sets: the embedded digits (default) or a user's image folder, through the serving path.

Every image, whatever its source, becomes a tensor through `bnfold.preprocess`, the same code the
server runs on uploads, so training and serving cannot disagree on pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.preprocess import PreprocessSpec, preprocess_bytes, preprocess_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(Exception):
    """A data set problem the user can fix (missing folder, empty class, unreadable file)."""


@dataclass
class Dataset:
    x: np.ndarray  # (N, C, H, W) float32, preprocessed
    y: np.ndarray  # (N,) int64
    classes: list[str]
    spec: PreprocessSpec

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.classes, self.spec)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def digits_spec() -> PreprocessSpec:
    # 8-bit gray, ink high (white digit on black), scaled to 0..1 then standardized roughly.
    return PreprocessSpec(
        color_mode="L", height=8, width=8, resample="box", scale=1 / 255, mean=[0.3], std=[0.4]
    )


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """sklearn digits (values 0..16, ink high) -> 8-bit grayscale images (N, 8, 8)."""
    return np.round(images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1797 handwritten digits (offline), through the shared preprocessing."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    spec = digits_spec()
    pixels = digits_to_uint8(raw.images)
    x = np.stack([preprocess_uint8(img, spec) for img in pixels])
    return Dataset(x, raw.target.astype(np.int64), [str(c) for c in range(10)], spec)


def load_image_folder(root: Path, spec: PreprocessSpec) -> Dataset:
    """`root/<class>/*.png|jpg|...`: classes are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"{root}: need at least 2 class subfolders (root/<class>/*.png), found "
            f"{len(class_dirs)}"
        )
    xs, ys = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        for f in files:
            try:
                xs.append(preprocess_bytes(f.read_bytes(), spec))
            except BnfoldError as exc:
                raise DataError(f"{f}: unreadable image: {exc.message}") from None
            ys.append(label)
    return Dataset(np.stack(xs), np.asarray(ys, np.int64), [d.name for d in class_dirs], spec)


def stratified_split(ds: Dataset, seed: int, val: float = 0.15, test: float = 0.2) -> Splits:
    """Deterministic stratified train/val/test split: same seed, same split."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(ds.y == c)
        rng.shuffle(idx)
        n_test = max(1, round(len(idx) * test)) if len(idx) >= 3 else 0
        n_val = max(1, round(len(idx) * val)) if len(idx) >= 3 else 0
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    sets = {k: ds.subset(np.sort(np.concatenate(v))) for k, v in parts.items()}
    return Splits(**sets)
