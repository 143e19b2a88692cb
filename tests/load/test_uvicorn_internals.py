"""The uvicorn internals the server overrides or relies on, checked by name.

service/server.py, service/shutdown.py and service/supervisor.py subclass uvicorn's `Server`,
`HttpToolsProtocol` and `Multiprocess`/`Process` and read some of their private state. Those are
not uvicorn's public API, so pyproject.toml pins uvicorn to the minor version tested. Moving
that pin is safe only when every check below still passes: each failure names the internal
that changed and the module of ours that depends on it.
"""

from __future__ import annotations

import functools
import inspect
import re
import signal
import sys

import pytest
import uvicorn
from uvicorn import server as uv_server
from uvicorn.protocols.http import flow_control, httptools_impl
from uvicorn.supervisors import multiprocess

from tests.conftest import REPO

# (where, its owner, the attribute, the parameters it must take (None: not called by us,
# only read or overridden without a call), ours that depends on it)
METHODS = [
    (uv_server.Server, "startup", ["self", "sockets"], "server.py (DrainingServer.startup)"),
    (uv_server.Server, "shutdown", ["self", "sockets"], "server.py (DrainingServer.shutdown)"),
    (uv_server.Server, "handle_exit", ["self", "sig", "frame"], "server.py (drain on SIGTERM)"),
    (uv_server.Server, "run", ["self", "sockets"], "supervisor.py (WorkerProcess.target)"),
    (httptools_impl.HttpToolsProtocol, "__init__",
     ["self", "config", "server_state", "app_state", "_loop"], "shutdown.py (protocol_factory)"),
    (httptools_impl.HttpToolsProtocol, "connection_made", ["self", "transport"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "connection_lost", ["self", "exc"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "data_received", ["self", "data"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "eof_received", ["self"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "on_message_begin", ["self"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "on_headers_complete", ["self"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "on_body", ["self", "body"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "on_message_complete", ["self"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "on_response_complete", ["self"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "send_400_response", ["self", "msg"], "shutdown.py"),
    (httptools_impl.HttpToolsProtocol, "shutdown", ["self"], "shutdown.py (drain)"),
    (flow_control.FlowControl, "__init__", ["self", "transport"], "shutdown.py (pipelining)"),
    (flow_control.FlowControl, "pause_reading", ["self"], "shutdown.py (pipelining)"),
    (flow_control.FlowControl, "resume_reading", ["self"], "shutdown.py (pipelining)"),
    (multiprocess.Process, "__init__", ["self", "config", "sockets"], "supervisor.py"),
    (multiprocess.Process, "pong", ["self"], "supervisor.py (WorkerProcess.pong)"),
    (multiprocess.Process, "always_pong", ["self"], "supervisor.py (health answers)"),
    (multiprocess.Process, "target", ["self", "sockets"], "supervisor.py (the worker's main)"),
    (multiprocess.Process, "kill", ["self"], "supervisor.py"),
    (multiprocess.Process, "join", ["self"], "supervisor.py"),
    (multiprocess.Process, "terminate", ["self"], "supervisor.py"),
    (multiprocess.Multiprocess, "__init__", ["self", "config", "sockets"], "supervisor.py"),
    (multiprocess.Multiprocess, "init_processes", ["self"], "supervisor.py"),
    (multiprocess.Multiprocess, "keep_subprocess_alive", ["self"], "supervisor.py"),
    (multiprocess.Multiprocess, "handle_signals", ["self"], "supervisor.py (run)"),
    (multiprocess.Multiprocess, "terminate_all", ["self"], "supervisor.py (stop)"),
    (multiprocess.Multiprocess, "handle_hup", ["self"], "supervisor.py (SIGHUP ignored)"),
    (multiprocess.Multiprocess, "handle_ttin", ["self"], "supervisor.py (SIGTTIN ignored)"),
    (multiprocess.Multiprocess, "handle_ttou", ["self"], "supervisor.py (SIGTTOU ignored)"),
]  # fmt: skip

# Source text that must still be there: how uvicorn uses what we override or read.
SOURCES = [
    (uv_server.Server.capture_signals, "signal.signal(sig, self.handle_exit)",
     "server.py: SIGTERM/SIGINT reach DrainingServer.handle_exit"),
    (uv_server.Server.capture_signals, "self._captured_signals",
     "server.py: only signals recorded in _captured_signals are raised again after the drain"),
    (uv_server.Server.startup, "config.http_protocol_class(",
     "server.py: the protocol factory (functools.partial) is called as the class would be"),
    (uv_server.Server.startup, "self.servers",
     "server.py: DrainingServer.shutdown closes and adopts the backlog of self.servers"),
    (uv_server.Server._serve, "self.lifespan",
     "server.py: DrainingServer uses self.lifespan (state, shutdown)"),
    (uv_server.Server.on_tick, "self.server_state.default_headers",
     "shutdown.py: send_400_response writes server_state.default_headers"),
    (httptools_impl.HttpToolsProtocol.connection_made, "self.flow = FlowControl(transport)",
     "shutdown.py: connection_made replaces self.flow with PipelineFlowControl"),
    (httptools_impl.HttpToolsProtocol.on_headers_complete, "self.pipeline.appendleft(",
     "shutdown.py: pipelined requests wait in self.pipeline (bounded by MAX_PIPELINED)"),
    (httptools_impl.HttpToolsProtocol.on_headers_complete, "flow=self.flow",
     "shutdown.py: each request cycle resumes reading through the connection's flow control"),
    (httptools_impl.HttpToolsProtocol.on_response_complete, "self.flow.resume_reading()",
     "shutdown.py: reading resumes through PipelineFlowControl after a response"),
    (httptools_impl.HttpToolsProtocol.on_response_complete, "self.pipeline.pop()",
     "shutdown.py: the next pipelined request starts from self.pipeline"),
    (httptools_impl.RequestResponseCycle.receive, "self.flow.resume_reading()",
     "shutdown.py: reading a body resumes through PipelineFlowControl"),
    (httptools_impl.HttpToolsProtocol.on_body, "self.cycle.body += body",
     "shutdown.py: bodies are parsed from held bytes into the cycle (one piece per body)"),
    (httptools_impl.HttpToolsProtocol.on_header, "self.headers.append((name, value))",
     "shutdown.py: the body's length is read from self.headers"),
    (httptools_impl.HttpToolsProtocol.on_header, "name = name.lower()",
     "shutdown.py: header names in self.headers are lowercase (b'content-length')"),
    (multiprocess.Process._healthcheck, 'self.parent_conn.send(b"ping")',
     "supervisor.py: WorkerProcess.health sends the same ping without waiting"),
    (multiprocess.Process.always_pong, "self.pong()",
     "supervisor.py: the worker's health answers come from WorkerProcess.pong"),
    (multiprocess.Process.__init__, "self.parent_conn, self.child_conn = Pipe()",
     "supervisor.py: the health pipe"),
    (multiprocess.Process.__init__, "self.process = get_subprocess(config, self.target, sockets)",
     "supervisor.py: the worker runs WorkerProcess.target in a spawned process"),
]  # fmt: skip


def changed(what: str, ours: str) -> str:
    return (
        f"uvicorn {uvicorn.__version__} changed {what}, an internal that service/{ours} relies "
        "on: adapt ours before moving the uvicorn pin in pyproject.toml"
    )


def qualname(owner: type, name: str) -> str:
    return f"{owner.__module__}.{owner.__qualname__}.{name}"


@pytest.mark.parametrize(
    ("owner", "name", "params", "ours"),
    METHODS,
    ids=[f"{o.__qualname__}.{n}" for o, n, _, _ in METHODS],
)
def test_a_method_we_override_or_call_keeps_its_signature(owner, name, params, ours):
    method = inspect.getattr_static(owner, name, None)
    assert method is not None, changed(f"{qualname(owner, name)} (gone)", ours)
    found = list(inspect.signature(getattr(owner, name)).parameters)
    assert found == params, changed(f"the parameters of {qualname(owner, name)}: {found}", ours)


@pytest.mark.parametrize(
    ("function", "text", "why"),
    SOURCES,
    ids=[f"{f.__qualname__}:{t[:40]}" for f, t, _ in SOURCES],
)
def test_how_uvicorn_uses_what_we_override_is_unchanged(function, text, why):
    source = inspect.getsource(function)
    assert text in source, changed(f"{function.__qualname__} (no longer has `{text}`)", why)


def test_the_instance_state_we_read_is_still_there():
    config = uvicorn.Config(app=None, http=functools.partial(httptools_impl.HttpToolsProtocol))
    server = uvicorn.Server(config)
    for name in ("started", "should_exit", "force_exit", "server_state", "_captured_signals"):
        assert hasattr(server, name), changed(f"uvicorn.Server().{name} (gone)", "server.py")
    state = server.server_state
    for name in ("connections", "tasks", "default_headers", "total_requests"):
        assert hasattr(state, name), changed(f"ServerState().{name} (gone)", "server.py")
    for name in ("timeout_graceful_shutdown", "timeout_keep_alive", "timeout_worker_healthcheck"):
        assert hasattr(config, name), changed(f"uvicorn.Config().{name} (gone)", "server.py")
    assert uvicorn.config.STARTUP_FAILURE == 3, changed("config.STARTUP_FAILURE", "supervisor.py")
    assert {signal.SIGINT, signal.SIGTERM} <= set(uv_server.HANDLED_SIGNALS), changed(
        "server.HANDLED_SIGNALS", "server.py"
    )
    assert {"INT", "TERM", "HUP", "TTIN", "TTOU"} <= set(multiprocess.SIGNALS.values()), changed(
        "supervisors.multiprocess.SIGNALS", "supervisor.py"
    )


def test_a_protocol_factory_passes_through_the_config():
    """uvicorn keeps a non-string `http` as the protocol class: our functools.partial."""
    factory = functools.partial(httptools_impl.HttpToolsProtocol)
    config = uvicorn.Config(app=lambda *a: None, http=factory)
    config.load()
    assert config.http_protocol_class is factory, changed(
        "Config.load (http=callable)", "server.py"
    )


def test_the_cycle_and_process_state_we_read_is_still_there():
    cycle_init = inspect.getsource(httptools_impl.RequestResponseCycle.__init__)
    for name in ("more_body", "response_complete", "keep_alive", "disconnected", "body"):
        assert f"self.{name} =" in cycle_init, changed(
            f"RequestResponseCycle.{name}", "shutdown.py"
        )
    init = inspect.getsource(httptools_impl.HttpToolsProtocol.__init__)
    for name in ("pipeline", "cycle", "parser", "server_state", "timeout_keep_alive", "loop"):
        assert f"self.{name}" in init, changed(f"HttpToolsProtocol.{name}", "shutdown.py")
    process = inspect.getsource(multiprocess.Process.__init__)
    assert "self._server" in process, changed("Process._server", "supervisor.py")
    supervisor = inspect.getsource(multiprocess.Multiprocess.__init__)
    for name in ("processes_num", "processes", "should_exit", "signal_queue"):
        assert f"self.{name}" in supervisor, changed(f"Multiprocess.{name}", "supervisor.py")


def test_the_installed_uvicorn_is_the_minor_version_pinned():
    """The checks above were written against the pinned minor version; pyproject.toml pins it."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"uvicorn\[standard\]>=(\d+)\.(\d+)(?:\.\d+)?,<(\d+)\.(\d+)"', text)
    assert match, "pyproject.toml: uvicorn is not pinned to one minor version (>=X.Y,<X.Y+1)"
    low = (int(match[1]), int(match[2]))
    high = (int(match[3]), int(match[4]))
    assert high == (low[0], low[1] + 1), f"pyproject.toml: uvicorn pin spans more than {low}"
    installed = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    assert installed == low, (
        f"uvicorn {uvicorn.__version__} is installed, pyproject.toml pins {low[0]}.{low[1]}.x "
        f"({sys.executable})"
    )
