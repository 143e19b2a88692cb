"""Data: digits through the serving preprocessing, image folders, deterministic splits."""

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from bnfold.preprocess import PreprocessSpec, preprocess_bytes
from training.data import (
    DataError,
    digits_spec,
    digits_to_uint8,
    load_digits_dataset,
    load_image_folder,
    stratified_split,
)

SPEC = PreprocessSpec(color_mode="L", height=8, width=8, mean=[0.5], std=[0.25])


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_take_the_same_path_as_an_uploaded_png():
    ds = load_digits_dataset()
    raw = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.classes == [str(i) for i in range(10)]
    # The server decodes a PNG of the same 8-bit image: bit-identical tensor.
    img = digits_to_uint8(raw.images[:1])[0]
    assert np.array_equal(preprocess_bytes(_png(img), digits_spec()), ds.x[0])
    # Ink is high: 16 -> 255, 0 -> 0.
    assert digits_to_uint8(np.array([[0, 8, 16]]))[0].tolist() == [0, 128, 255]


def test_split_is_deterministic_stratified_and_disjoint():
    ds = load_digits_dataset()
    a, b = stratified_split(ds, seed=3), stratified_split(ds, seed=3)
    c = stratified_split(ds, seed=4)
    assert np.array_equal(a.test.x, b.test.x) and not np.array_equal(a.test.x, c.test.x)
    assert len(a.train.y) + len(a.val.y) + len(a.test.y) == 1797
    for part in (a.train, a.val, a.test):  # every class in every split, near 20% in test
        assert set(part.y.tolist()) == set(range(10))
    counts = np.bincount(a.test.y) / np.bincount(ds.y)
    assert np.all(np.abs(counts - 0.2) < 0.02)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_classes_sorted_any_size_gray_or_rgb(tmp_path):
    _write(tmp_path / "zebra" / "a.png", np.full((20, 30), 200, np.uint8))
    _write(tmp_path / "apple" / "b.jpg", np.zeros((5, 5, 3), np.uint8))
    _write(tmp_path / "apple" / "c.png", np.full((8, 8, 3), 255, np.uint8))
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, SPEC)
    assert ds.classes == ["apple", "zebra"]
    assert ds.x.shape == (3, 1, 8, 8) and ds.y.tolist() == [0, 0, 1]


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", SPEC)
    _write(tmp_path / "a" / "x.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"/b: class folder has no images"):
        load_image_folder(tmp_path, SPEC)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken.png: unreadable image"):
        load_image_folder(tmp_path, SPEC)
