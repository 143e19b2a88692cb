"""The data plane: inference, predictions and the live comparison on an admitted model.

Knows nothing of HTTP or gRPC: each protocol decodes its wire format into one `InferRequest`
(service/request.py: tensors, or images already parsed from the body), calls these coroutines
with the `LoadedModel` that admission handed it (never a name to look up again: a reload in
between must not pair one bundle's manifest with another's sessions), and turns the answer or
the `BnfoldError` back into its own format (service/errors.py).

How a batch reaches a session is the `Runner`'s business: the `BatchingRunner`
(service/batching.py) merges concurrent calls into one `LoadedModel.run` and hands each caller
its own rows back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio
import numpy as np

from bnfold.bundle import INT8, TensorSpec
from bnfold.equivalence import diff_stats, is_equivalent, layer_diffs
from bnfold.errors import BadInput
from service.batching import BatchingRunner
from service.config import Settings
from service.images import predictions, preprocess_uploads, too_many_images
from service.metrics import Metrics
from service.registry import PROBED, LoadedModel
from service.request import InferRequest, InferResponse, answered_outputs, output_array
from service.schemas import CompareResponse, Int8Comparison, PredictResponse
from service.statistics import Call, Statistics
from service.tensors import input_array, shape_error
from service.threads import CpuThreads


class Runner(Protocol):
    """How a validated batch reaches a model's session (alone, or merged by a batcher)."""

    async def logits(self, model: LoadedModel, variant: str, x: np.ndarray) -> np.ndarray: ...

    async def aclose(self) -> None: ...


def check_input(spec: TensorSpec, x: np.ndarray, max_rows: int) -> None:
    """Refuse a batch the model cannot take: wrong shape, too many rows, NaN or Inf values."""
    wrong_shape = shape_error(spec, x.shape)
    if wrong_shape:
        raise BadInput(wrong_shape)
    if x.shape[0] < 1:
        raise BadInput(f"input {spec.name!r} has no rows: send at least one image")
    if x.shape[0] > max_rows:
        raise too_many_images(max_rows, x.shape[0])
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

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        threads: CpuThreads,
        runner: Runner | None = None,
    ) -> None:
        self.settings = settings
        self.threads = threads
        self.statistics = Statistics()  # the statistics extension's counts, this process's
        if runner is None:
            self.statistics.runs_counted = True  # the batcher reports each run
            runner = BatchingRunner(
                settings.max_batch_size,
                settings.max_delay_ms / 1000,
                metrics,
                settings.inline_run_us / 1e6,
                on_run=self.statistics.executed,
            )
        self.runner: Runner = runner

    async def aclose(self) -> None:
        await self.runner.aclose()

    def count_requests_with(self, count: Callable[[], int]) -> None:
        """`count()`: the requests this process holds now (the server's HTTP request tasks and
        gRPC calls). The batcher runs cheap batches on the event loop only when it is 1 or the
        batch's own requests; the CPU threads decode a lone request's input there."""
        self.threads.requests_inside = count
        if isinstance(self.runner, BatchingRunner):
            self.runner.requests_inside = count

    async def infer(self, model: LoadedModel, request: InferRequest) -> InferResponse:
        """The requested outputs for the request's tensors: the logits, or their top-k
        "value:index:label" strings for an output that asks for classification."""
        manifest = model.manifest
        with self.statistics.call(model) as call:
            variant = model.check_variant(request.variant)  # before any decoding work
            outputs = answered_outputs(request.outputs, manifest.output)
            with call.timing("compute_input"):
                x = await self._batch(model, request)
            logits = await self.logits(model, variant, x, call)
            with call.timing("compute_output"):
                answered = [(out, output_array(out, logits, manifest.classes)) for out in outputs]
        return InferResponse(model.name, model.version, request.id, variant, answered)

    async def predict(
        self, model: LoadedModel, request: InferRequest, top_k: int
    ) -> PredictResponse:
        """Classify the request's images (or tensor rows); `predictions` in request order."""
        manifest = model.manifest
        with self.statistics.call(model) as call:
            variant = model.check_variant(request.variant)  # before any decoding work
            with call.timing("compute_input"):
                x = await self._batch(model, request)
            logits = await self.logits(model, variant, x, call)
            with call.timing("compute_output"):
                answer = predictions(logits, manifest.classes, top_k, _filenames(request),
                                     manifest.output.probabilities)  # fmt: skip
        return PredictResponse(
            model_name=model.name, model_version=model.version, variant=variant, predictions=answer
        )

    async def logits(
        self, model: LoadedModel, variant: str, x: np.ndarray, call: Call | None = None
    ) -> np.ndarray:
        """Logits (N, classes) float32 for a (N, C, H, W) float32 batch; its time in the
        runner recorded in `call` (the statistics extension) when given."""
        variant = model.check_variant(variant)
        # Not ascontiguousarray: it makes a 0-d input 1-d, and its shape is refused as sent.
        x = np.asarray(x, dtype=np.float32, order="C")
        check_input(model.manifest.input, x, self.settings.max_images_per_request)
        if call is None:
            logits = await self.runner.logits(model, variant, x)
        else:
            with call.in_runner(len(x)):
                logits = await self.runner.logits(model, variant, x)
        check_output(logits)
        return logits

    async def _batch(self, model: LoadedModel, request: InferRequest) -> np.ndarray:
        """The request's input as the model's (N, C, H, W) float32 batch: its images decoded
        and preprocessed, or its tensor (the CPU work in a thread unless it is small)."""
        if request.uploads is not None:
            spec = model.manifest.input.preprocess
            return await preprocess_uploads(
                request.uploads, spec, self.settings.max_pixels, self.threads
            )
        first = request.inputs[0] if request.inputs else None
        nbytes = len(first.raw) if first and first.raw is not None else request.nbytes
        return await self.threads.offload(
            input_array, request.inputs, model.manifest.input, nbytes=nbytes
        )

    async def compare(
        self, model: LoadedModel, request: InferRequest, top_k: int
    ) -> CompareResponse:
        """Run folded and unfolded now on the request's input; diff their logits and each
        folded layer's output; int8 beside them when the bundle serves it (judged by agreement
        with folded)."""
        manifest = model.manifest
        assert manifest is not None
        probs = manifest.output.probabilities
        x = await self._batch(model, request)
        filenames = _filenames(request)
        with self.statistics.call(model) as call:  # its runs count: they are the model's
            logits = {v: await self.logits(model, v, x, call) for v in PROBED}
            stats = diff_stats(logits["folded"], logits["unfolded"])
            if model.probe_error:
                per_layer, note = [], model.probe_error
            else:
                folded = await anyio.to_thread.run_sync(model.run_probes, "folded", x)
                unfolded = await anyio.to_thread.run_sync(model.run_probes, "unfolded", x)
                per_layer, note = layer_diffs(manifest.layer_probes, folded, unfolded), None
            int8, int8_note = await self._compare_int8(
                model, x, logits["folded"], top_k, filenames, call
            )
        tolerance = manifest.equivalence.tolerance_abs
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
        call: Call,
    ) -> tuple[Int8Comparison | None, str | None]:
        """int8 next to folded when the bundle serves it, else why not (one line)."""
        manifest = model.manifest
        assert manifest is not None
        probs = manifest.output.probabilities
        report = manifest.equivalence.int8
        if INT8 not in model.sessions:
            why = model.variant_errors.get(INT8) or (report.reason if report else None)
            return None, why or "the bundle has no int8 variant (export with --quantize int8)"
        logits = await self.logits(model, INT8, x, call)
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


def _filenames(request: InferRequest) -> list[str | None] | None:
    """Each image's file name (multipart uploads), to label its prediction; None for tensors."""
    return [u.filename for u in request.uploads] if request.uploads is not None else None
