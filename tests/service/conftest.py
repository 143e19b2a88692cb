"""Service fixtures: a TestClient whose lifespan ran (sessions loaded) over a copy of the bundle,
and a factory for apps with other settings or damaged bundles."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():  # Starlette's notice that its TestClient will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.logs import log_handler
from tests.conftest import DirectOnnx
from tests.pinned import THREADS, pinned_direct


@contextlib.contextmanager
def captured_log(fmt: str, name: str = "service") -> Iterator[io.StringIO]:
    """What the service's own handler (`fmt`: text or json) writes for logger `name` at INFO
    while inside; the logger's handlers and level are as before afterwards."""
    stream = io.StringIO()
    handler = log_handler(fmt, stream)
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="session")
def settings(models_dir: Path) -> Settings:
    return Settings(models_dir=models_dir, provider="cpu", max_images_per_request=32,
                    threads=THREADS)  # fmt: skip


@pytest.fixture(scope="session")
def direct(bundle_src: Path) -> DirectOnnx:
    """The reference at the apps' intra-op thread count (tests/pinned.py)."""
    return pinned_direct(bundle_src)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def serve() -> Iterator[Callable[..., TestClient]]:
    """serve(models_dir, **settings) -> a started TestClient; stopped after the test."""
    clients: list[TestClient] = []

    def start(models_dir: Path, runner=None, **overrides) -> TestClient:
        s = Settings(models_dir=models_dir, provider="cpu", **{"threads": THREADS, **overrides})
        c = TestClient(create_app(s, runner=runner))
        c.__enter__()
        clients.append(c)
        return c

    yield start
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def copy_bundle(bundle_src: Path, tmp_path: Path) -> Callable[..., Path]:
    """copy_bundle(name) -> tmp_path/models/<name>, a valid copy to damage or serve."""

    def copy(name: str = "digits") -> Path:
        dst = tmp_path / "models" / name
        shutil.copytree(bundle_src, dst)
        manifest = json.loads((dst / "bundle.json").read_text())
        manifest["name"] = name
        (dst / "bundle.json").write_text(json.dumps(manifest))
        return dst

    return copy
