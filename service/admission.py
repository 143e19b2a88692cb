"""Admission: who gets into the server, for how long, and the drain flag.

Protocol-free. Every inference request (REST or gRPC) holds one of its model's
`max_queue_size` slots while it is served (`Admission.admit`), from the moment its body has
arrived: REST bodies are read whole before the route runs (service/api/middleware.py, with a
minimum rate), gRPC messages are whole when a call starts, so a client that trickles its body
holds a connection, never a slot. The slot is held under the request timeout, or the client's
own deadline when that is shorter; the model a request is given is the one it runs on, even if
the registry replaces it meanwhile. A full queue is refused at once (503 / UNAVAILABLE with
Retry-After), a request past its time is cancelled (504 / DEADLINE_EXCEEDED).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from service.config import Settings
from service.errors import GatewayTimeout, Overloaded
from service.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry


class Admission:
    """Queue slots per model, request timeouts, and whether the server is draining."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.admitted: Counter[str] = Counter()  # requests inside the server, per model
        self.draining = False  # set on SIGTERM: not ready; requests already sent are served

    def begin_drain(self) -> None:
        """SIGTERM: readiness answers 503 from now on (requests that reach us are served)."""
        self.draining = True

    @asynccontextmanager
    async def admit(
        self, name: str, version: str | None = None, deadline_s: float | None = None
    ) -> AsyncIterator[LoadedModel]:
        """Hold one of the model's slots while a request is served: 404/503 when the model
        cannot answer, 503 with Retry-After at once when its queue is full, 504 when the
        request timeout (or the client's `deadline_s`, when shorter) runs out."""
        model = self.registry.get_ready(name, version)
        if deadline_s is not None and deadline_s <= 0:  # nothing it could be answered in
            self.metrics.timeouts.labels(name).inc()
            raise GatewayTimeout(
                "the client's deadline had passed when the request arrived: nothing was run; "
                "give the call a longer deadline"
            )
        limit = self.settings.max_queue_size
        if self.admitted[name] >= limit:
            self.metrics.rejected.labels(name).inc()
            raise Overloaded(
                f"model {name!r} is busy: {limit} requests already queued (BNFOLD_MAX_QUEUE_SIZE);"
                f" retry after {self.settings.retry_after_s} s",
                self.settings.retry_after_s,
            )
        timeout = self.settings.request_timeout_s
        clients = deadline_s is not None and deadline_s < timeout
        self._count(name, +1)
        try:
            with anyio.move_on_after(deadline_s if clients else timeout) as scope:
                yield model
        finally:
            self._count(name, -1)
        if scope.cancelled_caught:
            self.metrics.timeouts.labels(name).inc()
            if clients:
                raise GatewayTimeout(
                    f"request not answered within the client's deadline ({deadline_s:.3g} s); "
                    "its queued work was dropped"
                )
            raise GatewayTimeout(
                f"request not answered within {timeout:g} s (BNFOLD_REQUEST_TIMEOUT_S); "
                "its queued work was dropped: retry later"
            )

    def _count(self, name: str, change: int) -> None:
        self.admitted[name] += change
        self.metrics.child(self.metrics.queue_depth, name).set(self.admitted[name])
