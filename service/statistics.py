"""The statistics extension: per model and version, what the data plane did, as Triton reports
it (GET /v2/models[/{model}[/versions/{version}]]/stats, gRPC ModelStatistics).

Kept by the data plane (service/dataplane.py) for every infer, predict and compare call it
answers, whichever protocol carried it, and by the batcher for each run it makes
(the batcher's `on_run`):

- `inference_count`: rows (images) of the successful requests; `execution_count`: runs of the
  model's sessions (one run may serve several requests: dynamic batching);
- `success` / `fail`: requests and their time in the data plane, from the decoded request to
  the built answer (reading the body and encoding the answer, at the protocol's edge, are not
  in it; nor are requests refused before the data plane, such as 503 when the queue is full);
- `compute_input`: turning the request's tensors or images into the model's input array;
  `compute_infer`: the run that served the request (each request of a batch is charged the
  whole run, as Triton does; counted by the batcher for every request a run served, so a
  request that fails after its run, output not finite or caller gone, is in it too); `queue`:
  the successful requests' time in the batcher less their runs (waiting for the model and for
  companions); `compute_output`: building the answer (the classification strings);
- `batch_stats`: the runs by their number of rows, with their compute_infer time.

One `Statistics` per process: with several workers (BNFOLD_WORKERS > 1) each answers with its
own counts, those of the calls that reached it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.registry import LoadedModel, ModelRegistry

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def report(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStatistics:
    """One model version's counts since the process started."""

    name: str
    version: str
    last_inference: int = 0  # milliseconds since the epoch
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    in_runner_ns: int = 0  # successful requests' time in the runner: their queue and run
    batches: dict[int, Duration] = field(default_factory=dict)  # rows per run -> runs

    def queue(self) -> Duration:
        """Time in the runner less the runs that served the requests, per successful request."""
        return Duration(self.success.count, max(0, self.in_runner_ns - self.compute_infer.ns))

    def report(self) -> dict:
        """As Triton's JSON (and, through it, the ModelStatistics protobuf message)."""
        durations = {name: getattr(self, name) for name in DURATIONS if name != "queue"}
        stats = {name: d.report() for name, d in durations.items()}
        stats["queue"] = self.queue().report()
        stats["cache_hit"] = stats["cache_miss"] = Duration().report()
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {name: stats[name] for name in (*DURATIONS, "cache_hit",
                                                               "cache_miss")},
            "batch_stats": [
                {"batch_size": rows, "compute_input": Duration(runs.count).report(),
                 "compute_infer": runs.report(), "compute_output": Duration(runs.count).report()}
                for rows, runs in sorted(self.batches.items())
            ],
        }  # fmt: skip


class Call:
    """One request's record while the data plane answers it (`with Statistics.call(model)`):
    success or fail with its time when the block ends. Plain classes, no generators: this runs
    on every request, and costs a few microseconds this way."""

    __slots__ = ("stats", "runs_counted", "started", "rows", "in_runner_ns", "ns")

    def __init__(self, stats: ModelStatistics, runs_counted: bool) -> None:
        self.stats = stats
        self.runs_counted = runs_counted  # the runner reports its runs (else: one per call)
        self.started = time.perf_counter_ns()
        self.rows = 0
        self.in_runner_ns = 0
        self.ns = {"compute_input": 0, "compute_output": 0}  # counted when the request succeeds

    def __enter__(self) -> Call:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        stats = self.stats
        ns = time.perf_counter_ns() - self.started
        stats.last_inference = time.time_ns() // 1_000_000
        if kind is not None:  # as Triton: a failed request's time is in `fail` alone
            stats.fail.add(ns)
            return
        stats.success.add(ns)
        stats.inference_count += self.rows
        stats.in_runner_ns += self.in_runner_ns
        for what, spent in self.ns.items():
            getattr(stats, what).add(spent)

    def timing(self, what: str) -> _Timed:
        """`with call.timing("compute_input")`: add the block's time to `what`."""
        return _Timed(self, what, 0)

    def in_runner(self, rows: int) -> _Timed:
        """`with call.in_runner(rows)`: the block hands `rows` rows to the runner and waits
        for their logits."""
        return _Timed(self, "", rows)

    def ran(self, rows: int, ns: int) -> None:
        self.rows += rows
        self.in_runner_ns += ns
        if not self.runs_counted:
            self.stats.execution_count += 1
            self.stats.compute_infer.add(ns)
            self.stats.batches.setdefault(rows, Duration()).add(ns)


class _Timed:
    """A timed block of a Call: a step's time (`what`), or the runner's (`rows` rows)."""

    __slots__ = ("call", "what", "rows", "started")

    def __init__(self, call: Call, what: str, rows: int) -> None:
        self.call, self.what, self.rows = call, what, rows

    def __enter__(self) -> None:
        self.started = time.perf_counter_ns()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            return
        ns = time.perf_counter_ns() - self.started
        if self.what:
            self.call.ns[self.what] += ns
        else:
            self.call.ran(self.rows, ns)


class Statistics:
    """Every model version's statistics in this process."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str], ModelStatistics] = {}
        self.runs_counted = False  # set when the batcher reports each run

    def of(self, name: str, version: str | None) -> ModelStatistics:
        key = (name, version or "")
        stats = self.models.get(key)
        if stats is None:
            stats = self.models[key] = ModelStatistics(*key)
        return stats

    def call(self, model: LoadedModel) -> Call:
        """`with statistics.call(model) as call`: record one request on `model`."""
        return Call(self.of(model.name, model.version), self.runs_counted)

    def executed(self, model: LoadedModel, requests: int, rows: int, seconds: float) -> None:
        """One run of `model`'s sessions, of `rows` rows, that served `requests` requests."""
        stats = self.of(model.name, model.version)
        ns = round(seconds * 1e9)
        stats.execution_count += 1
        stats.compute_infer.add(ns * requests, requests)
        stats.batches.setdefault(rows, Duration()).add(ns)

    def report(self, models: list[tuple[str, str | None]]) -> dict:
        """Triton's statistics answer for these (name, version) pairs, zeros where unused."""
        return {"model_stats": [self.of(name, version).report() for name, version in models]}

    def answer(self, registry: ModelRegistry, name: str = "", version: str | None = None) -> dict:
        """The statistics extension's answer: one ready model (404 unknown, 503 not ready), or
        every ready model when `name` is empty, as REST and gRPC both ask."""
        if name:
            model = registry.get_ready(name, version or None)
            return self.report([(model.name, model.version)])
        return self.report([(row.name, row.version) for row in registry.index(ready_only=True)])
