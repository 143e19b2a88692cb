"""Images of a wider pixel type than 8 bits: scaled onto 0..255, or refused; never clipped.

Pillow's `convert('L')` clips 16-bit values at 255, so before the fix a 16-bit PNG of a digit
(values v * 257) reached the model as a saturated, nearly all-white image and was answered 200
with another probability than the same digit as an 8-bit PNG.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from bnfold.errors import UnsupportedMediaType
from bnfold.preprocess import PreprocessSpec, preprocess_bytes, preprocess_uint8

GRAY = PreprocessSpec(color_mode="L", height=8, width=8, resample="box", mean=[0.3], std=[0.4])
RGB = PreprocessSpec(color_mode="RGB", height=8, width=8, mean=[0.5] * 3, std=[0.2] * 3)
PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pgm16(pixels: np.ndarray) -> bytes:
    """Binary PGM, maxval 65535, big-endian samples (Pillow decodes it as mode 'I')."""
    h, w = pixels.shape
    return b"P5\n%d %d\n65535\n" % (w, h) + struct.pack(f">{h * w}H", *pixels.ravel().tolist())


SIXTEEN_BIT = {
    "PNG I;16": lambda p: encoded(Image.fromarray(p.astype(np.uint16) * 257), "PNG"),
    "TIFF I;16": lambda p: encoded(Image.fromarray(p.astype(np.uint16) * 257), "TIFF"),
    "PGM maxval 65535": lambda p: pgm16(p.astype(np.uint16) * 257),
    "TIFF 32-bit int 0..255": lambda p: encoded(Image.fromarray(p.astype(np.int32)), "TIFF"),
    "TIFF float 0..255": lambda p: encoded(Image.fromarray(p.astype(np.float32)), "TIFF"),
}


@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["L", "RGB"])
@pytest.mark.parametrize("kind", list(SIXTEEN_BIT))
def test_wide_images_give_the_tensor_of_the_same_8bit_image(kind, spec):
    """v * 257 / 257 is v exactly, so the tensor equals the 8-bit image's bit for bit."""
    data = SIXTEEN_BIT[kind](PIXELS)
    expected = preprocess_uint8(PIXELS, GRAY)
    if spec is RGB:
        expected = preprocess_uint8(np.repeat(PIXELS[:, :, None], 3, axis=2), RGB)
    assert np.array_equal(preprocess_bytes(data, spec), expected)


def test_sixteen_bit_values_round_to_the_nearest_8bit_level():
    wide = np.array([[0, 128, 129, 65535, 32767, 32768, 257 * 100 + 128, 257 * 100 + 129]] * 8)
    x = preprocess_bytes(encoded(Image.fromarray(wide.astype(np.uint16)), "PNG"), GRAY)
    levels = np.rint(wide[0] * 255 / 65535)  # float64 reference of round(v * 255 / 65535)
    np.testing.assert_array_equal(x[0, 0], preprocess_uint8(np.tile(levels, (8, 1)).astype(
        np.uint8), GRAY)[0, 0])  # fmt: skip


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((8, 8), 1000, np.int32), "a 32-bit integer grayscale image with values from "
         "1000 to 1000: its pixel range is unknown; send an 8-bit or 16-bit image"),
        (np.full((8, 8), 0.5, np.float32) - np.eye(8, dtype=np.float32), "a floating-point "
         "grayscale image with values from -0.5 to 0.5: its pixel range is unknown"),
    ],
)  # fmt: skip
def test_wide_images_of_unknown_range_are_415(pixels, message):
    with pytest.raises(UnsupportedMediaType) as info:
        preprocess_bytes(encoded(Image.fromarray(pixels), "TIFF"), GRAY)
    assert info.value.message.startswith(message)


def test_sixteen_bit_png_predicts_as_the_8bit_png(client, digits):
    digit = digits[0]
    wide = encoded(Image.fromarray(digit.pixels.astype(np.uint16) * 257), "PNG")
    narrow = client.post("/v1/models/digits/predict", files={"files": ("d.png", digit.png)})
    r = client.post("/v1/models/digits/predict", files={"files": ("d.png", wide)})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == narrow.json()["predictions"]
    r = client.post(
        "/v1/models/digits/predict",
        files={
            "files": ("d.tif", encoded(Image.fromarray(np.full((8, 8), 9e3, np.float32)), "TIFF"))
        },
    )
    assert r.status_code == 415 and "send an 8-bit or 16-bit image" in r.json()["error"]
