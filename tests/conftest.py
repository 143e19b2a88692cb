"""Fixtures shared by the service and end-to-end tests: the bundle, digit PNGs, and the
independent reference (the bundle's ONNX run directly by onnxruntime, outside the service).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The shipped bundle; BNFOLD_TEST_BUNDLE points elsewhere (e.g. a freshly trained one).
BUNDLE_SRC = Path(os.environ.get("BNFOLD_TEST_BUNDLE", REPO / "models" / "digits"))


def variants_phrase(bundle: Path = BUNDLE_SRC) -> str:
    """The variants a bundle serves as the server names them in errors: "'folded' or 'unfolded'",
    or "'folded', 'unfolded' or 'int8'" for a bundle with an int8 file."""
    import json

    names = [repr(v) for v in json.loads((bundle / "bundle.json").read_text())["files"]]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


SERVED_VARIANTS = variants_phrase() if (BUNDLE_SRC / "bundle.json").is_file() else "?"
GRAPH_OPT = {
    "folded": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "unfolded": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


@dataclass(frozen=True)
class Digit:
    png: bytes
    label: int
    pixels: np.ndarray  # (8, 8) uint8, white ink on black


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bundle_src() -> Path:
    if not (BUNDLE_SRC / "bundle.json").is_file():
        pytest.fail(f"no bundle at {BUNDLE_SRC}: run `make train` (or set BNFOLD_TEST_BUNDLE)")
    return BUNDLE_SRC


@pytest.fixture(scope="session")
def models_dir(bundle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the bundle, so no test can touch the shipped one."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(bundle_src, root / "digits")
    return root


@pytest.fixture(scope="session")
def digits() -> list[Digit]:
    """The first 30 scikit-learn digits as 8x8 PNGs (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = np.round(raw.images[:30] * (255.0 / 16.0)).astype(np.uint8)
    return [Digit(png_bytes(p), int(t), p) for p, t in zip(pixels, raw.target[:30], strict=True)]


class DirectOnnx:
    """The bundle's ONNX files in plain onnxruntime sessions: the reference the server must
    match bit for bit at the same batch (same graph optimization level per variant)."""

    def __init__(self, bundle: Path) -> None:
        self.sessions = {}
        for variant, level in GRAPH_OPT.items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            self.sessions[variant] = ort.InferenceSession(
                str(bundle / f"{variant}.onnx"), opts, providers=["CPUExecutionProvider"]
            )

    def logits(self, x: np.ndarray, variant: str = "folded") -> np.ndarray:
        return self.sessions[variant].run(["logits"], {"input": x})[0]


@pytest.fixture(scope="session")
def direct(bundle_src: Path) -> DirectOnnx:
    return DirectOnnx(bundle_src)


@pytest.fixture(scope="session")
def digit_batch(digits: list[Digit], bundle_src: Path) -> np.ndarray:
    """The digits through the shared preprocessing: (N, 1, 8, 8) float32."""
    from bnfold.bundle import read_manifest
    from bnfold.preprocess import preprocess_bytes

    spec = read_manifest(bundle_src).input.preprocess
    return np.stack([preprocess_bytes(d.png, spec) for d in digits])


# --- No test leaves a process behind -------------------------------------------------------------
#
# Every process this test run starts carries RUN_MARK in its environment (inherited from this
# process, whatever its parent becomes: a server's workers re-parented to PID 1 after their
# supervisor was killed still carry it), or descends from this process. A process started by a
# test (or by a function-scoped fixture) must be gone once the test's teardown is over; one
# started by a fixture of a wider scope (or a descendant of such a process), once that scope
# ends. A process still there after `LEAK_GRACE_S` fails the teardown of the test that left it,
# and is killed so that it does not hold ports for the tests after it.

RUN_MARK = "BNFOLD_TEST_RUN"
os.environ[RUN_MARK] = f"{os.getpid()}-{os.urandom(4).hex()}"
# A server told to stop may still be draining: wait this long for it.
LEAK_GRACE_S = float(os.environ.get("BNFOLD_TEST_LEAK_GRACE_S", "20"))
PYTEST_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
_owner_scope: dict[int, str] = {}  # pid -> scope of the fixture that started it
_before_run: set[int] = set()  # processes of this run that existed before the first test


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmdline: str


def run_processes() -> dict[int, Proc]:
    """The live processes (not zombies) of this test run, this process excepted, from /proc:
    those with this run's mark in their environment, and this process's descendants."""
    me, mark = os.getpid(), f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()
    table: dict[int, tuple[int, bool, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            fields = stat.rsplit(b")", 1)[1].split()
            if fields[0] in (b"Z", b"X"):
                continue  # exited; its parent has not reaped it yet
            marked = mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # gone meanwhile, or another user's
        table[pid] = (int(fields[1]), marked, cmdline.decode(errors="replace").strip())

    def descends(pid: int) -> bool:
        seen = set()
        while pid in table and pid not in seen:
            seen.add(pid)
            pid = table[pid][0]
            if pid == me:
                return True
        return False

    out = {}
    for pid, (ppid, marked, cmdline) in table.items():
        if pid == me or (ppid == me and any(h in cmdline for h in PYTEST_HELPERS)):
            continue  # this process, or a helper of its own that lives as long as it
        if marked or descends(pid):
            out[pid] = Proc(pid, ppid, cmdline)
    return out


def _scope_of(pid: int, procs: dict[int, Proc]) -> str:
    """The scope of the fixture that started `pid` or its nearest known ancestor (a worker a
    supervisor restarted belongs to the supervisor's fixture); else a test's: "function"."""
    seen = set()
    while pid not in _owner_scope and pid in procs and pid not in seen:
        seen.add(pid)
        pid = procs[pid].ppid
    return _owner_scope.get(pid, "function")


def _ending_scopes(item: pytest.Item, nextitem: pytest.Item | None) -> set[str]:
    if nextitem is None:
        return {"function", "class", "module", "package", "session"}
    ending = {"function"}
    if getattr(item, "cls", None) is not getattr(nextitem, "cls", None):
        ending.add("class")
    if getattr(item, "module", None) is not getattr(nextitem, "module", None):
        ending |= {"class", "module"}
    return ending


def pytest_sessionstart(session: pytest.Session) -> None:
    _before_run.update(run_processes())


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    if fixturedef.scope == "function":
        return (yield)
    before = set(run_processes())
    try:
        return (yield)
    finally:
        for pid in set(run_processes()) - before:
            _owner_scope.setdefault(pid, fixturedef.scope)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    ending = _ending_scopes(item, nextitem)

    def leaked() -> dict[int, Proc]:
        procs = run_processes()
        return {
            pid: proc
            for pid, proc in procs.items()
            if pid not in _before_run and _scope_of(pid, procs) in ending
        }

    deadline = time.monotonic() + LEAK_GRACE_S
    left = leaked()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leaked()
    if left:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        lines = "\n".join(
            f"  pid {p.pid} (parent {p.ppid}): {p.cmdline[:200]}" for p in left.values()
        )
        raise AssertionError(
            f"{item.nodeid} left {len(left)} process(es) running {LEAK_GRACE_S:g} s after its "
            f"teardown (now killed):\n{lines}"
        )
    return result
