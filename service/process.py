"""What one server process holds: settings, metrics, the registry, admission, the CPU threads,
the data plane and the admin guard (its `Core`).

Built once per process (`Core.build`) and shared by every protocol the process speaks: the REST
app reads it from `app.state.core`, the gRPC servicer is given it. Neither protocol owns it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.admin import AdminGuard
from service.admission import Admission
from service.calls import CallLog
from service.config import Settings
from service.cpus import usable_cpus
from service.dataplane import DataPlane, Runner
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.threads import CpuThreads, thread_count

if TYPE_CHECKING:
    from service.cluster import Member


@dataclass(eq=False)
class Core:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    admission: Admission
    threads: CpuThreads
    plane: DataPlane
    admin: AdminGuard
    calls: CallLog
    peers: Member | None = None  # the other worker processes (BNFOLD_WORKERS > 1)
    # A listener the server has still to open (its gRPC port, opened after HTTP's): not ready
    # until it is, or a client's long-lived connections would all go to the other workers.
    opening: str | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        runner: Runner | None = None,
        registry: ModelRegistry | None = None,
        cores: int | None = None,
    ) -> Core:
        """Nothing loaded yet: readiness answers 503 until `start`. `cores`: the cores this
        process may use (default all usable ones; a worker process gets its share)."""
        metrics = Metrics()
        registry = registry or ModelRegistry(settings)
        admission = Admission(settings, registry, metrics)
        threads = CpuThreads(thread_count(usable_cpus() if cores is None else cores))
        plane = DataPlane(settings, metrics, threads, runner)
        admin = AdminGuard(settings.admin_token)
        calls = CallLog(metrics, registry)
        return cls(settings, metrics, registry, admission, threads, plane, admin, calls)

    async def start(self) -> None:
        await self.registry.start()
        settle_heap()

    async def aclose(self) -> None:
        await self.plane.aclose()
        self.threads.close()
        self.registry.close()

    def not_ready_reason(self) -> str | None:
        """None when the server can answer every model; else why not (readiness)."""
        if self.admission.draining:
            return "shutting down: finishing the requests in flight"
        if self.opening:
            return f"starting: the {self.opening} port is not open yet"
        own = self.registry.not_ready_reason()
        return own or (self.peers.others_not_ready() if self.peers else None)


def settle_heap() -> None:
    """Put what start-up built (modules, the app, the loaded models: about a million objects)
    out of the cyclic garbage collector's reach. Every full collection traversed all of it: under
    load a worker paused its event loop 45-60 ms about twice a second, the tail of its latency.
    Objects made later (a reloaded model included) are collected as usual."""
    gc.collect()
    gc.freeze()
