"""The model registry of one worker among several (BNFOLD_WORKERS > 1).

Loads, reloads and unloads sent to this worker are done here, then written to the cluster's
operation log (service/cluster.py); the other workers' operations are applied here, in log
order, within `POLL_S`. Every `POLL_S` the worker also publishes its own readiness.

A load never makes the other workers read the models folder again: this worker copies the
bundle into the cluster's state folder (`snapshot`), verifies the copy, and logs the copy's
path with the checksums it verified; the others load that copy and check those checksums. An
operation a worker cannot apply is not counted as applied: the worker reads not ready, tries
again every `RETRY_S`, and the worker that logged it answers 503 instead of success. A worker
that starts rebuilds the state the log describes (`_rebuild`), not what the folder holds now.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

import anyio

from bnfold.bundle import (
    MANIFEST_NAME,
    bundle_file,
    discover_bundles,
    listed_files,
    read_manifest,
    sha256_file,
)
from bnfold.errors import BnfoldError, BundleError
from service.cluster import POLL_S, Member
from service.config import Settings
from service.errors import ServiceUnavailable
from service.registry import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)
RETRY_S = 1.0  # a worker that could not apply an operation tries again this often
BASE = "base"  # bundles/<name>/base/<name>: the copy served while the log has no operation


class ApplyFailed(Exception):
    def __init__(self, n: int, reason: str) -> None:
        super().__init__(reason)
        self.n, self.reason = n, reason


def snapshot(source: Path, root: Path) -> Path:
    """Copy the bundle folder `source` (bundle.json and the files it lists, each a plain name
    whose real path lies in `source`) to a new folder root/<name>/<id>/<name>, returned. The
    copy, not `source`, is what gets verified and served: it cannot change afterwards."""
    name = source.name
    (root / name).mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(dir=root / name))
    target = holder / name
    target.mkdir()
    try:
        try:
            shutil.copyfile(source / MANIFEST_NAME, target / MANIFEST_NAME)
        except FileNotFoundError:
            raise BundleError(f"{source}: no {MANIFEST_NAME} in the bundle folder") from None
        try:
            manifest = read_manifest(target)
        except BundleError as exc:
            raise BundleError(exc.message.replace(str(target), str(source))) from None
        for field, file in listed_files(manifest):
            path = bundle_file(source, file, field)
            if path.is_file():  # a missing file is reported by the verification of the copy
                shutil.copyfile(path, target / file)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    return target


def relabel(model: LoadedModel, copy: Path, source: Path) -> LoadedModel:
    """The copy's path in the model's reasons reads as the bundle's own folder."""
    if model.error:
        model.error = model.error.replace(str(copy), str(source))
    model.variant_errors = {
        v: reason.replace(str(copy), str(source)) for v, reason in model.variant_errors.items()
    }
    return model


def pins(model: LoadedModel) -> dict[str, str]:
    """What a load verified: the sha256 of the copy's bundle.json and of each served file."""
    assert model.manifest is not None
    files = model.manifest.files
    return {
        MANIFEST_NAME: sha256_file(model.path / MANIFEST_NAME),
        **{v: f.sha256 for v, f in files.items() if v in model.sessions},
    }


def unpinned(model: LoadedModel, pinned: dict[str, str]) -> str | None:
    """None when the loaded copy is what the logged load verified; else how it differs."""
    assert model.manifest is not None
    if sha256_file(model.path / MANIFEST_NAME) != pinned.get(MANIFEST_NAME):
        return f"its {MANIFEST_NAME} differs from the one verified"
    for variant, digest in pinned.items():
        f = model.manifest.files.get(variant)  # type: ignore[call-overload]
        if variant != MANIFEST_NAME and (f is None or f.sha256 != digest):
            return f"its {variant} file differs from the one verified"
        if variant != MANIFEST_NAME and variant not in model.sessions:
            return f"its {variant} variant, served by the others, failed here: " + (
                model.variant_errors.get(variant) or "no session"
            )
    return None


class SharedRegistry(ModelRegistry):
    """The model registry of one worker among several: loads, reloads and unloads sent to this
    worker go to the operation log, and the others' are applied here."""

    def __init__(self, settings: Settings, member: Member) -> None:
        super().__init__(settings)
        self.member = member
        self._applied = 0
        self._installed: dict[str, int] = {}  # model -> the operation its state comes from
        self._failure: str | None = None  # why an operation could not be applied here
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one catch-up at a time: operations apply once, in order

    @property
    def cluster(self):
        return self.member.cluster

    async def start(self) -> None:
        start_seq = self.member.join()
        self.models = await anyio.to_thread.run_sync(self._rebuild, start_seq)
        self.loaded = True
        self._applied = start_seq
        self.cluster.applied[self.member.index] = start_seq
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="cluster sync")

    def close(self) -> None:
        self.member.set_ready(False)
        if self._task is not None:
            self._task.cancel()
        super().close()

    def not_ready_reason(self) -> str | None:
        if self._failure is not None:
            return (
                f"this worker could not apply a change made in another: {self._failure}; it "
                f"tries again every {RETRY_S:g} s"
            )
        return super().not_ready_reason()

    # --- requests sent to this worker ---------------------------------------------------

    async def load(self, name: str) -> LoadedModel:
        """Copy, verify and serve here, log the copy with its checksums, then wait until every
        other worker serves it too (at most the request timeout): 503 when one could not."""
        source = self.existing_bundle(name)
        await self._catch_up()  # the others' earlier operations first, in log order
        async with self._changing:
            model = await anyio.to_thread.run_sync(self._verify_copy, source)
            if not model.ready:
                raise self.refused(name, model)
            n = self.cluster.append(
                "load",
                name,
                self.member.index,
                path=str(model.path),
                version=model.version,
                sha256=pins(model),
            )
            self.install(name, model)
            self._installed[name] = n
        log.info("bundle %s in service (version %s, operation %d)", name, model.version, n)
        await self._wait_others(n, f"bundle {name!r} (version {model.version})")
        self._forget_older(name, n, model.path)
        return model

    def unload(self, name: str) -> LoadedModel:
        """Unload here; the other workers unload within `POLL_S` (not waited for)."""
        model = super().unload(name)
        self._installed[name] = self.cluster.append("unload", name, self.member.index)
        return model

    async def _wait_others(self, n: int, what: str) -> None:
        timeout = self.settings.request_timeout_s
        behind, failed = await self.member.wait_applied(n, timeout)
        if not behind:
            return
        slots = ", ".join(str(i + 1) for i in behind)
        if failed:
            log.error("operation %d: worker(s) %s could not apply it", n, slots)
            raise ServiceUnavailable(
                f"{what} is served by this worker, but worker(s) {slots} could not load it "
                "(the server log says why): the server reads not ready until every worker "
                "serves it; they try again"
            )
        log.warning("operation %d: worker(s) %s have not applied it in %g s", n, slots, timeout)
        raise ServiceUnavailable(
            f"{what} is served by this worker, but worker(s) {slots} have not loaded it within "
            f"{timeout:g} s; they still apply it"
        )

    def _verify_copy(self, source: Path) -> LoadedModel:
        """Blocking: a copy of the bundle, verified (a failed copy removed)."""
        try:
            copy = snapshot(source, self.cluster.snapshots)
        except Exception as exc:
            reason = exc.message if isinstance(exc, BnfoldError) else f"{type(exc).__name__}: {exc}"
            log.error("bundle %s not served: %s", source, reason)
            return LoadedModel(name=source.name, path=source, error=reason)
        model = relabel(self.verify(copy), copy, source)
        if not model.ready:
            shutil.rmtree(copy.parent, ignore_errors=True)
        return model

    def _forget_older(self, name: str, n: int, keep: Path) -> None:
        """Every worker serves operation n's copy: the copies of `name` before it can go."""
        root = self.cluster.snapshots / name
        older = [Path(e["path"]).parent for m, e in self.cluster.last_ops_of(name, n - 1)]
        for folder in [root / BASE, *older]:
            if folder != keep.parent and folder.parent == root:
                shutil.rmtree(folder, ignore_errors=True)

    # --- the state the log describes -----------------------------------------------------

    def _rebuild(self, upto: int) -> dict[str, LoadedModel]:
        """Blocking, at start: each model as its last operation up to `upto` left it (a load:
        its verified copy; an unload: not served); a model without one from its base copy."""
        last = self.cluster.last_ops(1, upto)
        names = {p.name for p in discover_bundles(self.settings.models_dir)} | set(last)
        models = {}
        for name in sorted(names):
            if name not in last:
                models[name] = self._load_base(name)
                continue
            n, entry = last[name]
            self._installed[name] = n
            if entry["op"] == "unload":
                self.unloaded.add(name)
            else:
                models[name] = self._load_logged(entry)
        return models

    def _load_base(self, name: str) -> LoadedModel:
        """The copy of the bundle that every worker serves until a load: the first worker to
        get here makes it (from the models folder), the others and any restarted one use it."""
        source = Path(self.settings.models_dir) / name
        base = self.cluster.snapshots / name / BASE / name
        if not base.is_dir():
            try:
                copy = snapshot(source, self.cluster.snapshots)
            except Exception:  # no copy to share: served as on disk, with its reason
                return self.verify(source)
            try:
                copy.parent.rename(base.parent)  # atomic; fails when another worker was first
            except OSError:
                shutil.rmtree(copy.parent, ignore_errors=True)
            if not base.is_dir():
                return self.verify(source)
        return relabel(self.verify(base), base, source)

    def _load_logged(self, entry: dict) -> LoadedModel:
        """Blocking: the copy a logged load verified, checked against its checksums."""
        copy = Path(entry["path"])
        model = relabel(self.verify(copy), copy, self.bundle_path(entry["model"]))
        if model.ready:
            wrong = unpinned(model, entry.get("sha256") or {})
            if wrong is not None:
                model.sessions, model.error = {}, f"not the bundle loaded: {wrong}"
        return model

    # --- following the log ------------------------------------------------------------------

    async def _follow(self) -> None:
        """Every POLL_S: apply the operations this worker missed, publish its readiness. An
        operation that fails is not counted: not ready, tried again every RETRY_S."""
        while True:
            delay = POLL_S
            try:
                await self._catch_up()
                if self._failure is not None:
                    log.warning("cluster: this worker applies every operation again")
                self._failure = None
                self.member.set_failed(0)
            except Exception as exc:
                n = exc.n if isinstance(exc, ApplyFailed) else self._applied + 1
                reason = exc.reason if isinstance(exc, ApplyFailed) else repr(exc)
                reason = f"operation {n}: {reason}"
                if reason != self._failure:
                    log.error("cluster: %s; not ready, trying again every %g s", reason, RETRY_S)
                self._failure = reason
                self.member.set_failed(n)
                delay = RETRY_S
            self.member.set_ready(self.loaded and self.not_ready_reason() is None)
            await asyncio.sleep(delay)

    async def _catch_up(self) -> None:
        """Apply the operations past `_applied` (for each model, its last one), then count
        them applied; a failure raises ApplyFailed and counts none."""
        cluster = self.cluster
        async with self._lock:
            seq = cluster.seq.value
            if self._applied >= seq:
                return
            pending = sorted(cluster.last_ops(self._applied + 1, seq).values(), key=lambda e: e[0])
            for n, entry in pending:
                await self._apply(n, entry)
            self._applied = seq
            cluster.applied[self.member.index] = seq

    async def _apply(self, n: int, entry: dict) -> None:
        name = entry["model"]
        if self._installed.get(name, 0) >= n:
            return  # this worker's own operation, or a later one already in place
        if entry["op"] == "unload":
            async with self._changing:
                if name in self.models:
                    ModelRegistry.unload(self, name)
                self._installed[name] = n
        else:
            model = await anyio.to_thread.run_sync(self._load_logged, entry)
            if not model.ready:
                raise ApplyFailed(n, f"load {name}: {model.error}")
            async with self._changing:
                if self._installed.get(name, 0) >= n:
                    return
                self.install(name, model)
                self._installed[name] = n
        log.info("cluster: applied %s %s (operation %d from worker pid %d)", entry["op"], name,
                 n, entry["pid"])  # fmt: skip
