"""The record of every call, whatever its protocol: its request id, its metrics, its access line.

REST (service/api/access.py, around every HTTP request) and gRPC (service/grpc/servicer.py,
around every RPC) open a `Call` when a call arrives and end it with its outcome; what gets
recorded, and how, is written here once.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.logs import request_id, request_id_for
from service.metrics import Metrics
from service.registry import ModelRegistry

access_log = logging.getLogger("service.access")


@dataclass
class Call:
    """One call being answered: its id (set for every log line logged meanwhile)."""

    id: str
    token: contextvars.Token
    started: float = field(default_factory=time.perf_counter)


class CallLog:
    """`begin` when a call arrives, `end` with its outcome: request id, the request metrics
    (count by protocol/endpoint/model/status, latency by endpoint, in flight) and the access
    line."""

    def __init__(self, metrics: Metrics, registry: ModelRegistry) -> None:
        self.metrics = metrics
        self.registry = registry

    def begin(self, incoming_id: str | None) -> Call:
        """The client's request id when it is sane (X-Request-ID, gRPC `x-request-id`), else a
        new one; it names every log line until `end`."""
        rid = request_id_for(incoming_id)
        call = Call(rid, request_id.set(rid))
        self.metrics.in_flight.inc()
        return call

    def end(
        self,
        call: Call,
        protocol: str,
        endpoint: str,
        model: str,
        status: int | str,
        describe: Callable[[], tuple[str, dict[str, object]]],
    ) -> None:
        """Record the call. `describe()` gives its access line's start ('GET /v2', 'grpc
        ModelInfer') and the fields the protocol knows of it (method, client, ...), which go
        with it into JSON logs beside the protocol, model, status and duration every call has;
        called only when the line is logged (it formats the path, asks gRPC for the peer)."""
        seconds = time.perf_counter() - call.started
        m = self.metrics
        m.in_flight.dec()
        if model and model not in self.registry.models:
            model = "unknown"  # label values stay bounded whatever names clients send
        m.child(m.requests, protocol, endpoint, model, str(status)).inc()
        m.child(m.request_seconds, protocol, endpoint).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            summary, fields = describe()
            fields = {"protocol": protocol, **fields, "model": model, "status": status,
                      "duration_ms": round(seconds * 1000, 3)}  # fmt: skip
            access_log.info("%s %s %.1f ms", summary, status, seconds * 1000,
                            extra={"fields": fields})  # fmt: skip
        request_id.reset(call.token)
