"""Inside one worker process of `BNFOLD_WORKERS=N` (service/supervisor.py): its server.

The worker is the single-process server (`DrainingServer`: REST and gRPC, graceful shutdown)
with three differences: its registry shares reloads and readiness with the other workers
(service/cluster.py), its onnxruntime sessions and decoding threads get its share of the cores,
and its slot reads not ready from the moment it starts draining.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from service.cluster import Cluster, Member
from service.config import Settings
from service.cpus import threads_per_worker, usable_cpus
from service.process import Core
from service.server import DrainingServer, uvicorn_config
from service.shared_registry import SharedRegistry


class WorkerServer(DrainingServer):
    """A `DrainingServer` whose cluster slot reads not ready until its gRPC port is open and
    from the moment its drain begins."""

    def __init__(self, config: uvicorn.Config, core: Core, member: Member) -> None:
        super().__init__(config, core)
        self.member = member

    def opening(self, listener: str | None) -> None:
        super().opening(listener)
        self.member.opening = listener  # the other workers see this one not ready meanwhile
        if listener is not None:
            self.member.set_ready(False)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.member.set_ready(False)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, except that the handlers give way to SIG_IGN, not to the defaults: after
        its drain a worker only exits, and a late SIGTERM or SIGINT (a process group's signal
        reaches it directly and again forwarded by the supervisor) would kill it then, exit
        -15 after a clean drain. The supervisor still kills a worker that does not exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.handle_exit)
        try:
            yield
        finally:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


def build_worker_server(settings: Settings, index: int, cluster: Cluster) -> WorkerServer:
    """Worker `index`'s server: its core (registry in the cluster) and uvicorn config."""
    share = threads_per_worker(0, usable_cpus(), cluster.workers)  # this worker's cores
    member = Member(cluster, index)
    core = Core.build(settings, registry=SharedRegistry(settings, member), cores=share)
    core.peers = member
    return WorkerServer(uvicorn_config(settings, core), core, member)


def exit_code(server: uvicorn.Server) -> int:
    """The worker's exit code, as the single-process server's (0 drained, 1 cut off, 3 failed
    to start)."""
    assert isinstance(server, DrainingServer)
    if server.startup_failed:
        return 3
    return 1 if server.cut_off else 0
