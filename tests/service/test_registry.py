"""service/registry.py and service/dataplane.py: every bundle is verified before it is served,
a failure is kept with its reason, and `DataPlane.infer` on the admitted model is the one
inference path (what a batcher plugs into)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import anyio
import numpy as np
import onnxruntime as ort
import pytest

from bnfold.bundle import TensorSpec
from bnfold.errors import BadInput, PayloadTooLarge
from service.config import Settings
from service.dataplane import check_input
from service.errors import NotFound, ServiceUnavailable
from service.process import Core
from service.registry import load_model, one_of
from tests.conftest import SERVED_VARIANTS

CPU = ["CPUExecutionProvider"]


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    change(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def replace_onnx(bundle: Path, variant: str, data: bytes) -> None:
    """Overwrite a model file and record its new sha256, so only the content is wrong."""
    (bundle / f"{variant}.onnx").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(bundle, lambda m: m["files"][variant].update(sha256=digest))


def test_a_good_bundle_loads_both_variants_at_their_optimization_levels(copy_bundle):
    model = load_model(copy_bundle(), CPU)
    assert model.ready and model.error is None and model.probe_error is None
    assert model.providers == CPU
    levels = {
        v: s.get_session_options().graph_optimization_level for v, s in model.sessions.items()
    }
    # Unfolded with optimization off: onnxruntime would fuse Conv+BN and hide the BN otherwise.
    # int8, when the bundle has it, with full optimization: QDQ fuses into int8 kernels.
    int8 = {"int8": ort.GraphOptimizationLevel.ORT_ENABLE_ALL} if "int8" in levels else {}
    assert levels == {
        "folded": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "unfolded": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        **int8,
    }
    assert set(model.probe_sessions) == {"folded", "unfolded"}


DAMAGE = {
    "checksum": (
        lambda b: (b / "folded.onnx").write_bytes((b / "folded.onnx").read_bytes() + b"\0"),
        "sha256 mismatch for the folded model",
    ),
    "missing file": (lambda b: (b / "unfolded.onnx").unlink(), "unfolded model file is missing"),
    "bad json": (lambda b: (b / "bundle.json").write_text("{"), "not valid JSON"),
    "invalid manifest": (
        lambda b: edit_manifest(b, lambda m: m.pop("classes")),
        "invalid manifest at classes: Field required",
    ),
    "name mismatch": (
        lambda b: edit_manifest(b, lambda m: m.update(name="other")),
        "folder name 'digits' differs from the manifest name 'other'",
    ),
    "not onnx": (lambda b: replace_onnx(b, "folded", b"junk"), "INVALID_PROTOBUF"),
    "class count": (
        lambda b: edit_manifest(b, lambda m: m.update(classes=["a", "b", "c"])),
        "folded model answers logits of shape [1, 10] for one image; the manifest lists 3 classes",
    ),
    "input name": (
        lambda b: edit_manifest(b, lambda m: m["input"].update(name="image")),
        "graph has inputs ['input'] and outputs ['logits']; the manifest declares input 'image'",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_bundle_is_kept_with_its_reason_and_no_sessions(copy_bundle, damage):
    bundle = copy_bundle()
    spoil, reason = DAMAGE[damage]
    spoil(bundle)
    model = load_model(bundle, CPU)
    assert not model.ready and model.sessions == {}
    assert reason in model.error


def test_without_layer_probes_the_model_serves_but_says_why_per_layer_is_empty(copy_bundle):
    bundle = copy_bundle()
    edit_manifest(bundle, lambda m: m.update(layer_probes=[]))
    model = load_model(bundle, CPU)
    assert model.ready and model.probe_sessions == {}
    assert model.probe_error == "the bundle lists no layer probes"


SPEC = TensorSpec(name="input", shape=[-1, 1, 8, 8])


@pytest.mark.parametrize(
    ("shape", "error", "message"),
    [
        ((1, 8, 8), BadInput, "input 'input' must have shape ['N', 1, 8, 8], got [1, 8, 8]"),
        ((2, 1, 8, 7), BadInput, "input 'input' must have shape ['N', 1, 8, 8], got [2, 1, 8, 7]"),
        ((0, 1, 8, 8), BadInput, "input 'input' has no rows: send at least one image"),
        (
            (5, 1, 8, 8),
            PayloadTooLarge,
            "5 images in one request, over the limit of 4: split the batch",
        ),
    ],
)
def test_check_input_refuses_what_the_model_cannot_take(shape, error, message):
    with pytest.raises(error) as info:
        check_input(SPEC, np.zeros(shape, np.float32), max_rows=4)
    assert info.value.message == message


def test_check_input_names_the_first_non_finite_value():
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, 0, 2, 3], x[1, 0, 5, 5] = np.nan, -np.inf
    with pytest.raises(BadInput) as info:
        check_input(SPEC, x, max_rows=4)
    assert info.value.message == (
        "input 'input' holds 2 NaN or Inf value(s), the first at index [1, 0, 2, 3]: "
        "send finite FP32 values"
    )


def start_core(models_dir: Path, runner=None) -> Core:
    core = Core.build(Settings(models_dir=models_dir, provider="cpu"), runner)
    asyncio.run(core.start())
    return core


def test_readiness_reasons(tmp_path, copy_bundle):
    core = Core.build(Settings(models_dir=tmp_path / "models"))
    assert core.not_ready_reason() == "model bundles are still loading"
    asyncio.run(core.start())
    assert core.not_ready_reason().startswith(f"no model bundles in {tmp_path / 'models'}")
    copy_bundle("digits")
    (copy_bundle("broken") / "folded.onnx").unlink()
    core = start_core(tmp_path / "models")
    assert core.not_ready_reason().startswith("bundles failed to load: broken: ")
    assert "folded model file is missing" in core.not_ready_reason()
    assert core.registry.get_ready("digits").ready  # the good one is still served
    with pytest.raises(ServiceUnavailable, match="^model 'broken' is not ready: .*missing"):
        core.registry.get_ready("broken")
    core.admission.begin_drain()
    assert core.not_ready_reason() == "shutting down: finishing the requests in flight"


def test_get_refuses_unknown_models_and_versions(models_dir):
    registry = start_core(models_dir).registry
    with pytest.raises(NotFound, match="^unknown model 'cats'; models served here: digits$"):
        registry.get("cats")
    with pytest.raises(NotFound, match="^model 'digits' has no version '7'; it has '1'$"):
        registry.get("digits", "7")
    assert registry.get("digits", "1").name == "digits"


def test_infer_equals_onnxruntime_run_directly_bit_for_bit(models_dir, direct, digit_batch):
    core = start_core(models_dir)
    model = core.registry.get_ready("digits")
    for variant in ("folded", "unfolded"):
        logits = asyncio.run(core.plane.logits(model, variant, digit_batch))
        assert logits.dtype == np.float32 and logits.shape == (len(digit_batch), 10)
        assert np.array_equal(logits, direct.logits(digit_batch, variant))


class RecordingRunner:
    """Stands where the batcher does: sees every validated batch on its way to a session, and
    runs each alone in a thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple]] = []
        self.seen: list = []  # the LoadedModel objects that reached the runner

    async def logits(self, model, variant, x):
        self.calls.append((model.name, variant, x.shape))
        self.seen.append(model)
        return await anyio.to_thread.run_sync(model.run, variant, x)

    async def aclose(self) -> None:
        return None


def test_every_inference_goes_through_the_runner_after_validation(models_dir, digit_batch):
    runner = RecordingRunner()
    core = start_core(models_dir, runner)
    model = core.registry.get_ready("digits")
    asyncio.run(core.plane.logits(model, "unfolded", digit_batch[:3]))
    with pytest.raises(BadInput, match=f"^unknown variant 'both'; use {SERVED_VARIANTS}$"):
        asyncio.run(core.plane.logits(model, "both", digit_batch[:3]))
    with pytest.raises(BadInput):
        asyncio.run(core.plane.logits(model, "folded", digit_batch[:3, :, :4]))
    assert runner.calls == [("digits", "unfolded", (3, 1, 8, 8))]


def test_infer_runs_on_the_admitted_model_even_after_a_reload_replaced_it(models_dir, digit_batch):
    """The data plane never looks the model up by name again after admission."""
    runner = RecordingRunner()
    core = start_core(models_dir, runner)

    async def main():
        async with core.admission.admit("digits") as admitted:
            fresh = await core.registry.reload("digits")  # replaced while the request is in
            assert core.registry.models["digits"] is fresh and fresh is not admitted
            await core.plane.logits(admitted, "folded", digit_batch[:1])
            return admitted

    admitted = asyncio.run(main())
    assert runner.seen == [admitted]


def test_variants_are_listed_in_error_messages_as_the_bundle_has_them():
    assert one_of(["folded"]) == "'folded'"
    assert one_of(["folded", "unfolded"]) == "'folded' or 'unfolded'"
    assert one_of(["folded", "unfolded", "int8"]) == "'folded', 'unfolded' or 'int8'"


def test_wide_sessions_only_where_they_add_threads(copy_bundle, digit_batch):
    """With a worker's share of 1 thread and 2 wide: a second session of the folded and int8
    variants on 2 intra-op threads that never spin, answering the narrow one's logits; none for
    the unfolded variant, none when the narrow sessions already have every core (threads 0:
    onnxruntime's default) or wide is not wider."""
    bundle = copy_bundle()
    model = load_model(bundle, CPU, threads=1, spinning=False, wide_threads=2)
    assert set(model.wide_sessions) == {"folded", "int8"}
    for variant, session in model.wide_sessions.items():
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert model.sessions[variant].get_session_options().intra_op_num_threads == 1
        x = digit_batch[:8]
        np.testing.assert_allclose(model.run(variant, x, wide=True), model.run(variant, x),
                                   rtol=0, atol=1e-5)  # fmt: skip
    assert not load_model(bundle, CPU, threads=0, wide_threads=2).wide_sessions
    assert not load_model(bundle, CPU, threads=2, wide_threads=2).wide_sessions


def test_no_wide_session_for_a_file_over_the_cap(copy_bundle, monkeypatch):
    """A variant whose file is over WIDE_MAX_BYTES gets no wide session (its weights would be
    held twice in every worker); the smaller one still does."""
    import service.registry as registry

    bundle = copy_bundle()
    folded = (bundle / "folded.onnx").stat().st_size
    int8 = (bundle / "quantized.onnx").stat().st_size
    assert int8 < folded
    monkeypatch.setattr(registry, "WIDE_MAX_BYTES", (int8 + folded) // 2)
    model = load_model(bundle, CPU, threads=1, wide_threads=2)
    assert set(model.wide_sessions) == {"int8"} and model.ready
