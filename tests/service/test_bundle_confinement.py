"""A bundle's files are its own: every path the manifest lists is a plain file name whose real
path lies in the bundle folder. An absolute path, a '..' path or a symbolic link leading out is
refused at load with the reason (the bundle is not served), before the outside file is read, so
an error never reveals anything about it (no hash prefix). And a bundle whose preprocessing
makes images the model cannot take is refused at load: a reload of one keeps the old version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from bnfold.bundle import load_bundle, read_manifest
from bnfold.errors import BadInput, BundleError
from bnfold.toolchain.precision import load_check_inputs
from service.config import Settings
from service.registry import ModelRegistry, load_model
from tests.pinned import THREADS

CPU = ["CPUExecutionProvider"]


def edit(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    change(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def outside(tmp_path: Path, bundle_src: Path) -> Path:
    """A valid model file outside every bundle folder (the right sha256 is known)."""
    path = tmp_path / "elsewhere" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes((bundle_src / "folded.onnx").read_bytes())
    return path


def point(field: str, target: str, digest: str):
    def change(m: dict) -> None:
        entry = m["files"]["folded"] if field == "folded" else m["check_inputs"]
        entry.update(path=target, sha256=digest)

    return change


@pytest.mark.parametrize("how", ["absolute", "dotdot", "subfolder", "backslash", "dot", "empty"])
def test_a_path_leaving_the_bundle_folder_is_refused_at_load(copy_bundle, outside, how):
    bundle = copy_bundle()
    rel = os.path.relpath(outside, bundle)  # ../elsewhere/model.onnx, the right sha256
    target = {"absolute": str(outside), "dotdot": rel, "subfolder": "sub/folded.onnx",
              "backslash": "..\\elsewhere\\model.onnx", "dot": ".", "empty": ""}[how]  # fmt: skip
    if how == "subfolder":
        (bundle / "sub").mkdir()
        (bundle / "sub" / "folded.onnx").write_bytes(outside.read_bytes())
    edit(bundle, point("folded", target, sha(outside)))
    model = load_model(bundle, CPU)
    assert not model.ready and model.sessions == {}
    assert "files.folded.path must be a file name inside the bundle folder" in model.error
    with pytest.raises(BundleError, match="files.folded.path must be a file name"):
        read_manifest(bundle)


def test_a_file_symlinked_out_of_the_bundle_is_refused_at_load(copy_bundle, outside):
    bundle = copy_bundle()
    (bundle / "folded.onnx").unlink()
    (bundle / "folded.onnx").symlink_to(outside)  # the same bytes: its sha256 matches
    model = load_model(bundle, CPU)
    assert not model.ready and model.sessions == {}
    assert "files.folded.path resolves outside the bundle folder" in model.error


def test_a_symlink_inside_the_bundle_folder_is_served(copy_bundle):
    bundle = copy_bundle()
    (bundle / "folded.onnx").rename(bundle / "real.onnx")
    (bundle / "folded.onnx").symlink_to("real.onnx")
    assert load_model(bundle, CPU).ready


def test_a_wrong_sha256_for_an_outside_file_reveals_nothing_about_it(copy_bundle, tmp_path):
    bundle = copy_bundle()
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the bundle")
    errors = []
    for target in (str(secret), str(tmp_path / "no-such-file")):  # exists, does not
        edit(bundle, point("folded", target, "0" * 64))
        errors.append(load_model(bundle, CPU).error.replace(target, "<target>"))
    prefix = sha(secret)[:12]
    assert all(prefix not in e for e in errors)
    assert errors[0] == errors[1]  # the same answer whether the file exists or not
    assert "mismatch" not in errors[0] and "must be a file name" in errors[0]


def test_a_symlink_to_a_missing_outside_file_answers_as_one_to_an_existing_file(
    copy_bundle, outside, tmp_path
):
    bundle = copy_bundle()
    errors = []
    for target in (outside, tmp_path / "no-such-file"):
        (bundle / "folded.onnx").unlink(missing_ok=True)
        (bundle / "folded.onnx").symlink_to(target)
        errors.append(load_model(bundle, CPU).error)
    assert errors[0] == errors[1]


def test_check_inputs_outside_the_bundle_are_refused(copy_bundle, tmp_path, bundle_src):
    bundle = copy_bundle()
    if read_manifest(bundle).check_inputs is None:
        pytest.skip("this bundle stores no check inputs")
    stored = tmp_path / "inputs.npy"
    stored.write_bytes((bundle_src / "check_inputs.npy").read_bytes())
    edit(bundle, point("check_inputs", str(stored), sha(stored)))
    model = load_model(bundle, CPU)
    assert not model.ready
    assert "check_inputs.path must be a file name inside the bundle folder" in model.error
    # The loader of the inputs refuses it on its own too (a manifest validated elsewhere).
    manifest = load_bundle(copy_bundle("other"), ["folded"])
    manifest.check_inputs.path = str(stored)
    with pytest.raises(BundleError, match="check_inputs.path must be a file name"):
        load_check_inputs(bundle, manifest)
    (bundle / "check_inputs.npy").unlink()
    (bundle / "check_inputs.npy").symlink_to(stored)
    edit(bundle, point("check_inputs", "check_inputs.npy", sha(stored)))
    model = load_model(bundle, CPU)
    assert not model.ready and "check_inputs.path resolves outside" in model.error


# --- preprocessing against the model's input ------------------------------------------------


@pytest.mark.parametrize(
    "change, made",
    [
        (lambda p: p.update(height=4096, width=4096), "[1, 4096, 4096]"),
        (lambda p: p.update(color_mode="RGB", mean=[0.3] * 3, std=[0.4] * 3), "[3, 8, 8]"),
        (lambda p: p.update(layout="NHWC"), "[8, 8, 1]"),
    ],
    ids=["size", "channels", "layout"],
)
def test_preprocessing_the_model_cannot_take_is_refused_at_load(copy_bundle, change, made):
    bundle = copy_bundle()
    shape = read_manifest(bundle).input.shape
    assert shape[1:] == [1, 8, 8]  # the digits model this test describes
    edit(bundle, lambda m: change(m["input"]["preprocess"]))
    model = load_model(bundle, CPU)
    assert not model.ready and model.sessions == {}
    assert "input.preprocess makes" in model.error and made in model.error
    assert "no image could be served" in model.error


def test_a_reload_with_impossible_preprocessing_keeps_the_old_version(copy_bundle):
    bundle = copy_bundle()
    settings = Settings(models_dir=bundle.parent, provider="cpu", threads=THREADS)
    registry = ModelRegistry(settings)

    async def scenario():
        await registry.start()
        before = registry.get_ready("digits")
        edit(bundle, lambda m: m.update(version="2"))
        edit(bundle, lambda m: m["input"]["preprocess"].update(height=4096, width=4096))
        with pytest.raises(BadInput, match="no image could be served") as refused:
            await registry.reload("digits")
        assert "the version loaded before is still served" in refused.value.message
        assert registry.get_ready("digits") is before and before.version != "2"
        assert registry.not_ready_reason() is None

    asyncio.run(scenario())
