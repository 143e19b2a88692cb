"""Image -> model input tensor: the one preprocessing implementation, for training and serving.

decode -> color mode -> resize -> scale -> normalize, in numpy/Pillow only (no torch), so the
trained model and the served model can never see different pixels. The parameters live in the
bundle manifest (`PreprocessSpec`); training writes them, the service reads them.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bnfold.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

ColorMode = str  # "L" (grayscale, 1 channel) or "RGB" (3 channels)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}

# Formats Pillow may decode for us; anything else is refused with 415 before decoding.
SUPPORTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP", "PPM")

DEFAULT_MAX_PIXELS = 4096 * 4096


class PreprocessSpec(BaseModel):
    """How raw images become the model's input tensor (stored in bundle.json)."""

    model_config = ConfigDict(extra="forbid")

    color_mode: str = Field(pattern="^(L|RGB)$", description="'L' grayscale or 'RGB'.")
    height: int = Field(ge=1, le=4096, description="Model input height in pixels.")
    width: int = Field(ge=1, le=4096, description="Model input width in pixels.")
    resample: str = Field(
        default="bilinear",
        pattern="^(nearest|bilinear|bicubic|box|lanczos)$",
        description="Pillow resampling filter used when the image size differs.",
    )
    scale: float = Field(default=1.0 / 255.0, gt=0, description="Multiplies uint8 pixel values.")
    mean: list[float] = Field(description="Per-channel mean subtracted after scaling.")
    std: list[float] = Field(description="Per-channel std dividing after the mean.")
    layout: Literal["NCHW", "NHWC"] = Field(
        default="NCHW",
        description="Axis order of the model input: NCHW (PyTorch, the default) or NHWC "
        "(Keras/TensorFlow exports).",
    )

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @model_validator(mode="after")
    def _check_channels(self) -> PreprocessSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need {self.channels} value(s) for color_mode {self.color_mode!r}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class OverBudget(Exception):
    """The image has more pixels than the caller's `budget`: not an error in the image, a sign
    for the caller to decode it elsewhere (the server decodes small images on its event loop)."""


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, budget: int | None = None
) -> Image.Image:
    """Decode bytes into a fully loaded Pillow image, refusing bombs, junk and odd formats.

    With a `budget` of pixels, an image over it raises OverBudget after reading its header
    only, before any pixel is decoded.
    """
    if not data:
        raise BadInput("empty image: the file or body has no bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between max_pixels and 2x; we check the size ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in SUPPORTED_FORMATS:
                raise UnsupportedMediaType(
                    f"unsupported image format {fmt}; send one of {', '.join(SUPPORTED_FORMATS)}"
                )
            w, h = img.size
            if w * h > max_pixels:
                raise PayloadTooLarge(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels"
                )
            if budget is not None and w * h > budget:
                raise OverBudget(w * h)
            img.load()
    except (UnsupportedMediaType, PayloadTooLarge, OverBudget):
        raise
    except UnidentifiedImageError:
        raise BadInput(
            "not a decodable image (unknown format, or a truncated or corrupt header): "
            "send PNG, JPEG, BMP, GIF, TIFF or WEBP bytes"
        ) from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
        # Pillow's decoders raise all of these on corrupt data (TIFF tags of the wrong type, ...).
        raise BadInput(f"corrupt or truncated image: {exc}") from None
    return img


def image_to_tensor(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Color-convert, resize, scale and normalize one image.

    Returns (C, H, W) float32, or (H, W, C) when `spec.layout` is NHWC.
    """
    try:
        img = _to_color_mode(img, spec.color_mode)
    except (ValueError, OSError, TypeError) as exc:
        raise UnsupportedMediaType(
            f"cannot convert a {img.mode} image to {spec.color_mode}: {exc}; "
            "send an 8-bit grayscale, RGB or RGBA image"
        ) from None
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), RESAMPLE[spec.resample])
    pixels = np.asarray(img)  # (H, W) or (H, W, 3) uint8
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    table = value_table(spec.scale, tuple(spec.mean), tuple(spec.std))  # (C, 256)
    if spec.layout == "NHWC":
        x = np.empty(pixels.shape, np.float32)  # (H, W, C)
        for c in range(pixels.shape[2]):
            np.take(table[c], pixels[:, :, c], out=x[:, :, c], mode="clip")
        return x
    x = np.empty((pixels.shape[2], *pixels.shape[:2]), np.float32)  # (C, H, W)
    for c in range(pixels.shape[2]):
        np.take(table[c], pixels[:, :, c], out=x[c], mode="clip")
    return x


@functools.lru_cache(maxsize=64)
def value_table(scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: entry [c, v] is what pixel value v of channel c becomes,
    (v * scale - mean[c]) / std[c], each operation in float32 as a whole image would compute
    it. Looking the pixels up in it gives those values bit for bit, in one pass instead of
    three and without the float32 copies of the image. (The lookups use mode="clip" only so
    that numpy writes straight into the output: a uint8 index is always in 0..255.)"""
    values = np.arange(256, dtype=np.float32)[None, :]  # (1, 256)
    mean_c = np.asarray(mean, dtype=np.float32)[:, None]  # (C, 1)
    std_c = np.asarray(std, dtype=np.float32)[:, None]
    table = (values * np.float32(scale) - mean_c) / std_c
    table.flags.writeable = False  # shared by every call
    return table


def _to_color_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """Upright (EXIF orientation applied), alpha composited on black, in the model's mode."""
    if img.getexif().get(0x0112, 1) != 1:  # orientation tag: camera pictures taken sideways
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _wide_gray_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black so transparent pixels read as background (no ink), not garbage.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(color_mode)


def _wide_gray_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grayscale image as 8-bit 'L', its range mapped onto 0..255.

    Pillow's own convert clips these at 255 instead of scaling, so a 16-bit PNG (values up to
    65535) would turn into a saturated, nearly all-white image. 16-bit images (modes I;16*, and
    PPM/PGM with maxval over 255, which Pillow decodes as 'I' scaled to 0..65535) are scaled by
    255/65535 with rounding. Other 32-bit integer or float images have no fixed range: served
    as they are when their values lie in 0..255, refused otherwise.
    """
    pixels = np.asarray(img)  # (H, W): uint16, int32 or float32
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM"):
        wide = np.clip(pixels.astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if not (low >= 0 and high <= 255):  # NaN fails too
        kind = "floating-point" if img.mode == "F" else "32-bit integer"
        raise UnsupportedMediaType(
            f"a {kind} grayscale image with values from {low:g} to {high:g}: its pixel range "
            "is unknown; send an 8-bit or 16-bit image (values 0..255 or 0..65535)"
        )
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "L")


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Raw image bytes -> (C, H, W) float32 model input ((H, W, C) for NHWC)."""
    return image_to_tensor(decode_image(data, max_pixels), spec)


def preprocess_uint8(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """An in-memory uint8 image, (H, W) gray or (H, W, 3) RGB -> (C, H, W) float32.

    Goes through Pillow exactly as decoded files do, so training data takes the serving path.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    return image_to_tensor(Image.fromarray(pixels), spec)


GENERATED_INPUTS = (
    "uniform random 8-bit pixels (each value 0..255 equally likely, numpy default_rng seed {seed}) "
    "at the model's input size, through this preprocessing"
)


def generated_batch(spec: PreprocessSpec, n: int, seed: int = 0) -> np.ndarray:
    """n random images through the serving path: (N, C, H, W) float32 ((N, H, W, C) for NHWC).

    For checking equivalence when no sample images are given; GENERATED_INPUTS describes it.
    """
    rng = np.random.default_rng(seed)
    shape = (n, spec.height, spec.width) + ((3,) if spec.channels == 3 else ())
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return np.stack([preprocess_uint8(p, spec) for p in pixels])
