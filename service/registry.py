"""The model registry: every bundle in the models folder, verified before it is served.

Protocol-free (no HTTP, no gRPC). A bundle becomes a `LoadedModel`: its sessions when it
loaded, the reason when it did not (kept, so every place that asks can say why). Loading,
reloading and unloading replace the registry's entry in one assignment: a request admitted
before holds the `LoadedModel` it was given and finishes on those sessions.

Variants are data: every file the manifest lists (`folded`, `unfolded`, and any other such as
`int8`) gets a session under its own name, and `bf16` (folded.onnx computed in bfloat16 by
OpenVINO) joins them on a CPU that computes bf16 natively. The float32 pair gates the bundle;
any other variant whose file fails its checksum or its session is refused alone
(`variant_errors` says why) and the others are served. A reduced-precision variant (int8,
bf16) is measured again here, on the bundle's check inputs against folded float32, on this CPU:
one that fails its criterion is refused with the reason.

Engines (BNFOLD_ENGINE): `auto` serves each variant with the engine its proof was made with
(onnxruntime for float32 and int8) and bf16 with OpenVINO; `onnxruntime` serves everything with
onnxruntime (no bf16); `openvino` serves folded float32 (forced to float32) and int8 with
OpenVINO too. The unfolded model always runs in onnxruntime with BN
executed (it is the proof), and a CUDA provider keeps everything on onnxruntime.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np
import onnxruntime as ort

from bnfold.bundle import (
    INT8,
    NAME_PATTERN,
    Manifest,
    discover_bundles,
    load_bundle,
    verify_checksums,
)
from bnfold.errors import BadInput, BnfoldError, BundleError
from bnfold.toolchain.engines import (
    OpenVinoSession,
    bf16_unavailable_reason,
    cpu_flags,
    openvino_capabilities,
)
from bnfold.toolchain.precision import load_check_inputs, recheck
from bnfold.toolchain.sessions import (
    CPU,
    make_probe_session,
    make_session,
    resolve_providers,
    run_logits,
)
from service.config import Settings
from service.cpus import idle_threads, usable_cpus
from service.errors import NotFound, ServiceUnavailable, shown, shown_list

log = logging.getLogger(__name__)
PROBED = ("folded", "unfolded")  # the variants compare's per-layer differences read
BF16 = "bf16"
REDUCED = (INT8, BF16)  # variants measured again on this CPU before they are served


@dataclass(frozen=True)
class Engine:
    """What computes one variant: the engine, its precision, the CPU features that matter."""

    engine: str  # "onnxruntime" | "openvino"
    precision: str  # "float32" | "int8" | "bf16"
    cpu_features: tuple[str, ...]


LOAD_AGAIN = "POST /v2/repository/models/{model}/load serves it again"


@dataclass(eq=False)
class LoadedModel:
    """One bundle as the server holds it: sessions when it loaded, the reason when it did not."""

    name: str
    path: Path
    manifest: Manifest | None = None
    sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    # variant -> the same graph on more intra-op threads, for a run on an idle machine
    wide_sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    probe_sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    error: str | None = None
    probe_error: str | None = None
    variant_errors: dict[str, str] = field(default_factory=dict)  # refused variant -> why
    engines: dict[str, Engine] = field(default_factory=dict)  # served variant -> its engine
    unavailable: dict[str, str] = field(default_factory=dict)  # variant this CPU cannot -> why

    @property
    def ready(self) -> bool:
        return self.error is None and bool(self.sessions)

    @property
    def version(self) -> str | None:
        return self.manifest.version if self.manifest else None

    @property
    def variants(self) -> list[str]:
        """The variants this model serves, in the manifest's order."""
        return list(self.sessions)

    def check_variant(self, variant: object) -> str:
        """The variant when this model serves it; 400 naming the ones it does otherwise."""
        if isinstance(variant, str) and variant in self.variant_errors:
            raise ServiceUnavailable(
                f"variant {variant!r} of model {self.name!r} is not served: "
                f"{self.variant_errors[variant]}; use {one_of(self.variants)}"
            )
        if isinstance(variant, str) and variant in self.unavailable:
            raise BadInput(
                f"variant {variant!r} is not available on this server: "
                f"{self.unavailable[variant]}; use {one_of(self.variants)}"
            )
        if variant == INT8 and INT8 not in self.sessions:
            raise BadInput(
                f"model {self.name!r} has no int8 variant (export it with --quantize int8); "
                f"use {one_of(self.variants)}"
            )
        if variant == BF16 and BF16 not in self.sessions:
            raise BadInput(
                f"model {self.name!r} has no bf16 variant (export or import it with --bf16); "
                f"use {one_of(self.variants)}"
            )
        if not isinstance(variant, str) or variant not in self.sessions:
            raise BadInput(f"unknown variant {shown(variant)}; use {one_of(self.variants)}")
        return variant

    def run(self, variant: str, x: np.ndarray, wide: bool = False) -> np.ndarray:
        """Blocking onnxruntime run: (N, C, H, W) float32 -> (N, classes) float32 logits;
        `wide`: on the variant's wide session, when it has one."""
        assert self.manifest is not None
        session = self.wide_sessions.get(variant) if wide else None
        session = session or self.sessions[variant]
        return session.run([self.manifest.output.name], {self.manifest.input.name: x})[0]

    def run_probes(self, variant: str, x: np.ndarray) -> list[np.ndarray]:
        """Blocking: the intermediate tensors named by manifest.layer_probes, in probe order."""
        assert self.manifest is not None
        names = probe_names(self.manifest, variant)
        return self.probe_sessions[variant].run(names, {self.manifest.input.name: x})


def check_repository(name: str) -> None:
    """The model repository extension names repositories; this server has one, unnamed."""
    if name:
        raise BadInput(
            f"unknown repository {shown(name)}: this server has one (its models folder); leave "
            "repository_name empty"
        )


def check_load_parameters(names: list[str]) -> None:
    """Triton's load may override a model's config or files ('config', 'file:...'); a bundle
    loads only as it is on disk, so such parameters are refused, not ignored."""
    if names:
        raise BadInput(
            f"load parameters {shown_list(sorted(names))} are not supported: a bundle loads as "
            "it is on disk; write its files there (bnfold-train, bnfold import), then load it "
            "without parameters"
        )


def one_of(names: list[str]) -> str:
    """ "'a'", "'a' or 'b'", "'a', 'b' or 'c'"."""
    quoted = [repr(n) for n in names]
    return " or ".join(quoted) if len(quoted) < 3 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def probe_names(manifest: Manifest, variant: str) -> list[str]:
    """The tensors to expose in one variant's graph, one per folded BN (manifest order)."""
    attr = "folded_tensor" if variant == "folded" else "unfolded_tensor"
    return [getattr(p, attr) for p in manifest.layer_probes]


def load_model(
    path: Path,
    providers: list[str],
    threads: int = 0,
    spinning: bool = True,
    engine: str = "auto",
    wide_threads: int = 0,
) -> LoadedModel:
    """Verify a bundle and create its sessions. Never raises: a failure becomes `.error`.
    `wide_threads` above `threads` (0: onnxruntime's default, every core) adds wide sessions."""
    model = LoadedModel(name=path.name, path=path)
    try:
        model.manifest = load_bundle(path, PROBED)  # the others are checked one by one below
        _check_name(model.manifest, path)
        _check_preprocess(model.manifest, path)
        missing = [v for v in PROBED if v not in model.manifest.files]
        if missing:
            raise BundleError(f"{path}: the manifest lists no {' or '.join(missing)} file")
        model.sessions = {
            v: make_session(path / model.manifest.files[v].path, v, providers, threads, spinning)
            for v in PROBED
        }
        model.providers = model.sessions["folded"].get_providers()
        model.engines = {v: Engine("onnxruntime", "float32", cpu_flags()) for v in PROBED}
        if engine == "openvino" and providers == [CPU]:  # forced to float32: what was proved
            folded = path / model.manifest.files["folded"].path
            model.sessions["folded"] = OpenVinoSession(folded, "float32", threads)
            model.engines["folded"] = Engine("openvino", "float32", cpu_flags())
        for variant in model.sessions:
            _check_session(model, variant)
    except Exception as exc:  # any failure (ours, onnxruntime's, the file system's) is kept
        model.sessions = {}
        model.error = (
            exc.message if isinstance(exc, BnfoldError) else f"{type(exc).__name__}: {exc}"
        )
        log.error("bundle %s not served: %s", path, model.error)
        return model
    _load_optional(model, providers, threads, spinning, engine)
    _load_bf16(model, providers, threads, engine)
    _recheck_reduced(model)
    _load_probes(model, providers)
    _load_wide(model, providers, threads, wide_threads)
    log.info("bundle %s loaded (version %s, %s)", model.name, model.version, model.providers[0])
    return model


def _load_optional(
    model: LoadedModel, providers: list[str], threads: int, spinning: bool, engine: str
) -> None:
    """Variants beyond the float32 pair (int8): checksum, session, warm-up; a failure costs only
    that variant, kept with its reason."""
    m = model.manifest
    assert m is not None
    for variant, f in m.files.items():
        if variant in PROBED:
            continue
        try:
            verify_checksums(model.path, m, [variant])
            if variant == INT8 and _openvino_int8(engine, providers):
                model.sessions[variant] = OpenVinoSession(model.path / f.path, "float32", threads)
                model.engines[variant] = Engine("openvino", "int8", cpu_flags())
            else:
                model.sessions[variant] = make_session(
                    model.path / f.path, variant, providers, threads, spinning
                )
                precision = "int8" if variant == INT8 else "float32"
                model.engines[variant] = Engine("onnxruntime", precision, cpu_flags())
            _check_session(model, variant)
        except Exception as exc:
            _refuse(model, variant, exc)


WIDE_VARIANTS = ("folded", INT8)  # what production traffic runs; unfolded is for comparisons
# A wide session holds the variant's weights again: about 2.2x its file (the heavy benchmark
# model's 45 MB folded.onnx added 100 MiB to a worker). Larger files get none.
WIDE_MAX_BYTES = 128 * 2**20


def _load_wide(model: LoadedModel, providers: list[str], threads: int, wide: int) -> None:
    """Sessions on `wide` intra-op threads (never spinning) beside the folded and int8 ones,
    when that is more than `threads`, onnxruntime runs them on the CPU and the file is at most
    WIDE_MAX_BYTES: a run that finds the machine otherwise idle takes every core
    (service.batching). Each is the variant's file, checked as its first session was; a
    failure costs only the wide session."""
    if providers != [CPU] or threads == 0 or wide <= threads:
        return
    m = model.manifest
    assert m is not None
    for variant in WIDE_VARIANTS:
        engine = model.engines.get(variant)
        if variant not in model.sessions or engine is None or engine.engine != "onnxruntime":
            continue
        path = model.path / m.files[variant].path
        size = path.stat().st_size
        if size > WIDE_MAX_BYTES:
            log.info("bundle %s: variant %s: no %d-thread session: its file is %d MiB, over %d "
                     "(its weights would be held twice)", model.name, variant, wide,
                     size >> 20, WIDE_MAX_BYTES >> 20)  # fmt: skip
            continue
        try:
            session = make_session(path, variant, providers, wide, spinning=False)
            narrow, model.sessions[variant] = model.sessions[variant], session
            try:
                _check_session(model, variant)
            finally:
                model.sessions[variant] = narrow
            model.wide_sessions[variant] = session
        except Exception as exc:  # the narrow session serves on; say why there is no wide one
            log.warning("bundle %s: variant %s: no %d-thread session: %s",
                        model.name, variant, wide, exc)  # fmt: skip


def _refuse(model: LoadedModel, variant: str, exc: Exception | str) -> None:
    """Stop serving one variant, keeping why."""
    model.sessions.pop(variant, None)
    model.engines.pop(variant, None)
    if isinstance(exc, str):
        reason = exc
    else:
        reason = exc.message if isinstance(exc, BnfoldError) else f"{type(exc).__name__}: {exc}"
    model.variant_errors[variant] = reason
    log.error("bundle %s: variant %s not served: %s", model.name, variant, reason)


def _openvino_int8(engine: str, providers: list[str]) -> bool:
    """int8 runs on OpenVINO only when asked for (BNFOLD_ENGINE=openvino) and installed: its
    proof in the bundle was made with onnxruntime, which `auto` keeps."""
    return engine == "openvino" and providers == [CPU] and openvino_capabilities() is not None


def _load_bf16(model: LoadedModel, providers: list[str], threads: int, engine: str) -> None:
    """bf16 from folded.onnx, for a bundle that asked for it, where this CPU computes it
    natively; else why not, for the 400."""
    m = model.manifest
    assert m is not None
    if m.equivalence.bf16 is None:
        return
    reason = bf16_unavailable_reason()
    if engine == "onnxruntime":
        reason = "BNFOLD_ENGINE=onnxruntime serves no bf16 (it runs on OpenVINO)"
    elif providers != [CPU]:
        reason = "bf16 runs on OpenVINO's CPU plugin; this server uses the CUDA provider"
    if reason is not None:
        model.unavailable[BF16] = reason
        return
    try:
        model.sessions[BF16] = OpenVinoSession(model.path / m.files["folded"].path, "bf16", threads)
        model.engines[BF16] = Engine("openvino", "bf16", cpu_flags())
        _check_session(model, BF16)
    except Exception as exc:
        _refuse(model, BF16, exc)


def _recheck_reduced(model: LoadedModel) -> None:
    """Each reduced-precision variant against folded float32 on the bundle's check inputs, on
    this CPU; one that fails its criterion is not served."""
    variants = [v for v in REDUCED if v in model.sessions]
    if not variants:
        return
    m = model.manifest
    assert m is not None
    if m.check_inputs is None:  # a bundle made before bundles kept them: served as proved
        log.info("bundle %s: %s not measured again (no check inputs)", model.name, variants)
        return
    try:
        x = load_check_inputs(model.path, m)
    except BnfoldError as exc:  # read_manifest refuses this already; the files may have changed
        for variant in variants:
            _refuse(model, variant, exc)
        return
    if x is None:
        why = f"{m.check_inputs.path} is missing or its sha256 differs from the manifest"
        for variant in variants:
            _refuse(model, variant, f"cannot be checked on this CPU: {why}")
        return
    source = m.check_inputs.source
    names = m.input.name, m.output.name
    want = run_logits(model.sessions["folded"], *names, x)
    for variant in variants:
        try:
            reason = recheck(variant, run_logits(model.sessions[variant], *names, x), want, source)
        except Exception as exc:
            reason = f"its check on this CPU failed to run: {type(exc).__name__}: {exc}"
        if reason is not None:
            _refuse(model, variant, reason)


def _check_name(manifest: Manifest, path: Path) -> None:
    if manifest.name != path.name:
        raise BundleError(
            f"{path}: folder name {path.name!r} differs from the manifest name "
            f"{manifest.name!r}; rename the folder to the model name"
        )


def _check_preprocess(manifest: Manifest, path: Path) -> None:
    """Refuse a bundle whose preprocessing makes tensors the model does not take: it could
    answer no image (every predict would be a 400)."""
    spec, shape = manifest.input.preprocess, manifest.input.shape
    c, h, w = spec.channels, spec.height, spec.width
    made = [c, h, w] if spec.layout == "NCHW" else [h, w, c]
    axes = "(C, H, W)" if spec.layout == "NCHW" else "(H, W, C)"
    fits = len(shape) == 4 and all(d in (-1, m) for d, m in zip(shape[1:], made, strict=True))
    if not fits:
        raise BundleError(
            f"{path}: input.preprocess makes {spec.layout} images of {axes} {made} "
            f"({spec.color_mode} {w}x{h}), but the model input {manifest.input.name!r} has shape "
            f"{shape}: no image could be served; fix input.preprocess or input.shape"
        )


def _check_session(model: LoadedModel, variant: str) -> None:
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
        note = getattr(m, "layer_probes_note", None)  # why the exporter wrote none
        model.probe_error = note or "the bundle lists no layer probes"
        return
    try:
        for v in PROBED:
            path = model.path / m.files[v].path
            model.probe_sessions[v] = make_probe_session(path, probe_names(m, v), providers)
    except ImportError:
        model.probe_error = "per-layer differences need the onnx package, not installed here"
    except Exception as exc:
        model.probe_error = f"probe sessions failed: {type(exc).__name__}: {exc}"
    if model.probe_error:
        model.probe_sessions = {}
        log.warning("bundle %s: no per-layer differences: %s", model.name, model.probe_error)


class ModelRegistry:
    """The bundles of `settings.models_dir`: loaded at start, reloaded, loaded or unloaded on
    request; readiness says whether every bundle found is served."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, LoadedModel] = {}
        self.unloaded: set[str] = set()  # unloaded on request, not loaded again since
        self.loaded = False
        self._changing = asyncio.Lock()

    async def start(self) -> None:
        """Resolve the provider (a bad choice fails start-up) and load every bundle off the
        event loop."""
        providers = resolve_providers(self.settings.provider)
        self.models = await anyio.to_thread.run_sync(self._load_all, providers)
        self.loaded = True

    def _load_all(self, providers: list[str]) -> dict[str, LoadedModel]:
        paths = discover_bundles(self.settings.models_dir)
        if not paths:
            log.warning("no model bundles in %s", self.settings.models_dir)
        return {p.name: self._load(p, providers) for p in paths}

    def close(self) -> None:
        self.models, self.loaded = {}, False

    def not_ready_reason(self) -> str | None:
        """None when every bundle loaded; else why the server is not ready."""
        if not self.loaded:
            return "model bundles are still loading"
        if not self.models and self.unloaded:
            return f"no model is served: {', '.join(sorted(self.unloaded))} unloaded ({LOAD_AGAIN})"
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
        if model is None and name in self.unloaded:
            raise NotFound(f"unknown model {name!r}: it was unloaded ({LOAD_AGAIN})")
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model {shown(name)}; models served here: {known}")
        if version is not None and model.manifest and version != model.version:
            raise NotFound(
                f"model {name!r} has no version {shown(version)}; it has {model.version!r}"
            )
        return model

    def get_ready(self, name: str, version: str | None = None) -> LoadedModel:
        """The model when it can answer; 503 with the load failure when it cannot."""
        model = self.get(name, version)
        if not model.ready:
            raise ServiceUnavailable(f"model {name!r} is not ready: {model.error}")
        return model

    def bundle_path(self, name: str) -> Path:
        """Where the bundle `name` lives (it may not exist yet); 400 for a name that could
        leave the models folder."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise BadInput(f"{shown(name)} is not a bundle name (letters, digits, '_', '.', '-')")
        return Path(self.settings.models_dir) / name

    async def load(self, name: str) -> LoadedModel:
        """Verify the bundle on disk (checksums, sessions, warm-up) and only then put it in
        service, in one assignment: requests already admitted finish on the sessions they
        hold. A bundle that fails verification is not served, and the version served before
        (if any) stays in service: 400 with the reason."""
        path = self.existing_bundle(name)
        async with self._changing:  # one load at a time: the last one asked wins, whole
            model = await anyio.to_thread.run_sync(self.verify, path)
            if not model.ready:
                raise self.refused(name, model)
            self.install(name, model)
        log.info("bundle %s in service (version %s)", name, model.version)
        return model

    def existing_bundle(self, name: str) -> Path:
        """The folder of bundle `name`; 404 when it holds no bundle.json."""
        path = self.bundle_path(name)
        if not (path / "bundle.json").is_file():
            raise NotFound(
                f"no bundle {name!r} in {self.settings.models_dir}: write {name}/bundle.json and "
                "its ONNX files there first"
            )
        return path

    def verify(self, path: Path) -> LoadedModel:
        """Blocking: `load_model` with this registry's settings."""
        return self._load(path, resolve_providers(self.settings.provider))

    def _load(self, path: Path, providers: list[str]) -> LoadedModel:
        s = self.settings
        wide = idle_threads(s.idle_threads, usable_cpus())
        return load_model(path, providers, s.threads, s.thread_spinning, s.engine, wide)

    def refused(self, name: str, model: LoadedModel) -> BadInput:
        """The 400 for a bundle that failed verification (the old version stays)."""
        old = self.models.get(name)
        kept = "; the version loaded before is still served" if old and old.ready else ""
        return BadInput(f"bundle {name!r} failed verification, not loaded: {model.error}{kept}")

    def install(self, name: str, model: LoadedModel) -> None:
        """Put a verified model in service, in one assignment."""
        self.models[name] = model
        self.unloaded.discard(name)

    async def reload(self, name: str) -> LoadedModel:
        """Load again a model the registry knows (404 otherwise)."""
        self.get(name)
        return await self.load(name)

    def unload(self, name: str) -> LoadedModel:
        """Take a model out of service (404 when unknown); admitted requests still finish."""
        model = self.get(name)
        del self.models[name]
        self.unloaded.add(name)
        log.info("bundle %s unloaded", name)
        return model

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every bundle of the repository: served ones (READY), failed ones (UNAVAILABLE with the
        reason), and folders on disk not loaded (UNAVAILABLE, 'not loaded'); by name."""
        entries = {}
        for path in discover_bundles(self.settings.models_dir):
            entries[path.name] = IndexEntry(path.name, "", "UNAVAILABLE", "not loaded")
        for name, model in self.models.items():
            state, reason = ("READY", "") if model.ready else ("UNAVAILABLE", model.error or "")
            entries[name] = IndexEntry(name, model.version or "", state, reason)
        rows = [entries[n] for n in sorted(entries)]
        return [r for r in rows if r.state == "READY"] if ready_only else rows


@dataclass(frozen=True)
class IndexEntry:
    """One row of the model repository index (the Open Inference Protocol's extension)."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str
