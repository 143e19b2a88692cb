"""Fixtures shared by the service and end-to-end tests: the bundle, digit PNGs, and the
independent reference (the bundle's ONNX run directly by onnxruntime, outside the service).
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The shipped bundle; BNFOLD_TEST_BUNDLE points elsewhere (e.g. a freshly trained one).
BUNDLE_SRC = Path(os.environ.get("BNFOLD_TEST_BUNDLE", REPO / "models" / "digits"))


def variants_phrase(bundle: Path = BUNDLE_SRC) -> str:
    """The variants a bundle serves as the server names them in errors: "'folded' or 'unfolded'",
    or "'folded', 'unfolded' or 'int8'" for a bundle with an int8 file."""
    import json

    names = [repr(v) for v in json.loads((bundle / "bundle.json").read_text())["files"]]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


SERVED_VARIANTS = variants_phrase() if (BUNDLE_SRC / "bundle.json").is_file() else "?"
GRAPH_OPT = {
    "folded": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "unfolded": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


@dataclass(frozen=True)
class Digit:
    png: bytes
    label: int
    pixels: np.ndarray  # (8, 8) uint8, white ink on black


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bundle_src() -> Path:
    if not (BUNDLE_SRC / "bundle.json").is_file():
        pytest.fail(f"no bundle at {BUNDLE_SRC}: run `make train` (or set BNFOLD_TEST_BUNDLE)")
    return BUNDLE_SRC


@pytest.fixture(scope="session")
def models_dir(bundle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the bundle, so no test can touch the shipped one."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(bundle_src, root / "digits")
    return root


@pytest.fixture(scope="session")
def digits() -> list[Digit]:
    """The first 30 scikit-learn digits as 8x8 PNGs (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = np.round(raw.images[:30] * (255.0 / 16.0)).astype(np.uint8)
    return [Digit(png_bytes(p), int(t), p) for p, t in zip(pixels, raw.target[:30], strict=True)]


class DirectOnnx:
    """The bundle's ONNX files in plain onnxruntime sessions: the reference the server must
    match bit for bit at the same batch (same graph optimization level per variant)."""

    def __init__(self, bundle: Path) -> None:
        self.sessions = {}
        for variant, level in GRAPH_OPT.items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            self.sessions[variant] = ort.InferenceSession(
                str(bundle / f"{variant}.onnx"), opts, providers=["CPUExecutionProvider"]
            )

    def logits(self, x: np.ndarray, variant: str = "folded") -> np.ndarray:
        return self.sessions[variant].run(["logits"], {"input": x})[0]


@pytest.fixture(scope="session")
def direct(bundle_src: Path) -> DirectOnnx:
    return DirectOnnx(bundle_src)


@pytest.fixture(scope="session")
def digit_batch(digits: list[Digit], bundle_src: Path) -> np.ndarray:
    """The digits through the shared preprocessing: (N, 1, 8, 8) float32."""
    from bnfold.bundle import read_manifest
    from bnfold.preprocess import preprocess_bytes

    spec = read_manifest(bundle_src).input.preprocess
    return np.stack([preprocess_bytes(d.png, spec) for d in digits])
