"""`BNFOLD_WORKERS=N`: N server processes on one port, under uvicorn's own supervisor.

The process model is uvicorn's `Multiprocess`, not gunicorn and not a home-made one: it is
already a dependency, it spawns the workers (not forks: onnxruntime's threads do not survive a
fork), pings each one over a pipe and replaces one that died or hangs, and each worker runs a
`uvicorn.Server` of our choosing, so every worker is our `DrainingServer` (service/server.py)
with its graceful shutdown intact. gunicorn's UvicornWorker would put its own server class in
its place, and add a dependency to the image.

The listening sockets are SO_REUSEPORT listeners, one per worker, for HTTP as for gRPC, rather
than uvicorn's one socket bound by the parent and shared: on a shared socket the worker that
wakes first accepts every connection waiting in the backlog, so a burst of new connections
(a load balancer or a benchmark opening 64 at once) lands on one worker while the others idle
(measured: 24 connections opened together were all accepted by one of two workers). With
SO_REUSEPORT the kernel spreads connections over the workers' own accept queues, and each
worker's drain takes in its own backlog before closing its listener. The parent checks that
both ports are free before it starts any worker, so the port is never shared silently with
another server.

What this module adds to uvicorn's supervisor:

- the workers are `service.worker_server.WorkerServer`s, each with its slot in the shared
  `Cluster` (readiness, reloads: service/cluster.py) and its share of the cores;
- SIGTERM/SIGINT reach every worker within `TICK_S` (uvicorn's loop waits 0.5 s); the parent
  waits for every worker to drain and exits 0 only when every worker exited 0;
- a worker that exits is logged with its exit code or signal, its slot is cleared (not ready,
  its live gauges dropped) and a new one starts in its place within `TICK_S`; a worker that
  failed at start-up (exit 3: bad port, bad provider) stops the server instead, as in uvicorn.
  Requests the dead worker held, and connections waiting in its own accept queue, are lost
  (their clients see the connection reset); new connections go to the live workers;
- health checks never block the supervisor: a ping is sent and its answer collected on a later
  tick. A worker is *starting* from its spawn until it first answers that its server has
  started (imports done, bundles loaded, listening): meanwhile only its exit, or
  `START_TIMEOUT_S` without ever being ready, count against it, so a start-up slowed by a busy
  host is not killed for a late answer. Once ready, a worker whose answer is `LATE_S` late
  reads not ready at once (readiness answers 503 for the whole server) and one that has not
  answered within uvicorn's `timeout_worker_healthcheck` is killed and replaced;
- a worker exits when the supervisor dies, whatever killed it (`kill -9` included): it asks
  the kernel for SIGTERM on its parent's death (Linux `PR_SET_PDEATHSIG`), and a watchdog
  thread checks its parent pid on every platform; either way it drains and exits, freeing the
  ports, instead of serving on as an orphan.

The parent imports no web framework: it only supervises.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from service import multiproc_metrics
from service.cluster import Cluster
from service.config import Settings

log = logging.getLogger(__name__)
TICK_S = 0.1  # signals are handled, and exited workers replaced, this often
HEALTH_EVERY = 5  # ticks between two pings of a worker (a hung worker is replaced too)
LATE_S = 1.0  # a ready worker whose answer is this late reads not ready until it answers
START_TIMEOUT_S = 300.0  # a worker never ready this long after its spawn is killed
JOIN_MARGIN_S = 10.0  # past the drain timeout, a worker that still runs is killed
PARENT_CHECK_S = 0.5  # how often a worker's watchdog looks for its parent
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerProcess(Process):
    """One worker: a spawned process running a `WorkerServer` for slot `index`."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], settings: Settings,
        index: int, cluster: Cluster,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.index = index
        self.cluster = cluster
        self.parent_pid = os.getpid()  # the child exits once its parent is another process
        self.spawned_at = time.monotonic()
        self.ready = False  # has answered, once, that its server started
        self.ping_sent: float | None = None  # when the unanswered ping was sent
        self.late = False  # marked not ready for a late answer
        super().__init__(config, sockets)  # pickles self (settings, slot) into the child

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:  # in the child: the heavy imports happen here, not in the parent
            from service.worker_server import build_worker_server

            self._server = build_worker_server(self.settings, self.index, self.cluster)
        return self._server

    def pong(self) -> None:
        """One health check: alive, and whether the server has started (never builds it)."""
        self.child_conn.recv()
        self.child_conn.send(self._server is not None and self._server.started)

    def health(self, now: float, timeout: float, send: bool) -> str:
        """In the supervisor: collect the answer to the last ping without waiting, and (`send`)
        send the next one. "ok"; "starting" (never ready yet: no ping timeout applies);
        "late" (ready, answer `LATE_S` late); "hung" (ready, no answer within `timeout`);
        "start timeout" (not ready `START_TIMEOUT_S` after its spawn)."""
        conn = self.parent_conn
        try:
            if self.ping_sent is not None and conn.poll(0):
                self.ready = conn.recv() is True or self.ready
                self.ping_sent = None
            if send and self.ping_sent is None:
                conn.send(b"ping")
                self.ping_sent = now
        except (OSError, EOFError):
            pass  # its end closed: the exit is seen on the next tick
        if not self.ready:
            return "start timeout" if now - self.spawned_at > START_TIMEOUT_S else "starting"
        waited = 0.0 if self.ping_sent is None else now - self.ping_sent
        if waited > timeout:
            return "hung"
        return "late" if waited > LATE_S else "ok"

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        """The child's main: serve until drained, exit with the server's code."""
        exit_with_parent(self.parent_pid)
        from service.logs import configure_logging
        from service.worker_server import exit_code

        # Health checks are answered from here on; the supervisor waits for the first answer
        # that the server started (imports, bundles) without a timeout of its own.
        threading.Thread(target=self.always_pong, daemon=True).start()
        configure_logging(self.settings.log_level, self.settings.log_format)
        listener = reuse_port_listener(self.settings.host, self.settings.port)
        server = self.server
        server.run([listener])
        sys.exit(exit_code(server))


class Supervisor(Multiprocess):
    """uvicorn's supervisor over `WorkerProcess`es; `run()` returns the server's exit code."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], settings: Settings,
        cluster: Cluster,
    ) -> None:  # fmt: skip
        super().__init__(config, sockets)
        self.settings = settings
        self.cluster = cluster
        self.failed_start = False

    def new_worker(self, index: int) -> WorkerProcess:
        worker = WorkerProcess(self.config, self.sockets, self.settings, index, self.cluster)
        worker.start()
        log.info("worker %d of %d started (pid %s)", index + 1, self.processes_num, worker.pid)
        return worker

    def init_processes(self) -> None:
        self.processes = [self.new_worker(i) for i in range(self.processes_num)]

    def keep_subprocess_alive(self, ping: bool = True) -> None:
        """Replace every worker that exited, or (`ping`: send the next health pings) stopped
        answering them. Never waits for an answer: one sent earlier is collected here."""
        now = time.monotonic()
        for index, worker in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            if not worker.process.is_alive():
                self.handle_signals()  # a process group's SIGTERM reaches both: stop, not replace
                if self.should_exit.is_set():
                    return
                self._replace(index, worker, "dead")
                continue
            starting = not worker.ready
            health = worker.health(now, self.config.timeout_worker_healthcheck, send=ping)
            if starting and worker.ready:
                log.info("worker %d (pid %s) ready: health checks apply", index + 1, worker.pid)
            if health == "late":
                self.cluster.ready[index] = 0  # it republishes its flag once it runs again
            if health == "late" and not worker.late:
                worker.late = True
                log.warning(
                    "worker %d (pid %s) has not answered its health check for %g s: not ready",
                    index + 1, worker.pid, LATE_S,
                )  # fmt: skip
            elif health == "ok" and worker.late:
                worker.late = False
                log.warning("worker %d (pid %s) answers again", index + 1, worker.pid)
            elif health in ("hung", "start timeout"):
                self._replace(index, worker, health)

    def _replace(self, index: int, worker: WorkerProcess, health: str) -> None:
        """Kill (if still running) and reap `worker`, then start a new one in its slot (or
        stop the server when it failed at start-up)."""
        worker.kill()  # a hung worker is killed; a dead one is only reaped
        worker.join()
        self._forget(index, worker)
        if worker.exitcode == STARTUP_FAILURE:
            log.error("worker %d (pid %s) failed to start: stopping", index + 1, worker.pid)
            self.failed_start = True
            self.should_exit.set()
            return
        why = {
            "hung": "did not answer its health check: killed",
            "start timeout": f"was not ready {START_TIMEOUT_S:g} s after its start: killed",
        }.get(health) or describe(worker.exitcode)
        log.error("worker %d (pid %s) %s; starting a new one", index + 1, worker.pid, why)
        self.processes[index] = self.new_worker(index)

    def _forget(self, index: int, worker: WorkerProcess) -> None:
        self.cluster.worker_gone(index)
        if worker.pid is not None:
            multiproc_metrics.process_gone(worker.pid)

    def handle_hup(self) -> None:
        log.warning("SIGHUP ignored: reload a model with POST /v1/models/{model}/reload")

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: the number of workers is BNFOLD_WORKERS")

    handle_ttou = handle_ttin

    def run(self) -> int:  # type: ignore[override]
        log.info("supervisor pid %d: %d workers", os.getpid(), self.processes_num)
        self.init_processes()
        ticks = 0
        while not self.should_exit.wait(TICK_S):
            self.handle_signals()
            ticks += 1
            self.keep_subprocess_alive(ping=ticks % HEALTH_EVERY == 0)
        return self.stop()

    def stop(self) -> int:
        """Drain every worker; 0 when all exited 0, 3 after a failed start, else 1."""
        self.terminate_all()
        deadline = self.settings.drain_timeout_s + JOIN_MARGIN_S
        codes = []
        for index, worker in enumerate(self.processes):
            worker.process.join(deadline)
            if worker.exitcode is None:
                log.error("worker %d (pid %s) still running: killed", index + 1, worker.pid)
                worker.kill()
                worker.process.join()
            codes.append(worker.exitcode)
            self._forget(index, worker)
            if worker.exitcode != 0:
                log.error("worker %d (pid %s) %s", index + 1, worker.pid, describe(worker.exitcode))
        if self.failed_start or STARTUP_FAILURE in codes:
            return STARTUP_FAILURE
        log.info("supervisor: every worker stopped (exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1


def describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def exit_with_parent(parent: int) -> None:
    """In a worker, first thing: SIGTERM this process (it drains and exits) once `parent`, the
    supervisor, is gone, whatever killed it. On Linux the kernel sends it
    (`PR_SET_PDEATHSIG`: at the death of the parent's thread that spawned this process, the
    supervisor's main thread); a watchdog thread also compares the parent pid, which covers
    other platforms and a parent that died before the request was made."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
    if os.getppid() != parent:
        os._exit(1)  # orphaned before serving anything: nothing to drain
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    """The watchdog: SIGTERM to this process once its parent changed, then again every 10 s
    (a drain in progress ignores the repeats; before the server installs its handlers, the
    first one ends the process)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    log.error("the supervisor (pid %d) is gone: draining and exiting", parent)
    while True:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10.0)


def check_port_free(host: str, port: int) -> str | None:
    """None when `port` can be bound (without SO_REUSEPORT); else why not. The workers bind
    with SO_REUSEPORT, which would silently share a port in use by another server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return f"{host}:{port}: {exc.strerror}"
    return None


def reuse_port_listener(host: str, port: int) -> socket.socket:
    """This worker's own listening socket on the shared port (bound, not yet listening:
    uvicorn's `create_server` listens with its backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_workers(settings: Settings) -> int:
    """Serve with `settings.workers` processes until SIGTERM/SIGINT; the exit code (as the
    single process's `serve`)."""
    for name, port in (("HTTP", settings.port), ("gRPC", settings.grpc_port)):
        busy = check_port_free(settings.host, port) if port else None
        if busy:
            flag = "BNFOLD_PORT" if name == "HTTP" else "BNFOLD_GRPC_PORT"
            log.error("%s port %s cannot be bound (%s): set %s", name, port, busy, flag)
            return STARTUP_FAILURE
    state = Path(tempfile.mkdtemp(prefix="bnfold-workers-"))
    multiproc_metrics.create_dir(state)
    config = uvicorn.Config(
        "service.app:create_app",  # never loaded in the parent; each worker builds its own app
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,
        log_level=settings.log_level,
    )
    log.info("bnfold on http://%s:%d: %d workers", settings.host, settings.port, settings.workers)
    try:
        cluster = Cluster(settings.workers, state / "cluster")
        return Supervisor(config, [], settings, cluster).run()
    finally:
        multiproc_metrics.forget_dir()
        shutil.rmtree(state, ignore_errors=True)
