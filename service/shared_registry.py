"""The model registry of one worker among several (BNFOLD_WORKERS > 1).

Loads, reloads and unloads sent to this worker are done here, then written to the cluster's
operation log (service/cluster.py); the other workers' operations are applied here, in log
order, within `POLL_S`. Every `POLL_S` the worker also publishes its own readiness.
"""

from __future__ import annotations

import asyncio
import logging
import os

from bnfold.errors import BnfoldError
from service.cluster import POLL_S, Member
from service.config import Settings
from service.registry import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)


class SharedRegistry(ModelRegistry):
    """The model registry of one worker among several: loads, reloads and unloads sent to this
    worker go to the operation log, and the others' are applied here."""

    def __init__(self, settings: Settings, member: Member) -> None:
        super().__init__(settings)
        self.member = member
        self._applied = 0
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one catch-up at a time: operations apply once, in order

    async def start(self) -> None:
        start_seq = self.member.join()
        await super().start()
        self._replay_unloads(start_seq)
        self._applied = start_seq
        self.member.cluster.applied[self.member.index] = start_seq
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="cluster sync")

    def close(self) -> None:
        self.member.set_ready(False)
        if self._task is not None:
            self._task.cancel()
        super().close()

    async def load(self, name: str) -> LoadedModel:
        """Load here, then in every other worker (waited for, at most the request timeout)."""
        await self._catch_up()  # the others' earlier operations first, in log order
        model = await super().load(name)
        n = self.member.cluster.append("load", name, self.member.index)
        behind = await self.member.wait_applied(n, self.settings.request_timeout_s)
        if behind:
            slots = ", ".join(str(i + 1) for i in behind)
            log.warning("load %s: worker(s) %s have not applied it yet", name, slots)
        return model

    def unload(self, name: str) -> LoadedModel:
        """Unload here; the other workers unload within `POLL_S` (not waited for)."""
        model = super().unload(name)
        self.member.cluster.append("unload", name, self.member.index)
        return model

    def _replay_unloads(self, upto: int) -> None:
        last: dict[str, str] = {}
        for n in range(1, upto + 1):
            entry = self.member.cluster.read(n)
            last[entry["model"]] = entry["op"]
        for name, op in last.items():
            if op == "unload" and name in self.models:
                ModelRegistry.unload(self, name)

    async def _follow(self) -> None:
        """Every POLL_S: publish this worker's readiness, apply the operations it missed."""
        while True:
            try:
                await self._catch_up()
                self.member.set_ready(self.loaded and super().not_ready_reason() is None)
            except Exception:  # a bad log entry must not stop the worker following the log
                log.exception("cluster sync: operation %d failed", self._applied + 1)
                self._applied += 1
            await asyncio.sleep(POLL_S)

    async def _catch_up(self) -> None:
        cluster = self.member.cluster
        async with self._lock:
            while self._applied < cluster.seq.value:
                await self._apply(self._applied + 1)
                self._applied += 1
                cluster.applied[self.member.index] = self._applied

    async def _apply(self, n: int) -> None:
        entry = self.member.cluster.read(n)
        if entry["slot"] == self.member.index and entry["pid"] == os.getpid():
            return  # this worker's own operation, done before it was logged
        op, name = entry["op"], entry["model"]
        try:
            if op == "unload":
                if name in self.models:
                    ModelRegistry.unload(self, name)
            else:
                await ModelRegistry.load(self, name)
        except BnfoldError as exc:  # the files changed again since: the next operation tells
            log.warning("cluster: %s %s (operation %d) failed here: %s", op, name, n, exc.message)
            return
        log.info("cluster: applied %s %s (operation %d from worker pid %d)", op, name, n,
                 entry["pid"])  # fmt: skip
