"""The gRPC server of a bnfold process: inference service, health checking and reflection.

It runs on the same event loop as uvicorn and over the same core (registry, admission, data
plane), on its own port (`BNFOLD_GRPC_PORT`, default 8001). Messages over `max_body_bytes`
are refused by grpc itself with RESOURCE_EXHAUSTED. `grpc.health.v1.Health` answers SERVING
exactly when REST readiness answers 200 (for the service "" and for
inference.GRPCInferenceService), so Kubernetes `grpc:` probes work; server reflection lets
grpcurl and similar tools list and call the methods without the .proto.

Shutdown (service/server.py): `stop` refuses new calls at once (the port closes, clients get
GOAWAY) and lets every call already received finish, for up to the drain timeout.
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import Settings
from service.grpc.servicer import SERVICE, InferenceServicer, add_to_server
from service.process import Core

log = logging.getLogger(__name__)


class ReadinessHealth(health.aio.HealthServicer):
    """grpc.health.v1 whose Check reads readiness live from the core."""

    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core

    async def Check(self, request, context):  # noqa: N802 (the protocol's name)
        if request.service not in ("", SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        ready = self.core.not_ready_reason() is None
        status = health_pb2.HealthCheckResponse.SERVING if ready else (
            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        return health_pb2.HealthCheckResponse(status=status)


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """grpc.aio server with the inference, health and reflection services."""

    def __init__(self, core: Core, settings: Settings) -> None:
        self.settings = settings
        self.servicer = InferenceServicer(core)
        self.health = ReadinessHealth(core)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                # One process: a port in use fails start-up, never shared silently. Workers
                # (BNFOLD_WORKERS > 1) share it; the supervisor checked it was free.
                ("grpc.so_reuseport", int(settings.workers > 1)),
            ]
        )
        add_to_server(self.servicer, self.server)  # undecodable requests: INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)  # fmt: skip
        reflection.enable_server_reflection(names, self.server)
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; RuntimeError when the port cannot be bound."""
        address = bind_address(self.settings.host, self.settings.grpc_port)
        self.port = self.server.add_insecure_port(address)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC (Open Inference Protocol) on %s", bind_address(self.settings.host, self.port)
        )

    async def stop(self, grace: float) -> int:
        """Refuse new calls now, let the ones received finish within `grace` seconds; the
        number of calls the grace period cut off."""
        await self.health.enter_graceful_shutdown()  # Watch streams see NOT_SERVING
        self.servicer.cut_after = time.monotonic() + grace
        await self.server.stop(grace)
        return self.servicer.cut_off
