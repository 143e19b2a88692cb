"""Dynamic batching: concurrent requests for one model and variant share one onnxruntime run.

Each (model, variant) has a lane: a FIFO of waiting requests, one worker task, and one thread of
its own where the lane's runs happen, one at a time. Decoding and preprocessing use the CPU
threads of service.threads, so they go on in parallel with inference instead of queueing behind
it.

The policy, per lane:
- a request that finds the lane idle runs at once, alone: a lone request is never delayed;
  when runs of its size on these sessions measured under `inline_run_s` and no lane's thread
  is running, it runs right there on the event loop: the trip to the lane's thread and back
  is two thread wake-ups, and on a CPU shared with other work each waits for the scheduler;
- a batch whose size measured under `inline_run_s` runs on the event loop too (again only
  while no lane's thread is running);
- either runs on the event loop only while the worker holds no request beside the run's own
  (`requests_inside`, the server's count of HTTP request tasks and gRPC calls): under load
  the loop has other requests to read, decode and answer, and a run in the lane's thread
  goes on beside that work (digits, 64 connections, measured: 1.06x REST and 1.10x gRPC
  calls per second with every run in the thread; with one connection, 0.65x REST). With no
  other request inside, nothing waits for the loop but what arrives during the run, which
  `inline_run_s` bounds (a health probe waits at most that long);
- requests that arrive while a batch runs queue up; when the run ends they go together, up to
  `max_batch_size` rows, after waiting for companions at most `max_delay_s` from their arrival;
- a run that measured `WIDE_RUN_S` or more, on a model with a wide session for the variant
  (service.registry), runs there (in the lane's thread or on the loop) when the rest of the
  machine has been quiet lately (service.cpus.OthersLoad) and no other lane runs: a lone heavy
  request on an idle server takes every core, while under load each worker keeps to its
  share; `bnfold_wide_runs_total` counts those runs;
- a request is never split: one with more rows than `max_batch_size` runs alone;
- rows are concatenated in queue order and each caller gets exactly its own slice back;
- a caller that gives up (timeout) while queued is dropped before its batch is formed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.cpus import OthersLoad
from service.errors import ServiceUnavailable
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.registry import LoadedModel

log = logging.getLogger(__name__)

SMOOTHING = 0.2  # weight of the newest run in a lane's running mean of a run's seconds
WIDE_RUN_S = 0.002  # shorter runs gain less from more threads than waking them costs
QUIET_CORES = 0.5  # the rest of the machine used less than this lately: it is idle


@dataclass(eq=False)
class _Request:
    model: LoadedModel
    x: np.ndarray  # (n, C, H, W) float32
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.monotonic)


class _LaneMetrics:
    """The lane's metric children, looked up once: every run records five or six of them."""

    def __init__(self, metrics: Metrics, name: str, variant: str) -> None:
        self.queue_wait = metrics.queue_wait.labels(name, variant)
        self.batch_size = metrics.batch_size.labels(name, variant)
        self.inference_seconds = metrics.inference_seconds.labels(name, variant)
        self.images = metrics.images.labels(name, variant)
        self.inferences = metrics.inferences.labels(name, variant)
        self.wide_runs = metrics.wide_runs.labels(name, variant)


@dataclass(eq=False)
class _Lane:
    name: str
    variant: str
    loop: asyncio.AbstractEventLoop
    executor: ThreadPoolExecutor
    metrics: _LaneMetrics
    waiting: deque[_Request] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task | None = None
    running: bool = False  # a batch is in the lane's thread now
    measured_model: LoadedModel | None = None  # the sessions `run_seconds` were measured on
    # rows -> running mean of the seconds a run of that many rows took: a run's time is not
    # proportional to its rows (a fixed cost per run dominates small ones, on a GPU above all)
    run_seconds: dict[int, float] = field(default_factory=dict)

    def rows_waiting(self) -> int:
        return sum(len(r.x) for r in self.waiting)

    def runs_inline(self, model: LoadedModel, rows: int, limit_s: float) -> bool:
        """Nothing queued, and runs of `rows` rows on these sessions measured under `limit_s`
        (the caller checks that no lane's thread is running, this one's included)."""
        return not self.waiting and self.cheap(model, rows, limit_s)

    def cheap(self, model: LoadedModel, rows: int, limit_s: float) -> bool:
        """Runs of `rows` rows on these sessions measured under `limit_s`."""
        if model is not self.measured_model:
            return False  # a reloaded model is measured anew, in the thread
        seconds = self.run_seconds.get(rows)
        return seconds is not None and seconds < limit_s

    def worth_wide(self, model: LoadedModel, rows: int) -> bool:
        """A wide session for this variant, and runs of `rows` rows measured at WIDE_RUN_S or
        more."""
        if self.variant not in model.wide_sessions or model is not self.measured_model:
            return False
        seconds = self.run_seconds.get(rows)
        return seconds is not None and seconds >= WIDE_RUN_S

    def measured(self, model: LoadedModel, rows: int, seconds: float) -> None:
        if model is not self.measured_model:
            self.measured_model, self.run_seconds = model, {}
        old = self.run_seconds.get(rows)
        self.run_seconds[rows] = seconds if old is None else old + SMOOTHING * (seconds - old)


class BatchingRunner:
    """A `Runner` that merges concurrent requests per (model, variant) into one run."""

    def __init__(
        self,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        metrics: Metrics | None = None,
        inline_run_s: float = 0.0,
        on_run: Callable[[LoadedModel, int, int, float], None] | None = None,
    ) -> None:
        """`on_run(model, requests, rows, seconds)` hears of every run (the statistics)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.inline_run_s = inline_run_s  # cheaper runs are done on the event loop
        self.metrics = metrics or Metrics()
        self.on_run = on_run
        # The requests this worker holds now, set by the server (service/server.py); None (an
        # app without the server, in tests): only the run's own
        self.requests_inside: Callable[[], int] | None = None
        self.lanes: dict[tuple[str, str], _Lane] = {}
        self.others_load = OthersLoad()
        self.closed = False

    async def logits(self, model: LoadedModel, variant: str, x: np.ndarray) -> np.ndarray:
        """Queue x (N, C, H, W) and wait for its logits (N, classes), computed in some batch."""
        if self.closed:
            raise ServiceUnavailable("the server is shutting down")
        lane = self._lane(model.name, variant)
        if self._loop_free(1) and lane.runs_inline(model, len(x), self.inline_run_s):
            wide = self._goes_wide(lane, model, len(x))
            logits, seconds = _timed_run(model, lane.variant, x, wide)
            lane.metrics.queue_wait.observe(0.0)
            self._record(lane, model, 1, len(x), seconds, wide)
            return logits
        request = _Request(model, x, lane.loop.create_future())
        lane.waiting.append(request)
        lane.wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:  # the caller gave up (timeout): its rows never run
            with contextlib.suppress(ValueError):
                lane.waiting.remove(request)
            raise

    async def aclose(self) -> None:
        """Stop the workers; requests still queued (none after a drain) get 503."""
        self.closed = True
        loop = asyncio.get_running_loop()
        for lane in self.lanes.values():
            if lane.worker is not None and lane.loop is loop:
                lane.worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.worker
            for request in lane.waiting:
                if not request.future.done():
                    request.future.set_exception(ServiceUnavailable("the server shut down"))
            lane.executor.shutdown(wait=False, cancel_futures=True)
        self.lanes = {}

    def _machine_quiet(self) -> bool:
        """The other processes (this server's other workers included) used less than
        QUIET_CORES lately, and no other lane of this worker is running."""
        others = self.others_load.others()
        return others is not None and others < QUIET_CORES and not self._thread_running()

    def _loop_free(self, requests: int) -> bool:
        """Nothing but a run of `requests` requests would wait for the event loop: no lane's
        thread is running and the worker holds no other request."""
        if self._thread_running():
            return False
        count = self.requests_inside
        return count is None or count() <= requests

    def _thread_running(self) -> bool:
        """A batch is in some lane's thread now: it holds a core, and a run on the event loop
        would hold up the loop behind it."""
        return any(lane.running for lane in self.lanes.values())

    def _lane(self, name: str, variant: str) -> _Lane:
        loop = asyncio.get_running_loop()
        lane = self.lanes.get((name, variant))
        if lane is None or lane.loop is not loop:  # a lane belongs to one event loop
            if lane is not None:  # that loop is gone (tests run one loop after another)
                lane.executor.shutdown(wait=False)
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"bnfold-{name}-{variant}")
            children = _LaneMetrics(self.metrics, name, variant)
            lane = self.lanes[(name, variant)] = _Lane(name, variant, loop, executor, children)
            lane.worker = loop.create_task(self._work(lane), name=f"batcher {name}/{variant}")
        return lane

    async def _work(self, lane: _Lane) -> None:
        """The lane's loop: wait for requests, form a batch, run it, hand the rows back."""
        idle = True  # no run since the lane last had nothing to do
        while True:
            try:
                if not lane.waiting:
                    idle = True
                    lane.wakeup.clear()
                    await lane.wakeup.wait()
                if not idle:  # they queued behind the last run: let companions join
                    await self._wait_for_companions(lane)
                batch = self._take(lane)
                if batch:
                    idle = False
                    await self._answer(lane, batch)
            except Exception:  # a bug here must not leave every later request hanging
                log.exception("batcher %s/%s: unexpected error", lane.name, lane.variant)

    async def _wait_for_companions(self, lane: _Lane) -> None:
        """Until the batch is full or its oldest request has waited max_delay_s."""
        while lane.waiting and lane.rows_waiting() < self.max_batch_size:
            remaining = lane.waiting[0].enqueued + self.max_delay_s - time.monotonic()
            if remaining <= 0:
                return
            lane.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wakeup.wait(), remaining)

    def _take(self, lane: _Lane) -> list[_Request]:
        """The longest queue prefix that fits max_batch_size rows (at least one request)."""
        batch: list[_Request] = []
        rows = 0
        while lane.waiting:
            head = lane.waiting[0]
            if head.future.done():  # cancelled after all
                lane.waiting.popleft()
                continue
            # One run per set of sessions: after a reload, old and new requests do not mix.
            if batch and (
                head.model is not batch[0].model or rows + len(head.x) > self.max_batch_size
            ):
                break
            batch.append(lane.waiting.popleft())
            rows += len(head.x)
        return batch

    async def _answer(self, lane: _Lane, batch: list[_Request]) -> None:
        """One onnxruntime run for the batch; each caller gets its rows, or the error."""
        try:
            logits = await self._batch_logits(lane, batch)
        except Exception as exc:  # every caller in this batch gets the error; the lane goes on
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        start = 0
        for request in batch:
            rows = len(request.x)
            if not request.future.done():  # a caller that timed out meanwhile gets nothing
                request.future.set_result(logits[start : start + rows])
            start += rows

    async def _batch_logits(self, lane: _Lane, batch: list[_Request]) -> np.ndarray:
        started = time.monotonic()
        queue_wait = lane.metrics.queue_wait
        for request in batch:
            wait = started - request.enqueued
            queue_wait.observe(wait)
        x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])  # (B, C, H, W)
        model = batch[0].model
        wide = self._goes_wide(lane, model, len(x))
        if self._loop_free(len(batch)) and lane.cheap(model, len(x), self.inline_run_s):
            logits, seconds = _timed_run(model, lane.variant, x, wide)  # here, on the loop
        else:
            lane.running = True
            try:
                logits, seconds = await lane.loop.run_in_executor(
                    lane.executor, _timed_run, model, lane.variant, x, wide
                )
            finally:
                lane.running = False
        self._record(lane, model, len(batch), len(x), seconds, wide)
        return logits  # (B, classes)

    def _goes_wide(self, lane: _Lane, model: LoadedModel, rows: int) -> bool:
        """A run of `rows` rows takes the wide session: worth it, and the machine is quiet."""
        return lane.worth_wide(model, rows) and self._machine_quiet()

    def _record(
        self, lane: _Lane, model: LoadedModel, requests: int, rows: int, seconds: float, wide: bool
    ) -> None:
        lane.measured(model, rows, seconds)
        children = lane.metrics
        if wide:
            children.wide_runs.inc()
        children.batch_size.observe(rows)
        children.inference_seconds.observe(seconds)
        children.images.inc(rows)
        children.inferences.inc(requests)
        engine = model.engines.get(lane.variant)
        if engine is not None:
            m = self.metrics
            m.child(m.engine_runs, lane.name, lane.variant, engine.engine, engine.precision).inc()
        if self.on_run is not None:
            self.on_run(model, requests, rows, seconds)


def _timed_run(
    model: LoadedModel, variant: str, x: np.ndarray, wide: bool = False
) -> tuple[np.ndarray, float]:
    """model.run(variant, x, wide) and the seconds it took, measured where it ran."""
    started = time.perf_counter()
    logits = model.run(variant, x, wide)
    return logits, time.perf_counter() - started
