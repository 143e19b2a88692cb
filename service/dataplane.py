"""The data plane: inference, predictions and the live comparison on an admitted model.

Knows nothing of HTTP or gRPC: each protocol decodes its wire format into arrays or images,
calls these coroutines with the `LoadedModel` that admission handed it (never a name to look up
again: a reload in between must not pair one bundle's manifest with another's sessions), and
turns the answer or the `BnfoldError` back into its own format (service/errors.py).

How a batch reaches a session is the `Runner`'s business: the default `BatchingRunner`
(service/batching.py) merges concurrent calls into one `LoadedModel.run` and hands each caller
its own rows back; `ThreadRunner` runs each request alone in a worker thread.
"""

from __future__ import annotations

from typing import Protocol

import anyio
import numpy as np

from bnfold.bundle import INT8, TensorSpec
from bnfold.equivalence import diff_stats, is_equivalent, layer_diffs
from bnfold.errors import BadInput, PayloadTooLarge
from service.batching import BatchingRunner
from service.config import Settings
from service.inference import Images, predictions, preprocess_uploads
from service.metrics import Metrics
from service.registry import PROBED, LoadedModel
from service.schemas import CompareResponse, Int8Comparison, PredictResponse
from service.tensors import shape_error


class Runner(Protocol):
    """How a validated batch reaches a model's session (alone, or merged by a batcher)."""

    async def run(self, model: LoadedModel, variant: str, x: np.ndarray) -> np.ndarray: ...

    async def aclose(self) -> None: ...


class ThreadRunner:
    """One onnxruntime run per request, in a worker thread so the event loop stays free."""

    async def run(self, model: LoadedModel, variant: str, x: np.ndarray) -> np.ndarray:
        return await anyio.to_thread.run_sync(model.run, variant, x)

    async def aclose(self) -> None:
        return None


def check_input(spec: TensorSpec, x: np.ndarray, max_rows: int) -> None:
    """Refuse a batch the model cannot take: wrong shape, too many rows, NaN or Inf values."""
    wrong_shape = shape_error(spec, x.shape)
    if wrong_shape:
        raise BadInput(wrong_shape)
    if x.shape[0] < 1:
        raise BadInput(f"input {spec.name!r} has no rows: send at least one image")
    if x.shape[0] > max_rows:
        raise PayloadTooLarge(
            f"{x.shape[0]} images in one request, over the limit of {max_rows}: split the batch"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        raise BadInput(
            f"input {spec.name!r} holds {int(bad.sum())} NaN or Inf value(s), the first at "
            f"index {first}: send finite FP32 values"
        )


def check_output(logits: np.ndarray) -> None:
    """Finite inputs can still overflow float32 inside the model (values near 3e38): refuse to
    answer NaN/Inf, which JSON cannot carry and no client can use."""
    if not np.isfinite(logits).all():
        rows = np.flatnonzero(~np.isfinite(logits).all(axis=1)).tolist()
        raise BadInput(
            f"the model's output is not finite for input row(s) {rows[:10]}: the input values "
            "are too large for float32 arithmetic; send preprocessed values of the order of 1"
        )


class DataPlane:
    """infer / predict / compare on a model admission returned; the one inference path."""

    def __init__(self, settings: Settings, metrics: Metrics, runner: Runner | None = None) -> None:
        self.settings = settings
        self.runner: Runner = runner or BatchingRunner(
            settings.max_batch_size,
            settings.max_delay_ms / 1000,
            metrics,
            settings.inline_run_us / 1e6,
        )

    async def aclose(self) -> None:
        await self.runner.aclose()

    async def infer(self, model: LoadedModel, variant: str, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) float32 for a (N, C, H, W) float32 batch."""
        assert model.manifest is not None
        variant = model.check_variant(variant)
        x = np.ascontiguousarray(x, dtype=np.float32)
        check_input(model.manifest.input, x, self.settings.max_images_per_request)
        logits = await self.runner.run(model, variant, x)
        check_output(logits)
        return logits

    async def predict(
        self,
        model: LoadedModel,
        variant: str,
        images: Images,
        top_k: int,
    ) -> PredictResponse:
        """Decode and classify images; `predictions` in upload order."""
        assert model.manifest is not None
        variant = model.check_variant(variant)  # before any decoding work
        spec = model.manifest.input.preprocess
        decoded, x = await preprocess_uploads(images, spec, self.settings.max_pixels)
        logits = await self.infer(model, variant, x)
        names = [u.filename for u in decoded]
        probs = model.manifest.output.probabilities
        return PredictResponse(
            model_name=model.name,
            model_version=model.version,
            variant=variant,
            predictions=predictions(logits, model.manifest.classes, top_k, names, probs),
        )

    async def compare_images(
        self, model: LoadedModel, images: Images, top_k: int
    ) -> CompareResponse:
        assert model.manifest is not None
        spec = model.manifest.input.preprocess
        decoded, x = await preprocess_uploads(images, spec, self.settings.max_pixels)
        return await self.compare(model, x, top_k, [u.filename for u in decoded])

    async def compare(
        self,
        model: LoadedModel,
        x: np.ndarray,
        top_k: int,
        filenames: list[str | None] | None = None,
    ) -> CompareResponse:
        """Run folded and unfolded now on x; diff their logits and each folded layer's output;
        int8 beside them when the bundle serves it (judged by agreement with folded)."""
        manifest = model.manifest
        probs = manifest.output.probabilities
        assert manifest is not None
        logits = {v: await self.infer(model, v, x) for v in PROBED}
        stats = diff_stats(logits["folded"], logits["unfolded"])
        if model.probe_error:
            per_layer, note = [], model.probe_error
        else:
            folded = await anyio.to_thread.run_sync(model.run_probes, "folded", x)
            unfolded = await anyio.to_thread.run_sync(model.run_probes, "unfolded", x)
            per_layer, note = layer_diffs(manifest.layer_probes, folded, unfolded), None
        tolerance = manifest.equivalence.tolerance_abs
        int8, int8_note = await self._compare_int8(model, x, logits["folded"], top_k, filenames)
        return CompareResponse(
            model_name=model.name,
            model_version=manifest.version,
            n_images=len(x),
            folded=predictions(logits["folded"], manifest.classes, top_k, filenames, probs),
            unfolded=predictions(logits["unfolded"], manifest.classes, top_k, filenames, probs),
            max_abs_diff=stats.max_abs_diff,
            mean_abs_diff=stats.mean_abs_diff,
            max_rel_diff=stats.max_rel_diff,
            top1_agreement=stats.top1_agreement if stats.top1_agreement is not None else 1.0,
            tolerance_abs=tolerance,
            within_tolerance=is_equivalent(stats, tolerance),
            per_layer=per_layer,
            per_layer_note=note,
            int8=int8,
            int8_note=int8_note,
        )

    async def _compare_int8(
        self,
        model: LoadedModel,
        x: np.ndarray,
        folded: np.ndarray,
        top_k: int,
        filenames: list[str | None] | None,
    ) -> tuple[Int8Comparison | None, str | None]:
        """int8 next to folded when the bundle serves it, else why not (one line)."""
        manifest = model.manifest
        probs = manifest.output.probabilities
        assert manifest is not None
        report = manifest.equivalence.int8
        if INT8 not in model.sessions:
            why = model.variant_errors.get(INT8) or (report.reason if report else None)
            return None, why or "the bundle has no int8 variant (export with --quantize int8)"
        logits = await self.infer(model, INT8, x)
        stats = diff_stats(logits, folded)
        return Int8Comparison(
            predictions=predictions(logits, manifest.classes, top_k, filenames, probs),
            max_abs_diff=stats.max_abs_diff,
            mean_abs_diff=stats.mean_abs_diff,
            top1_agreement=stats.top1_agreement if stats.top1_agreement is not None else 1.0,
            min_top1_agreement=report.min_top1_agreement if report else None,
            export_top1_agreement=(
                report.int8_vs_folded.top1_agreement if report and report.int8_vs_folded else None
            ),
        ), None
