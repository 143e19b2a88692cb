"""Prometheus metrics of one server, in a registry of its own (GET /metrics exposes it).

With several worker processes, GET /metrics merges every worker's values
(service/multiproc_metrics.py: counters summed, histograms merged, gauges `livesum`).

A registry per application, not prometheus-client's global one, so two apps in one process
(tests) count separately. Label values are bounded: endpoints are route templates, models are
the bundles served (an unknown name counts as "unknown"), never raw paths.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from service.multiproc_metrics import exposition_registry

# Seconds: from a fraction of a millisecond (one digit) to the request timeout's range.
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LANE = ("model", "variant")


class Metrics:
    """Every metric the service exports; `registry` is what GET /metrics renders."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = CollectorRegistry()
        self.registry = exposition_registry(r)  # every worker's, merged, when there are several
        self.requests = Counter(
            "bnfold_requests",
            "Requests answered, by protocol (rest or grpc), endpoint (route template or gRPC "
            "method), model and code (HTTP status or gRPC status name).",
            ["protocol", "endpoint", "model", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "bnfold_request_duration_seconds",
            "Time from request to response, by protocol and endpoint.",
            ["protocol", "endpoint"],
            buckets=SECONDS,
            registry=r,
        )
        self.in_flight = Gauge(
            "bnfold_requests_in_flight",
            "Requests (REST and gRPC) being answered now.",
            registry=r,
            multiprocess_mode="livesum",  # summed over the live workers
        )
        self.queue_depth = Gauge(
            "bnfold_queue_depth",
            "Requests admitted for a model and not answered yet (reading, decoding, queued or "
            "running), summed over the workers; BNFOLD_MAX_QUEUE_SIZE bounds it per worker.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "bnfold_rejected_requests",
            "Requests answered 503 because the model's queue was full.",
            ["model"],
            registry=r,
        )
        self.timeouts = Counter(
            "bnfold_request_timeouts",
            "Requests answered 504 past BNFOLD_REQUEST_TIMEOUT_S; their queued work was dropped.",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "bnfold_queue_wait_seconds",
            "Time a request waited in the batcher before its onnxruntime run started.",
            LANE,
            buckets=SECONDS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "bnfold_inference_duration_seconds",
            "onnxruntime run time per batch.",
            LANE,
            buckets=SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bnfold_batch_size",
            "Images (tensor rows) per onnxruntime run.",
            LANE,
            buckets=ROWS,
            registry=r,
        )
        self.images = Counter("bnfold_images", "Images (tensor rows) inferred.", LANE, registry=r)
        self.wide_runs = Counter(
            "bnfold_wide_runs",
            "Runs on the variant's wide session (every usable core): a run that measured 2 ms "
            "or more, alone in the worker while the rest of the machine was quiet; the others "
            "run on the worker's share of the cores.",
            LANE,
            registry=r,
        )
        self.inferences = Counter(
            "bnfold_inferences",
            "Requests inferred, by model and variant (a compare counts one of each).",
            LANE,
            registry=r,
        )

        self.engine_runs = Counter(
            "bnfold_engine_runs",
            "Inference runs (batches) by model, variant, and the engine and precision that "
            "computed them (onnxruntime or openvino; float32, int8 or bf16).",
            ["model", "variant", "engine", "precision"],
            registry=r,
        )

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: labels() takes a lock and checks its
        arguments on every call, and requests ask for the same few children all the time."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
