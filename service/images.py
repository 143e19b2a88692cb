"""Image pre- and post-processing: uploads -> (N, C, H, W) batch, logits -> predictions.

What the data plane (service/dataplane.py) does around inference for image requests. The
uploads come already parsed from the request body (the protocol's job, service/api/bodies.py);
nothing here knows a protocol.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from bnfold.equivalence import softmax
from bnfold.errors import BnfoldError, PayloadTooLarge
from bnfold.preprocess import OverBudget, PreprocessSpec, decode_image, image_to_tensor
from service.schemas import Prediction
from service.threads import INLINE_BYTES, LONE_BYTES, CpuThreads


@dataclass
class Upload:
    """One image as received: its bytes and, for multipart uploads, its file name."""

    data: bytes
    filename: str | None = None

    def describe(self, index: int) -> str:
        name = f" ({self.filename!r})" if self.filename else ""
        return f"image {index + 1}{name}"


def too_many_images(limit: int, count: int | None = None) -> PayloadTooLarge:
    """The one refusal of a request over BNFOLD_MAX_IMAGES_PER_REQUEST; `count` None when the
    parser stopped at the first image over the limit."""
    how_many = f"{count} images" if count is not None else f"more than {limit} images"
    over = f", over the limit of {limit}" if count is not None else ""
    return PayloadTooLarge(f"{how_many} in one request{over}: split the batch")


def check_image_count(count: int, limit: int) -> None:
    if count > limit:
        raise too_many_images(limit, count)


class Abandoned(Exception):
    """The request stopped waiting (its timeout): the decoding thread stops too."""


# Images this small are decoded on the event loop itself (service.threads: the hand-off to a
# thread costs about as much). With INLINE_BYTES, this keeps the loop's own stall for one request
# well under a millisecond; larger work goes to a CPU thread, where Pillow's decoders release the
# GIL. Each image counts its own pixels or the model's input size, whichever is more.
INLINE_PIXELS = 16_384  # 128 x 128
# A request alone in its worker (service.threads) has plain PNGs up to this many pixels decoded
# on the loop too: nothing else waits for it, and the trip to a thread is two thread wake-ups.
LONE_PIXELS = 262_144  # 512 x 512


# PNG chunks that cost nothing to read: anything else (compressed text, ICC profiles, ...) may
# hide megabytes that Pillow inflates while it opens the file, before any size is known.
PLAIN_PNG_CHUNKS = frozenset(
    {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"sRGB", b"pHYs", b"cHRM", b"bKGD"}
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plain_png(data: bytes) -> bool:
    """A PNG made of PLAIN_PNG_CHUNKS only (what encoders write for a plain image): decoding it
    costs what its pixels cost. Other formats and other PNGs are decoded in a thread."""
    if not data.startswith(PNG_SIGNATURE):
        return False
    at, end = len(PNG_SIGNATURE), len(data)
    while at + 8 <= end:
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        if kind not in PLAIN_PNG_CHUNKS:
            return False
        if kind == b"IEND":
            return True
        at += 12 + length  # length, type, data, CRC
    return False  # cut short: Pillow's error for it comes from the thread


def images_to_batch(
    uploads: list[Upload],
    spec: PreprocessSpec,
    max_pixels: int,
    abandoned: threading.Event | None = None,
    budget: int | None = None,
) -> np.ndarray:
    """Decode and preprocess every upload -> (N, C, H, W) float32; errors name the image.
    Stops before the next image once `abandoned` is set: 64 large images take many seconds,
    and a thread that went on after its request's 504 would hold up the requests behind it.
    With a `budget` of pixels (each image counts its own pixels or the model's input size,
    whichever is more), OverBudget is raised as soon as the images would exceed it."""
    out_pixels = spec.height * spec.width
    if budget is not None and len(uploads) * out_pixels > budget:
        raise OverBudget(len(uploads) * out_pixels)
    rows = []
    for i, upload in enumerate(uploads):
        if abandoned is not None and abandoned.is_set():
            raise Abandoned
        try:
            img = decode_image(upload.data, max_pixels, budget)
            if budget is not None:
                budget -= max(img.width * img.height, out_pixels)
            rows.append(image_to_tensor(img, spec))
        except BnfoldError as exc:
            prefix = upload.describe(i) if len(uploads) > 1 or upload.filename else "image"
            raise type(exc)(f"{prefix}: {exc.message}", exc.status_code) from None
    return np.stack(rows)


async def preprocess_uploads(
    uploads: list[Upload], spec: PreprocessSpec, max_pixels: int, threads: CpuThreads
) -> np.ndarray:
    """The images decoded and preprocessed: (N, C, H, W) float32, in upload order.

    Small requests of plain PNGs (INLINE_BYTES, INLINE_PIXELS, plain_png) are done here on the
    event loop, and so are larger ones (LONE_BYTES, LONE_PIXELS) of a request alone in the
    worker; the rest, or a request found over its pixel budget part way, in one trip to a CPU
    thread.
    """
    nbytes = sum(len(u.data) for u in uploads)
    if nbytes <= INLINE_BYTES:
        budget = INLINE_PIXELS
    elif nbytes <= LONE_BYTES and threads.alone():
        budget = LONE_PIXELS
    else:
        budget = 0
    if budget and all(plain_png(u.data) for u in uploads):
        try:
            return images_to_batch(uploads, spec, max_pixels, budget=budget)
        except OverBudget:
            pass
    abandoned = threading.Event()
    try:
        return await threads.offload(images_to_batch, uploads, spec, max_pixels, abandoned)
    finally:
        abandoned.set()  # answered, or cancelled by its timeout: no image is decoded after


def predictions(
    logits: np.ndarray,
    classes: list[str],
    top_k: int,
    filenames: list[str | None] | None = None,
    probabilities: bool = False,
) -> list[Prediction]:
    """One Prediction per row of (N, classes) logits, in row order; top_k clamped to classes.
    `probabilities`: the model's output already is the score (a final Softmax), used as it is.
    Ties rank the lower class index first."""
    probs = np.asarray(logits, np.float64) if probabilities else softmax(logits)  # (N, classes)
    k = min(top_k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k), every row in one call
    top = np.take_along_axis(probs, order, axis=1)  # (N, k)
    names = filenames or [None] * len(probs)
    out = []
    for indices, scores, filename in zip(order.tolist(), top.tolist(), names, strict=True):
        ranked = [{"label": classes[i], "index": i, "probability": p}
                  for i, p in zip(indices, scores, strict=True)]  # fmt: skip
        out.append(Prediction(**ranked[0], filename=filename, top_k=ranked))
    return out
