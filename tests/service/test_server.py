"""service/server.py: what SIGTERM does inside the server, without a process to kill (the real
process, drained and exiting 0, is tests/load/test_shutdown.py)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from types import SimpleNamespace

import uvicorn

from service.cluster import Cluster, Member
from service.server import DrainingServer
from service.shutdown import adopt_backlog, serve_adopted


def draining_server(client) -> DrainingServer:
    return DrainingServer(uvicorn.Config(client.app), client.app.state.core)


def test_sigterm_turns_readiness_503_at_once_and_still_serves_requests(serve, models_dir, digits):
    client = serve(models_dir)
    assert client.get("/v2/health/ready").status_code == 200
    server = draining_server(client)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and not server.force_exit
    r = client.get("/v2/health/ready")
    assert r.status_code == 503
    assert r.json() == {"error": "not ready: shutting down: finishing the requests in flight"}
    assert client.get("/v2/health/live").status_code == 200  # still alive while draining
    assert client.get("/metrics").status_code == 200  # and still scraped
    # A request that reaches the app is served: only new connections are refused, by the
    # listener closing (tests/load/test_shutdown.py), never a request already sent.
    r = client.post("/v1/models/digits/predict", content=digits[0].png,
                    headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "0"


def test_a_second_ctrl_c_stops_waiting(serve, models_dir):
    server = draining_server(serve(models_dir))
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit


class Listener:
    """Stands in for asyncio's Server: what adopt_backlog reads is `.sockets`."""

    def __init__(self, sock) -> None:
        self.sockets = [sock]


def test_connections_waiting_in_the_backlog_are_adopted_with_what_they_sent():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    for i, c in enumerate(clients):
        c.sendall(f"request {i}".encode())  # sent before anyone accepted the connection
    adopted = adopt_backlog([Listener(listener)])
    assert len(adopted) == 3
    assert adopt_backlog([Listener(listener)]) == []  # nothing left, and it never blocks
    received: list[bytes] = []

    class Echo(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            received.append(data)

    async def main() -> None:
        await serve_adopted(adopted, Echo)
        while len(received) < 3:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert sorted(received) == [b"request 0", b"request 1", b"request 2"]
    listener.close()
    for c in clients:
        c.close()


def test_not_ready_until_the_grpc_port_is_open(serve, models_dir, monkeypatch):
    """The gRPC port opens after HTTP's: a readiness probe answered 200 in between would let
    gRPC clients connect to a closed port, or, with several workers, put every one of their
    long-lived connections on the workers already listening. (The gRPC server is a stand-in
    here: tritonclient's protobuf symbols, loaded in this process by other tests, clash with
    the server's own; the real listener is tests/e2e/test_grpc.py's.)"""
    client = serve(models_dir)
    core = client.app.state.core
    seen = []

    class GrpcServer:
        def __init__(self, core, settings) -> None:
            pass

        async def start(self) -> None:
            seen.append(core.not_ready_reason())

    async def http_started(self, sockets=None):  # uvicorn's own start-up, done by the client
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "startup", http_started)
    monkeypatch.setitem(sys.modules, "service.grpc.server", SimpleNamespace(GrpcServer=GrpcServer))
    assert core.not_ready_reason() is None
    asyncio.run(draining_server(client).startup())
    assert seen == ["starting: the gRPC port is not open yet"]
    assert core.not_ready_reason() is None
    assert client.get("/v2/health/ready").status_code == 200


def test_a_worker_whose_grpc_port_is_not_open_reads_not_ready_to_the_others(tmp_path):
    cluster = Cluster(2, tmp_path / "state")
    starting, other = Member(cluster, 0), Member(cluster, 1)
    starting.opening = "gRPC"
    starting.set_ready(True)  # its bundles are loaded
    assert other.others_not_ready() is not None
    starting.opening = None
    starting.set_ready(True)
    assert other.others_not_ready() is None


def test_the_batcher_counts_the_servers_http_requests_and_grpc_calls(serve, models_dir):
    """What tells the batcher a worker holds other requests (service/batching.py runs cheap
    batches on the event loop only when it holds none): uvicorn's request tasks, created as
    each request's headers arrive, and the gRPC calls being answered."""
    client = serve(models_dir)
    server = draining_server(client)
    count = client.app.state.core.plane.runner.requests_inside
    assert count is not None and count() == 0
    server.server_state.tasks.update({object(), object()})  # two requests' tasks
    assert count() == 2
    server.grpc = SimpleNamespace(servicer=SimpleNamespace(active=3))
    assert count() == 5
