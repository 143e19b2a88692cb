"""The model runtime: loads every bundle, keeps failures with their reason, runs inference.

HTTP-free. Endpoints hold one of the model's queue slots with `ModelRuntime.admit(model)` (503
when the queue is full, 504 past the request timeout), call one coroutine,
`ModelRuntime.infer(model, variant, x) -> logits`, and never touch onnxruntime. How a batch
reaches a session is the `Runner`'s business: the default `BatchingRunner` (service/batching.py)
merges concurrent calls into one `LoadedModel.run` and hands each caller its own rows back;
`ThreadRunner` runs each request alone in a worker thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import numpy as np
import onnxruntime as ort

from bnfold.bundle import VARIANTS, Manifest, TensorSpec, Variant, discover_bundles, load_bundle
from bnfold.errors import (
    BadInput,
    BnfoldError,
    BundleError,
    GatewayTimeout,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
)
from bnfold.sessions import make_probe_session, make_session, resolve_providers
from service.config import Settings
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """One bundle as the server holds it: sessions when it loaded, the reason when it did not."""

    name: str
    path: Path
    manifest: Manifest | None = None
    sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    probe_sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    error: str | None = None
    probe_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.error is None and bool(self.sessions)

    @property
    def version(self) -> str | None:
        return self.manifest.version if self.manifest else None

    def run(self, variant: Variant, x: np.ndarray) -> np.ndarray:
        """Blocking onnxruntime run: (N, C, H, W) float32 -> (N, classes) float32 logits."""
        assert self.manifest is not None
        session = self.sessions[variant]
        return session.run([self.manifest.output.name], {self.manifest.input.name: x})[0]

    def run_probes(self, variant: Variant, x: np.ndarray) -> list[np.ndarray]:
        """Blocking: the intermediate tensors named by manifest.layer_probes, in probe order."""
        assert self.manifest is not None
        names = probe_names(self.manifest, variant)
        return self.probe_sessions[variant].run(names, {self.manifest.input.name: x})


def probe_names(manifest: Manifest, variant: Variant) -> list[str]:
    """The tensors to expose in one variant's graph, one per folded BN (manifest order)."""
    attr = "folded_tensor" if variant == "folded" else "unfolded_tensor"
    return [getattr(p, attr) for p in manifest.layer_probes]


def load_model(path: Path, providers: list[str], threads: int = 0) -> LoadedModel:
    """Verify a bundle and create its sessions. Never raises: a failure becomes `.error`."""
    model = LoadedModel(name=path.name, path=path)
    try:
        model.manifest = load_bundle(path)
        _check_name(model.manifest, path)
        model.sessions = {
            v: make_session(path / model.manifest.files[v].path, v, providers, threads)
            for v in VARIANTS
        }
        model.providers = model.sessions["folded"].get_providers()
        for variant in VARIANTS:
            _check_session(model, variant)
    except Exception as exc:  # any failure (ours, onnxruntime's, the file system's) is kept
        model.sessions = {}
        model.error = (
            exc.message if isinstance(exc, BnfoldError) else f"{type(exc).__name__}: {exc}"
        )
        log.error("bundle %s not served: %s", path, model.error)
        return model
    _load_probes(model, providers)
    log.info("bundle %s loaded (version %s, %s)", model.name, model.version, model.providers[0])
    return model


def _check_name(manifest: Manifest, path: Path) -> None:
    if manifest.name != path.name:
        raise BundleError(
            f"{path}: folder name {path.name!r} differs from the manifest name "
            f"{manifest.name!r}; rename the folder to the model name"
        )


def _check_session(model: LoadedModel, variant: Variant) -> None:
    """Refuse a graph whose inputs/outputs disagree with the manifest; warm it up once."""
    m = model.manifest
    assert m is not None
    session = model.sessions[variant]
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [m.input.name] or m.output.name not in outputs:
        raise BundleError(
            f"{model.path / m.files[variant].path}: graph has inputs {inputs} and outputs "
            f"{outputs}; the manifest declares input {m.input.name!r}, output {m.output.name!r}"
        )
    example = np.zeros([1, *m.input.shape[1:]], dtype=np.float32)  # (1, C, H, W)
    logits = model.run(variant, example)
    if logits.shape != (1, len(m.classes)):
        raise BundleError(
            f"{variant} model answers logits of shape {list(logits.shape)} for one image; "
            f"the manifest lists {len(m.classes)} classes"
        )


def _load_probes(model: LoadedModel, providers: list[str]) -> None:
    """Probe sessions for compare's per-layer differences; their failure costs only that."""
    m = model.manifest
    assert m is not None
    if not m.layer_probes:
        model.probe_error = "the bundle lists no layer probes"
        return
    try:
        for v in VARIANTS:
            path = model.path / m.files[v].path
            model.probe_sessions[v] = make_probe_session(path, probe_names(m, v), providers)
    except ImportError:
        model.probe_error = "per-layer differences need the onnx package, not installed here"
    except Exception as exc:
        model.probe_error = f"probe sessions failed: {type(exc).__name__}: {exc}"
    if model.probe_error:
        model.probe_sessions = {}
        log.warning("bundle %s: no per-layer differences: %s", model.name, model.probe_error)


def check_input(spec: TensorSpec, x: np.ndarray, max_rows: int) -> None:
    """Refuse a batch the model cannot take: wrong shape, too many rows, NaN or Inf values."""
    expected = [d if d >= 0 else None for d in spec.shape]
    if x.ndim != len(expected) or any(
        e is not None and e != d for e, d in zip(expected, x.shape, strict=True)
    ):
        want = [d if d >= 0 else "N" for d in spec.shape]
        raise BadInput(f"input {spec.name!r} must have shape {want}, got {list(x.shape)}")
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


class Runner(Protocol):
    """How a validated batch reaches a model's session (alone, or merged by a batcher)."""

    async def run(self, model: LoadedModel, variant: Variant, x: np.ndarray) -> np.ndarray: ...

    async def aclose(self) -> None: ...


class ThreadRunner:
    """One onnxruntime run per request, in a worker thread so the event loop stays free."""

    async def run(self, model: LoadedModel, variant: Variant, x: np.ndarray) -> np.ndarray:
        return await anyio.to_thread.run_sync(model.run, variant, x)

    async def aclose(self) -> None:
        return None


def check_output(logits: np.ndarray) -> None:
    """Finite inputs can still overflow float32 inside the model (values near 3e38): refuse to
    answer NaN/Inf, which JSON cannot carry and no client can use."""
    if not np.isfinite(logits).all():
        rows = np.flatnonzero(~np.isfinite(logits).all(axis=1)).tolist()
        raise BadInput(
            f"the model's output is not finite for input row(s) {rows[:10]}: the input values "
            "are too large for float32 arithmetic; send preprocessed values of the order of 1"
        )


class ModelRuntime:
    """Every bundle in `settings.models_dir`, loaded at start, and the one way to run them."""

    def __init__(
        self, settings: Settings, runner: Runner | None = None, metrics: Metrics | None = None
    ) -> None:
        from service.batching import BatchingRunner  # imports LoadedModel from here

        self.settings = settings
        self.metrics = metrics or Metrics()
        self.runner: Runner = runner or BatchingRunner(
            settings.max_batch_size, settings.max_delay_ms / 1000, self.metrics
        )
        self.models: dict[str, LoadedModel] = {}
        self.loaded = False
        self.admitted: Counter[str] = Counter()  # requests inside the server, per model
        self.draining = False  # set on SIGTERM: not ready; requests already sent are served

    async def start(self) -> None:
        """Resolve the provider (bad choice fails start-up) and load every bundle off the loop."""
        providers = resolve_providers(self.settings.provider)
        self.models = await anyio.to_thread.run_sync(self._load_all, providers)
        self.loaded = True

    def _load_all(self, providers: list[str]) -> dict[str, LoadedModel]:
        paths = discover_bundles(self.settings.models_dir)
        if not paths:
            log.warning("no model bundles in %s", self.settings.models_dir)
        return {p.name: load_model(p, providers, self.settings.threads) for p in paths}

    async def aclose(self) -> None:
        await self.runner.aclose()
        self.models, self.loaded = {}, False

    def not_ready_reason(self) -> str | None:
        """None when every bundle loaded; else why the server is not ready."""
        if self.draining:
            return "shutting down: finishing the requests in flight"
        if not self.loaded:
            return "model bundles are still loading"
        if not self.models:
            return (
                f"no model bundles in {self.settings.models_dir}: "
                "run `make train` or set BNFOLD_MODELS_DIR"
            )
        failed = [f"{m.name}: {m.error}" for m in self.models.values() if not m.ready]
        return f"bundles failed to load: {'; '.join(failed)}" if failed else None

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model by name (and version when given), loaded or not; 404 when unknown."""
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model {name!r}; models served here: {known}")
        if version is not None and model.manifest and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r}; it has {model.version!r}")
        return model

    def get_ready(self, name: str, version: str | None = None) -> LoadedModel:
        """The model when it can answer; 503 with the load failure when it cannot."""
        model = self.get(name, version)
        if not model.ready:
            raise ServiceUnavailable(f"model {name!r} is not ready: {model.error}")
        return model

    def begin_drain(self) -> None:
        """SIGTERM: readiness answers 503 from now on (requests that reach us are served)."""
        self.draining = True

    @asynccontextmanager
    async def admit(self, name: str, version: str | None = None) -> AsyncIterator[LoadedModel]:
        """Hold one of the model's `max_queue_size` slots while a request is served, under
        the request timeout: 503 with Retry-After at once when full, 504 when time runs out."""
        model = self.get_ready(name, version)
        limit = self.settings.max_queue_size
        if self.admitted[name] >= limit:
            self.metrics.rejected.labels(name).inc()
            raise Overloaded(
                f"model {name!r} is busy: {limit} requests already queued (BNFOLD_MAX_QUEUE_SIZE);"
                f" retry after {self.settings.retry_after_s} s",
                self.settings.retry_after_s,
            )
        self._count(name, +1)
        try:
            with anyio.move_on_after(self.settings.request_timeout_s) as scope:
                yield model
        finally:
            self._count(name, -1)
        if scope.cancelled_caught:
            self.metrics.timeouts.labels(name).inc()
            raise GatewayTimeout(
                f"request not answered within {self.settings.request_timeout_s:g} s "
                "(BNFOLD_REQUEST_TIMEOUT_S); its queued work was dropped: retry later"
            )

    def _count(self, name: str, change: int) -> None:
        self.admitted[name] += change
        self.metrics.child(self.metrics.queue_depth, name).set(self.admitted[name])

    async def reload(self, name: str) -> LoadedModel:
        """Re-verify a bundle's checksums and recreate its sessions; a failure is kept as the
        model's error, so a file changed since start-up is never served."""
        path = self.get(name).path
        providers = resolve_providers(self.settings.provider)
        model = await anyio.to_thread.run_sync(load_model, path, providers, self.settings.threads)
        self.models[name] = model  # requests already queued finish on the old sessions
        return model

    async def infer(
        self, name: str, variant: Variant, x: np.ndarray, version: str | None = None
    ) -> np.ndarray:
        """Logits (N, classes) float32 for a (N, C, H, W) float32 batch: the one inference path."""
        model = self.get_ready(name, version)
        assert model.manifest is not None
        if variant not in VARIANTS:
            raise BadInput(f"unknown variant {variant!r}; use 'folded' or 'unfolded'")
        x = np.ascontiguousarray(x, dtype=np.float32)
        check_input(model.manifest.input, x, self.settings.max_images_per_request)
        logits = await self.runner.run(model, variant, x)
        check_output(logits)
        return logits

    async def probe(
        self, name: str, x: np.ndarray
    ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """Per-layer tensors (folded, unfolded) for compare; None when the bundle has no probes."""
        model = self.get_ready(name)
        if model.probe_error:
            return None
        folded = await anyio.to_thread.run_sync(model.run_probes, "folded", x)
        unfolded = await anyio.to_thread.run_sync(model.run_probes, "unfolded", x)
        return folded, unfolded
