"""The shared preprocessing: exact pixel math, format handling, and refusals with clear errors."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bnfold.errors import BadInput, PayloadTooLarge, UnsupportedMediaType
from bnfold.preprocess import PreprocessSpec, preprocess_bytes, preprocess_uint8

GRAY = PreprocessSpec(color_mode="L", height=8, width=8, resample="box", mean=[0.3], std=[0.4])
RGB = PreprocessSpec(color_mode="RGB", height=4, width=4, mean=[0.5, 0.4, 0.3], std=[0.2] * 3)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_gray_pixels_follow_the_formula_exactly():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    x = preprocess_bytes(png(pixels), GRAY)
    # Independent reference in float64; float32 result within one rounding of it.
    expected = (pixels.astype(np.float64) / 255 - 0.3) / 0.4
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], expected, rtol=0, atol=1e-6)


def test_file_and_in_memory_paths_agree_bit_for_bit():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    assert np.array_equal(preprocess_bytes(png(pixels), GRAY), preprocess_uint8(pixels, GRAY))


def test_rgb_is_channel_first_and_gray_input_is_converted():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    x = preprocess_bytes(png(rgb), RGB)
    assert x.shape == (3, 4, 4)
    np.testing.assert_allclose(x[0], (1.0 - 0.5) / 0.2, atol=1e-6)
    np.testing.assert_allclose(x[1], (0.0 - 0.4) / 0.2, atol=1e-6)
    # A grayscale upload fed to an RGB model gets the same value on every channel.
    g = preprocess_bytes(png(np.full((4, 4), 255, np.uint8)), RGB)
    np.testing.assert_allclose(
        g[:, 0, 0], [(1 - 0.5) / 0.2, (1 - 0.4) / 0.2, (1 - 0.3) / 0.2], atol=1e-6
    )


def test_resize_and_transparency():
    big = np.full((32, 32), 255, np.uint8)
    assert preprocess_bytes(png(big), GRAY).shape == (1, 8, 8)
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent: reads as background (0), not ink
    rgba[..., :3] = 255
    x = preprocess_bytes(png(rgba), GRAY)
    np.testing.assert_allclose(x, (0 - 0.3) / 0.4, atol=1e-6)


NOISE_PNG = png(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))


@pytest.mark.parametrize(
    ("data", "error", "text"),
    [
        (b"", BadInput, "empty image"),
        (b"hello, not an image", BadInput, "not a decodable image"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], BadInput, "corrupt or truncated image"),
        (NOISE_PNG[:20], BadInput, "truncated"),
        (b"\x89PNG\r\n\x1a\n", BadInput, "truncated or corrupt header"),
    ],
)
def test_bad_bytes_are_refused_with_a_message(data, error, text):
    with pytest.raises(error, match=text):
        preprocess_bytes(data, GRAY)


def test_unsupported_format_is_415():
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PCX")
    with pytest.raises(UnsupportedMediaType, match="unsupported image format PCX") as exc:
        preprocess_bytes(buf.getvalue(), GRAY)
    assert exc.value.status_code == 415


def test_decompression_bomb_is_refused_before_decoding():
    # A 5000x5000 PNG of zeros compresses to a few KB: small on the wire, huge in memory.
    data = png(np.zeros((5000, 5000), np.uint8))
    assert len(data) < 100_000
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000000 pixels"):
        preprocess_bytes(data, GRAY, max_pixels=1_000_000)


def test_spec_validates_channel_count():
    with pytest.raises(ValueError, match="mean and std need 3"):
        PreprocessSpec(color_mode="RGB", height=8, width=8, mean=[0.5], std=[0.5])


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def test_corrupt_tiff_tags_are_a_400_not_a_crash():
    # Found by fuzzing: a tag of the wrong type makes Pillow raise TypeError while loading.
    data = bytearray(_tiff(Image.fromarray(np.zeros((64, 64), np.uint16))))
    data[72] = 5
    with pytest.raises(BadInput, match="corrupt or truncated image"):
        preprocess_bytes(bytes(data), GRAY)


def test_image_in_a_mode_pillow_cannot_convert_is_415():
    lab = _tiff(Image.new("RGB", (8, 8)).convert("LAB"))
    with pytest.raises(UnsupportedMediaType, match="cannot convert a LAB image to L"):
        preprocess_bytes(lab, GRAY)


def test_exif_orientation_is_applied():
    """A camera JPEG stored sideways with orientation 6 reads as the upright picture."""
    upright = np.zeros((8, 8), np.uint8)
    upright[0, :] = 255  # a bar along the top
    stored = Image.fromarray(np.rot90(upright, 1).copy())  # as the camera wrote the pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    x = preprocess_bytes(buf.getvalue(), GRAY)
    top, bottom = x[0, 0].mean(), x[0, -1].mean()
    assert top > bottom  # the bar is on top, as displayed


def test_multi_picture_jpeg_is_accepted_as_jpeg():
    img = Image.fromarray(np.full((8, 8), 200, np.uint8)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="MPO", save_all=True, append_images=[img])
    x = preprocess_bytes(buf.getvalue(), GRAY)
    np.testing.assert_allclose(x, (200 / 255 - 0.3) / 0.4, atol=0.02)  # JPEG is lossy


def formula(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The pixel arithmetic written out over the whole image, in float32, as the formula
    reads: (value * scale - mean) / std per channel, then the layout's axis order."""
    x = pixels.astype(np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x * np.float32(spec.scale) - mean) / std  # (H, W, C)
    return x if spec.layout == "NHWC" else np.ascontiguousarray(x.transpose(2, 0, 1))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["L", "RGB"]),
    st.sampled_from(["NCHW", "NHWC"]),
    st.floats(1e-4, 10.0),
    st.lists(st.floats(-1000, 1000), min_size=3, max_size=3),
    st.lists(st.floats(1e-3, 1000), min_size=3, max_size=3),
)
def test_the_value_table_gives_the_formula_bit_for_bit(mode, layout, scale, mean, std):
    """Every 8-bit value of every channel (an image holding all 256 of them), any scale, mean,
    std and layout: the table lookup equals the arithmetic, bit for bit."""
    channels = 1 if mode == "L" else 3
    spec = PreprocessSpec(color_mode=mode, height=16, width=16, scale=scale, layout=layout,
                          mean=mean[:channels], std=std[:channels])  # fmt: skip
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pixels = values if mode == "L" else np.stack([values, values.T, values[::-1]], axis=2)
    x = preprocess_uint8(pixels, spec)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    # as bit patterns: assert_array_equal would take -0.0 for 0.0
    np.testing.assert_array_equal(x.view(np.uint32), formula(pixels, spec).view(np.uint32))
