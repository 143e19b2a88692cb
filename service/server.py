"""Running the app under uvicorn with a graceful shutdown that ends in exit code 0.

On SIGTERM (or Ctrl+C), in this order:

1. at once, in the signal handler: readiness answers 503 (admission's drain flag);
2. within uvicorn's 0.1 s tick, `shutdown`: connections already in the listen backlog are
   taken in, the listening socket closes (new connections are refused from here on), and every
   open connection is told that its current or next request is its last (service/shutdown.py);
3. every request on those connections is served to the end with `Connection: close`; an idle
   connection is closed after the keep-alive timeout unless a request arrived on it;
4. once no connection is left (at most `drain_timeout_s`; past it the requests still running
   are cancelled), the lifespan shutdown stops the batcher and `serve` returns 0, or 1 when the
   drain timeout cut requests off.

Plain uvicorn re-raises the signal after its shutdown, so the process would die of SIGTERM
(exit -15) even after a clean drain; this server does not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.app import create_app
from service.config import Settings
from service.process import Core
from service.shutdown import ConnectionCap, DrainingHttpProtocol, adopt_backlog, serve_adopted

if TYPE_CHECKING:
    from service.grpc.server import GrpcServer

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that also runs the gRPC server, whose exit signals start the drain
    described above and are not re-raised; `cut_off` counts the requests (HTTP requests and
    gRPC calls) the drain timeout cancelled."""

    def __init__(self, config: uvicorn.Config, core: Core) -> None:
        super().__init__(config)
        self.core = core
        self.admission = core.admission
        self.grpc: GrpcServer | None = None
        self.startup_failed = False
        self.cut_off = 0
        core.plane.count_requests_with(self.requests_inside)

    def requests_inside(self) -> int:
        """HTTP requests whose headers arrived and gRPC calls being answered, now."""
        return len(self.server_state.tasks) + (self.grpc.servicer.active if self.grpc else 0)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (lifespan: bundles loaded; HTTP listener), then gRPC's; not
        ready until both listen."""
        if self.core.settings.grpc_port:
            self.opening("gRPC")
        await super().startup(sockets)
        if not self.started or not self.core.settings.grpc_port:
            return
        from service.grpc.server import GrpcServer  # its protobuf types load only when served

        self.grpc = GrpcServer(self.core, self.core.settings)
        try:
            await self.grpc.start()
        except RuntimeError as exc:
            port = self.core.settings.grpc_port
            log.error("gRPC port %s cannot be bound (%s): set BNFOLD_GRPC_PORT", port, exc)
            self.grpc, self.startup_failed, self.should_exit = None, True, True
            return
        self.opening(None)

    def opening(self, listener: str | None) -> None:
        """The listener not open yet (None: every one is): readiness says so meanwhile."""
        self.core.opening = listener

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only set flags. The signal is not recorded in
        # uvicorn's captured signals, so it is not raised again once the drain is over.
        self.admission.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.admission.begin_drain()  # also when uvicorn stops for a reason of its own
        log.info("draining: listeners closed, finishing the requests on open connections")
        grace = self.config.timeout_graceful_shutdown
        grpc_stopped = asyncio.create_task(self.grpc.stop(grace)) if self.grpc else None
        adopted = adopt_backlog(self.servers)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await serve_adopted(adopted, self._protocol)
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._drained(), timeout=grace)
        except TimeoutError:
            self._cut_off()
        if grpc_stopped is not None:
            self.cut_off += await grpc_stopped  # calls received: finished, or cut at `grace`
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _protocol(self) -> asyncio.Protocol:
        """A new connection's protocol, as uvicorn's own listener would make it."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )

    async def _drained(self) -> None:
        """Until every connection closed and every request task ended (or a second Ctrl+C)."""
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit:
            await asyncio.sleep(0.05)

    def _cut_off(self) -> None:
        """The drain timeout ran out: close what is left; requests in progress are lost."""
        for connection in list(self.server_state.connections):
            if isinstance(connection, DrainingHttpProtocol):
                self.cut_off += connection.close_now()
        for task in self.server_state.tasks:
            task.cancel(msg="drain timeout exceeded")
        self.cut_off = max(self.cut_off, len(self.server_state.tasks))
        log.error(
            "drain timeout (%g s) exceeded: %d request(s) cut off",
            self.config.timeout_graceful_shutdown,
            self.cut_off,
        )


MAX_RAISED_FILES = 65536  # the open-files limit is raised this far at most (its hard limit)


def raise_files_limit() -> int:
    """Raise this process's soft open-files limit (RLIMIT_NOFILE) towards its hard limit, as
    servers do; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_RAISED_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_RAISED_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a sandbox that forbids it: keep the soft limit
            log.debug("open-files limit kept at %d: %s", soft, exc)
    return soft


def connection_cap(settings: Settings) -> ConnectionCap:
    """BNFOLD_MAX_CONNECTIONS, or (0) the open-files limit less a reserve for the gRPC server's
    connections, model files, pipes and logs: a quarter of it, at least 64."""
    files = raise_files_limit()
    derived = max(files - max(64, files // 4), 16)
    limit = settings.max_connections or derived
    if settings.max_connections > derived:
        log.warning(
            "BNFOLD_MAX_CONNECTIONS=%d leaves no reserve under the open-files limit (%d): "
            "new connections may be dropped unanswered past %d",
            settings.max_connections,
            files,
            derived,
        )
    return ConnectionCap(limit, files)


def uvicorn_config(settings: Settings, core: Core | None = None) -> uvicorn.Config:
    protocol = functools.partial(
        DrainingHttpProtocol,
        header_timeout_s=settings.header_timeout_s,
        cap=connection_cap(settings),
    )
    return uvicorn.Config(
        create_app(settings, core=core),
        host=settings.host,
        port=settings.port,
        http=protocol,  # type: ignore[arg-type]  # uvicorn calls it as it would the class
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to ours (service.logs)
        access_log=False,  # the access middleware writes one line per request, with its id
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, drain, return the exit code."""
    core = Core.build(settings)
    config = uvicorn_config(settings, core)
    server = DrainingServer(config, core)
    server.run()
    if server.startup_failed:
        return 3  # as uvicorn's own start-up failures
    return 1 if server.cut_off else 0
