"""Every worker serves the version a load verified, whatever happens on disk afterwards.

Two worker registries on one `Cluster` in this process (as tests/service/test_cluster.py), the
second one's log-following driven by the test, so each step happens in a known order: a load
logs the verified copy with its checksums and the others load that copy (files changed on
disk in between change nothing); an operation a worker cannot apply is never counted as
applied (not ready, 503 to the load, applied once it can); a restarted worker rebuilds what
the log says, not what the models folder holds now.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from service.cluster import Cluster, Member
from service.config import Settings
from service.errors import ServiceUnavailable
from service.shared_registry import SharedRegistry
from tests.service.test_cluster import until


def set_version(models: Path, version: str) -> None:
    """A new version on disk (bundle.json only: the ONNX files keep their checksums)."""
    path = models / "digits" / "bundle.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    path.write_text(json.dumps(manifest))


@pytest.fixture
def models(models_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(models_dir, tmp_path / "models")
    set_version(tmp_path / "models", "100")
    return tmp_path / "models"


def pair(models: Path, tmp_path: Path, **settings):
    cluster = Cluster(2, tmp_path / "state")
    s = Settings(models_dir=models, provider="cpu", threads=1, **settings)
    return cluster, s, Member(cluster, 0), Member(cluster, 1)


async def started(settings: Settings, member: Member, follow: bool = True) -> SharedRegistry:
    registry = SharedRegistry(settings, member)
    await registry.start()
    if not follow:  # the test applies the log itself, when it chooses
        registry._task.cancel()
    return registry


def test_the_others_load_the_verified_copy_not_the_files_on_disk_now(models, tmp_path):
    cluster, settings, first, second = pair(models, tmp_path)

    async def main() -> None:
        a = await started(settings, first)
        b = await started(settings, second, follow=False)
        set_version(models, "201")
        load = asyncio.create_task(a.load("digits"))
        await until(lambda: cluster.seq.value == 1)  # verified by a and logged
        set_version(models, "202")  # the files change before b applies the load
        await b._catch_up()
        assert (await load).version == "201"
        assert a.models["digits"].version == b.models["digits"].version == "201"
        entry = cluster.read(1)
        assert entry["version"] == "201" and set(entry["sha256"]) >= {"bundle.json", "folded"}
        a.close()
        b.close()

    asyncio.run(main())


def test_an_operation_that_fails_is_not_applied_and_the_worker_is_not_ready(models, tmp_path):
    cluster, settings, first, second = pair(models, tmp_path, request_timeout_s=60)

    async def main() -> None:
        a = await started(settings, first)
        b = await started(settings, second, follow=False)
        set_version(models, "201")
        load = asyncio.create_task(a.load("digits"))
        await until(lambda: cluster.seq.value == 1)
        copy = Path(cluster.read(1)["path"])
        good = (copy / "folded.onnx").read_bytes()
        (copy / "folded.onnx").write_bytes(good + b"\0")  # b cannot verify what a verified
        b._task = asyncio.get_running_loop().create_task(b._follow())  # b follows again
        with pytest.raises(ServiceUnavailable, match="worker.s. 2 could not load it"):
            await load  # not success: the other worker serves something else
        assert cluster.applied[1] == 0 and cluster.failed[1] == 1
        assert b.models["digits"].version == "100"
        await until(lambda: not cluster.ready[1])
        assert "could not apply a change made in another" in b.not_ready_reason()
        assert "not ready" in first.others_not_ready()

        (copy / "folded.onnx").write_bytes(good)  # it tries again, and now applies it
        await until(lambda: cluster.applied[1] == 1 and cluster.ready[1], timeout=60)
        assert b.models["digits"].version == "201" and b.not_ready_reason() is None
        a.close()
        b.close()

    asyncio.run(main())


def test_a_restarted_worker_rebuilds_what_the_log_says_not_what_is_on_disk(models, tmp_path):
    cluster, settings, first, second = pair(models, tmp_path)

    async def restart(b: SharedRegistry) -> SharedRegistry:
        b.close()
        cluster.worker_gone(1)
        return await started(settings, second)

    async def main() -> None:
        a = await started(settings, first)
        b = await started(settings, second)
        set_version(models, "999")  # never loaded: the base copy stays what is served
        b = await restart(b)
        assert b.models["digits"].version == a.models["digits"].version == "100"

        set_version(models, "101")
        await a.load("digits")
        set_version(models, "102")  # on disk, not loaded
        b = await restart(b)
        assert b.models["digits"].version == "101"

        a.unload("digits")
        await until(lambda: "digits" not in b.models)
        b = await restart(b)
        assert "digits" not in b.models and "digits" in b.unloaded
        a.close()
        b.close()

    asyncio.run(main())
