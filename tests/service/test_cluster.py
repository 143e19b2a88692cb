"""service/cluster.py and service/shared_registry.py: two worker registries on one `Cluster`.

Both registries live in this process (the shared arrays work within a process as across), each
in its own slot, with the real digits bundle: what one worker does reaches the other through
the operation log, readiness needs both, and a worker started later replays the unloads.
"""

from __future__ import annotations

import asyncio

from service.cluster import Cluster, Member
from service.config import Settings
from service.shared_registry import SharedRegistry


async def until(condition, timeout: float = 30.0) -> None:
    """Poll (the registries follow the log every POLL_S); fail if never true."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_operations_and_readiness_reach_every_worker(models_dir, tmp_path):
    cluster = Cluster(2, tmp_path / "state")
    settings = Settings(models_dir=models_dir, provider="cpu", threads=1)
    first, second = Member(cluster, 0), Member(cluster, 1)

    async def main() -> None:
        a = SharedRegistry(settings, first)
        assert "2 of 2 not ready" in first.others_not_ready()  # the other has not started
        await a.start()
        b = SharedRegistry(settings, second)
        await b.start()
        await until(lambda: first.others_not_ready() is None and second.others_not_ready() is None)

        before = b.models["digits"]
        await a.reload("digits")  # answered once b has applied it too
        assert b.models["digits"] is not before and b.models["digits"].ready
        assert cluster.applied[1] == cluster.seq.value == 1

        a.unload("digits")
        await until(lambda: "digits" not in b.models)

        b.close()  # worker 2 stops; the supervisor clears its slot
        cluster.worker_gone(1)
        assert "2 of 2 not ready" in first.others_not_ready()
        restarted = SharedRegistry(settings, second)
        await restarted.start()  # loads every bundle from disk, then replays the unload
        assert "digits" not in restarted.models
        await restarted.load("digits")  # back in service on both
        assert "digits" in a.models and a.models["digits"].ready
        restarted.close()
        a.close()

    asyncio.run(main())
