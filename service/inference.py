"""Images -> batch and logits -> predictions: what the data plane (service/dataplane.py) does
around inference for image requests. Protocol-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnfold.equivalence import softmax
from bnfold.errors import BnfoldError, PayloadTooLarge
from bnfold.preprocess import PreprocessSpec, preprocess_bytes
from service.schemas import ClassProbability, Prediction
from service.workers import run_cpu


@dataclass
class Upload:
    """One image as received: its bytes and, for multipart uploads, its file name."""

    data: bytes
    filename: str | None = None

    def describe(self, index: int) -> str:
        name = f" ({self.filename!r})" if self.filename else ""
        return f"image {index + 1}{name}"


def check_image_count(count: int, limit: int) -> None:
    if count > limit:
        raise PayloadTooLarge(
            f"{count} images in one request, over the limit of {limit}: split the batch"
        )


class Abandoned(Exception):
    """The request stopped waiting (its timeout): the decoding thread stops too."""


def images_to_batch(
    uploads: list[Upload],
    spec: PreprocessSpec,
    max_pixels: int,
    abandoned: threading.Event | None = None,
) -> np.ndarray:
    """Decode and preprocess every upload -> (N, C, H, W) float32; errors name the image.
    Stops before the next image once `abandoned` is set: 64 large images take many seconds,
    and a thread that went on after its request's 504 would hold up the requests behind it."""
    rows = []
    for i, upload in enumerate(uploads):
        if abandoned is not None and abandoned.is_set():
            raise Abandoned
        try:
            rows.append(preprocess_bytes(upload.data, spec, max_pixels))
        except BnfoldError as exc:
            prefix = upload.describe(i) if len(uploads) > 1 or upload.filename else "image"
            raise type(exc)(f"{prefix}: {exc.message}", exc.status_code) from None
    return np.stack(rows)


async def preprocess_uploads(
    uploads: list[Upload] | Callable[[], list[Upload]], spec: PreprocessSpec, max_pixels: int
) -> tuple[list[Upload], np.ndarray]:
    """images_to_batch in a CPU worker thread: decoding is work the event loop must not do.

    `uploads` may be a blocking function that yields them (a multipart body to parse): it runs
    in the same worker call, so the request takes one trip to a thread, not two.
    """
    abandoned = threading.Event()
    try:
        return await run_cpu(_uploads_to_batch, uploads, spec, max_pixels, abandoned)
    finally:
        abandoned.set()  # answered, or cancelled by its timeout: no image is decoded after


def _uploads_to_batch(
    uploads: list[Upload] | Callable[[], list[Upload]],
    spec: PreprocessSpec,
    max_pixels: int,
    abandoned: threading.Event,
) -> tuple[list[Upload], np.ndarray]:
    if callable(uploads):
        uploads = uploads()
    return uploads, images_to_batch(uploads, spec, max_pixels, abandoned)


def predictions(
    logits: np.ndarray,
    classes: list[str],
    top_k: int,
    filenames: list[str | None] | None = None,
    probabilities: bool = False,
) -> list[Prediction]:
    """One Prediction per row of (N, classes) logits, in row order; top_k clamped to classes.
    `probabilities`: the model's output already is the score (a final Softmax), used as it is."""
    probs = np.asarray(logits, np.float64) if probabilities else softmax(logits)  # (N, classes)
    k = min(top_k, len(classes))
    names = filenames or [None] * len(probs)
    out = []
    for row, filename in zip(probs, names, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        ranked = [ClassProbability(label=classes[i], index=int(i), probability=float(row[i]))
                  for i in order]  # fmt: skip
        out.append(Prediction(**ranked[0].model_dump(), filename=filename, top_k=ranked))
    return out
