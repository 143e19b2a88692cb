"""service/batching.py: concurrent requests merged into one onnxruntime run, each caller
getting exactly its own rows back, with the batch sizes, delays and drops the settings promise.

Tolerance: a row's logits may change by a few float32 ulps when onnxruntime runs it in a batch
of another size (other blocking and summation order): measured here at most 1.9e-6 on logits
of magnitude up to 4.5 (unfolded; folded was identical) over 300 digits and batch sizes 2-64.
TOL = 1e-5 allows five times that. A row taken from another image differs by more than 3
(checked below), so a mix-up cannot hide inside TOL, and it changes the label.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np
import pytest

from service.batching import BatchingRunner
from service.config import Settings
from service.process import Core
from service.registry import LoadedModel

TOL = 1e-5
SIZES = [1, 3, 2, 1, 4, 1, 2, 5, 1, 1, 3, 2, 1, 2, 1]  # rows per request: 30 digits in all


def slices(sizes: list[int]) -> list[slice]:
    ends = np.cumsum(sizes)
    return [slice(int(e - n), int(e)) for n, e in zip(sizes, ends, strict=True)]


async def started(models_dir, **overrides) -> Core:
    """A started core; its runs always go to the lane's thread (inline_run_us=0) unless told,
    since the digits model is cheap enough to run on the event loop otherwise."""
    settings = {"models_dir": models_dir, "provider": "cpu", "inline_run_us": 0, **overrides}
    core = Core.build(Settings(**settings))
    await core.start()
    return core


def infer(core: Core, variant: str, x: np.ndarray):
    """The data plane's inference on the digits model as admission would hand it over."""
    return core.plane.logits(core.registry.get_ready("digits"), variant, x)


class Runs:
    """The rows of every onnxruntime run of the given models from now on: rows -> runs."""

    def __init__(self, *models: LoadedModel) -> None:
        self.rows: Counter[int] = Counter()
        for model in models:
            model.run = self._recorder(model.run)  # type: ignore[method-assign]

    def _recorder(self, inner):
        def run(variant, x, wide=False):
            self.rows[len(x)] += 1
            return inner(variant, x, wide)

        return run


class Gate:
    """Stands in for a model's onnxruntime run: records batch sizes, blocks until opened,
    raises when told to (an onnxruntime failure), else runs the real session."""

    def __init__(self, model: LoadedModel, open_: bool = False) -> None:
        self.inner = model.run
        self.rows: list[int] = []
        self.threads: list[threading.Thread] = []
        self.wide: list[bool] = []
        self.opened = threading.Event()
        self.fail_next = False
        if open_:
            self.opened.set()
        model.run = self  # type: ignore[method-assign]

    def __call__(self, variant, x, wide=False):
        self.rows.append(len(x))
        self.wide.append(wide)
        self.threads.append(threading.current_thread())
        assert self.opened.wait(10), "gate never opened"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected onnxruntime failure")
        return self.inner(variant, x, wide)


@pytest.mark.parametrize("variant", ["folded", "unfolded"])
def test_concurrent_callers_get_their_own_rows_as_computed_one_by_one(
    models_dir, digit_batch, digits, variant
):
    parts = slices(SIZES)

    async def main():
        core = await started(models_dir, max_batch_size=8)
        alone = [await infer(core, variant, digit_batch[s]) for s in parts]
        runs = Runs(core.registry.models["digits"])
        calls = (infer(core, variant, digit_batch[s]) for s in parts)
        together = await asyncio.gather(*calls)
        await core.aclose()
        return alone, together, runs.rows

    alone, together, runs = asyncio.run(main())
    reference = np.concatenate(alone)  # (30, 10)
    labels = [d.label for d in digits]
    assert list(reference.argmax(1)) == labels  # the reference itself is right
    different = [np.abs(reference[i] - reference[j]).max() for i in range(30) for j in range(30)
                 if labels[i] != labels[j]]  # fmt: skip
    assert min(different) > 1000 * TOL  # a mixed-up row would show far outside TOL
    for s, one, merged in zip(parts, alone, together, strict=True):
        assert merged.shape == one.shape == (s.stop - s.start, 10)
        np.testing.assert_allclose(merged, one, rtol=0, atol=TOL)
        assert list(merged.argmax(1)) == labels[s]
    # Requests really were merged (else this test proves nothing), never past 8 rows.
    assert sum(rows * n for rows, n in runs.items()) == 30
    assert max(runs) > 1 and max(runs) <= 8 and sum(runs.values()) < len(SIZES)


def test_batch_sizes_grow_with_concurrency(models_dir, digit_batch):
    async def mean_rows(core: Core, concurrency: int, requests: int = 48) -> float:
        runs = Runs(core.registry.models["digits"]).rows

        async def client(i: int) -> None:
            for _ in range(requests // concurrency):
                await infer(core, "folded", digit_batch[i : i + 1])

        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return sum(rows * n for rows, n in runs.items()) / sum(runs.values())

    async def main():
        core = await started(models_dir, max_batch_size=32)
        means = [await mean_rows(core, c) for c in (1, 4, 16)]
        await core.aclose()
        return means

    means = asyncio.run(main())
    assert means[0] == 1.0  # one client: every request alone, nothing waits for company
    # With company, requests that queue behind a run share the next one. How many depends on
    # how fast this machine runs a batch, so only "more than one" is asserted.
    assert means[1] > 1.0 and means[2] > 1.0, means


def test_a_lone_request_is_not_delayed_even_with_a_long_max_delay(models_dir, digit_batch):
    async def main():
        core = await started(models_dir, max_delay_ms=5000)
        await infer(core, "folded", digit_batch[:1])  # first run: warm
        t0 = time.perf_counter()
        await infer(core, "folded", digit_batch[1:2])
        elapsed = time.perf_counter() - t0
        await core.aclose()
        return elapsed

    # An idle lane runs at once: well under the 5 s it would wait for company (half of it leaves
    # a loaded machine seconds for one 8x8 digit).
    assert asyncio.run(main()) < 2.5


def test_max_batch_size_caps_batches_and_never_splits_a_request(models_dir, digit_batch):
    async def main():
        core = await started(models_dir, max_batch_size=4)
        runs = Runs(core.registry.models["digits"])
        calls = [infer(core, "folded", digit_batch[i : i + 1]) for i in range(12)]
        calls.insert(5, infer(core, "folded", digit_batch[:6]))
        results = await asyncio.gather(*calls)
        await core.aclose()
        return results, runs.rows

    results, runs = asyncio.run(main())
    assert set(runs) <= {1, 2, 3, 4, 6} and runs[6] == 1  # the 6-row request ran alone, whole
    assert results[5].shape == (6, 10)


def test_max_batch_size_1_turns_batching_off(models_dir, digit_batch):
    async def main():
        core = await started(models_dir, max_batch_size=1)
        runs = Runs(core.registry.models["digits"])
        await asyncio.gather(*(infer(core, "folded", digit_batch[i : i + 1])
                               for i in range(10)))  # fmt: skip
        await core.aclose()
        return runs.rows

    assert asyncio.run(main()) == {1: 10}


def test_a_request_given_up_while_queued_is_dropped_before_it_runs(models_dir, digit_batch):
    async def main():
        core = await started(models_dir)
        gate = Gate(core.registry.models["digits"])
        running = asyncio.create_task(infer(core, "folded", digit_batch[:1]))
        while not gate.rows:  # the first request holds the lane's thread
            await asyncio.sleep(0.005)
        with pytest.raises(TimeoutError):  # the second gives up while queued
            await asyncio.wait_for(infer(core, "folded", digit_batch[1:3]), 0.05)
        gate.opened.set()
        first = await running
        lane = core.plane.runner.lanes[("digits", "folded")]
        await core.aclose()
        return gate.rows, first, len(lane.waiting)

    rows, first, still_waiting = asyncio.run(main())
    assert rows == [1] and still_waiting == 0  # the 2-row request never reached the model
    assert first.shape == (1, 10)


def test_a_failed_run_fails_its_callers_and_the_lane_goes_on(models_dir, digit_batch):
    async def main():
        core = await started(models_dir)
        gate = Gate(core.registry.models["digits"], open_=True)
        gate.fail_next = True
        with pytest.raises(RuntimeError, match="^injected onnxruntime failure$"):
            await infer(core, "folded", digit_batch[:2])
        after = await infer(core, "folded", digit_batch[:2])
        await core.aclose()
        return after

    assert asyncio.run(main()).shape == (2, 10)


def test_requests_for_different_sessions_of_a_model_never_share_a_run(models_dir, digit_batch):
    """After a reload, requests queued for the old sessions and the new ones run apart."""

    async def main():
        core = await started(models_dir)
        old = core.registry.models["digits"]
        new = await core.registry.reload("digits")
        runs = Runs(old, new)
        runner = core.plane.runner
        assert isinstance(runner, BatchingRunner)
        x = digit_batch[:1]
        await asyncio.gather(*(runner.logits(m, "folded", x) for m in (old, new, old)))
        await core.aclose()
        return runs.rows

    assert asyncio.run(main()) == {1: 3}


def test_a_cheap_run_on_an_idle_lane_is_done_on_the_event_loop_with_the_same_logits(
    models_dir, digit_batch
):
    """Runs measured under inline_run_us are done right there on the event loop: the same
    session, the same rows, so the same logits bit for bit as through the lane's thread."""

    async def main():
        core = await started(models_dir, inline_run_us=1_000_000)  # every run is "cheap"
        gate = Gate(core.registry.models["digits"], open_=True)
        x = digit_batch[:3]
        first = await infer(core, "folded", x)  # nothing measured yet: the lane's thread
        again = [await infer(core, "folded", x) for _ in range(3)]
        await core.aclose()
        return gate.threads, first, again

    threads, first, again = asyncio.run(main())
    assert threads[0] is not threading.main_thread()
    assert threads[1:] == [threading.main_thread()] * 3
    for logits in again:
        np.testing.assert_array_equal(logits, first)


def test_a_run_over_the_inline_limit_goes_to_the_lanes_thread(models_dir, digit_batch):
    async def main():
        core = await started(models_dir, inline_run_us=0.001)  # no real run is that fast
        gate = Gate(core.registry.models["digits"], open_=True)
        for _ in range(3):
            await infer(core, "folded", digit_batch[:1])
        await core.aclose()
        return gate.threads

    assert threading.main_thread() not in asyncio.run(main())


def _five_queued_behind_a_held_run(models_dir, digit_batch, cheap_rows: int, count=None):
    """One request holds the lane's thread (unmeasured, at a closed gate); runs of `cheap_rows`
    rows are then marked cheap and five one-row requests queue behind it; the gate opens.
    (the rows of each run, the thread of each run, each caller's logits)."""

    async def main():
        core = await started(models_dir, inline_run_us=1_000_000, max_batch_size=32)
        if count is not None:
            core.plane.count_requests_with(count)
        await infer(core, "folded", digit_batch[:1])  # the lane and its measures exist
        gate = Gate(core.registry.models["digits"])
        lane = core.plane.runner.lanes[("digits", "folded")]
        lane.run_seconds.clear()  # unmeasured again: this one goes to the thread and holds it
        running = asyncio.create_task(infer(core, "folded", digit_batch[:1]))
        while not gate.rows:
            await asyncio.sleep(0.005)
        lane.run_seconds[cheap_rows] = 1e-9  # cheap, but the lane is busy
        queued = [asyncio.create_task(infer(core, "folded", digit_batch[i : i + 1]))
                  for i in range(1, 6)]  # fmt: skip
        await asyncio.sleep(0.05)
        gate.opened.set()
        got = await asyncio.gather(running, *queued)
        await core.aclose()
        return gate.rows, gate.threads, got

    return asyncio.run(main())


def test_cheap_requests_queue_behind_a_running_batch_instead_of_running_inline(
    models_dir, digit_batch
):
    """Inline runs only on an idle lane: while a batch is in the lane's thread, requests queue
    and go together into the next run, as for any model (a run of one row is cheap, of five
    is not measured: the batch goes to the thread)."""
    rows, threads, _ = _five_queued_behind_a_held_run(models_dir, digit_batch, cheap_rows=1)
    assert rows == [1, 5]  # the five queued requests shared one run
    assert threading.main_thread() not in threads


def test_a_queued_batch_of_a_cheap_size_runs_on_the_event_loop(models_dir, digit_batch):
    """Requests that queued behind a run go together; when runs of that batch's size measured
    under inline_run_us, the batch runs on the event loop (no trip to the lane's thread and
    back), each caller still getting its own rows."""
    rows, threads, got = _five_queued_behind_a_held_run(models_dir, digit_batch, cheap_rows=5)
    assert rows == [1, 5]
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()
    whole = asyncio.run(_direct_logits(models_dir, digit_batch[1:6]))
    np.testing.assert_array_equal(np.concatenate(got[1:]), whole)


async def _direct_logits(models_dir, x: np.ndarray) -> np.ndarray:
    """The session's own answer for x, run as one batch (the same rows as the batch above)."""
    core = await started(models_dir)
    out = core.registry.get_ready("digits").run("folded", x)
    await core.aclose()
    return out


def test_inline_needs_runs_of_that_size_measured_on_these_sessions(models_dir, digit_batch):
    """A fixed cost per run makes small runs dear per row, so each row count is measured on
    its own; a reloaded model is measured anew (its first run goes to the thread)."""

    async def main():
        core = await started(models_dir, inline_run_us=1_000_000)
        await infer(core, "folded", digit_batch[:3])  # 3 rows measured, 1 row not yet
        gate = Gate(core.registry.models["digits"], open_=True)
        await infer(core, "folded", digit_batch[:1])
        await infer(core, "folded", digit_batch[:3])
        new = await core.registry.reload("digits")
        new_gate = Gate(new, open_=True)
        await infer(core, "folded", digit_batch[:3])  # the new sessions: unmeasured
        await infer(core, "folded", digit_batch[:3])
        await core.aclose()
        return gate.threads, new_gate.threads

    old, new = asyncio.run(main())
    assert old[0] is not threading.main_thread() and old[1] is threading.main_thread()
    assert new[0] is not threading.main_thread() and new[1] is threading.main_thread()


def test_a_cheap_run_goes_to_the_thread_while_the_worker_holds_other_requests(
    models_dir, digit_batch
):
    """Under load the event loop has other requests to read, decode and answer: a cheap run
    goes to the lane's thread, beside that work, while the server counts a request inside the
    worker beside the run's own; with none, it runs on the loop again."""
    inside = [2]  # the server's count: this request and one more

    async def main():
        core = await started(models_dir, inline_run_us=1_000_000)
        core.plane.count_requests_with(lambda: inside[0])
        await infer(core, "folded", digit_batch[:1])  # measured: cheap from now on
        gate = Gate(core.registry.models["digits"], open_=True)
        await infer(core, "folded", digit_batch[:1])
        inside[0] = 1  # only its own
        await infer(core, "folded", digit_batch[:1])
        await core.aclose()
        return gate.threads

    threads = asyncio.run(main())
    assert threads[0] is not threading.main_thread()
    assert threads[1] is threading.main_thread()


def test_a_queued_batch_runs_on_the_loop_only_when_it_holds_every_request_inside(
    models_dir, digit_batch
):
    """The batch of five queued requests (cheap at five rows) counts as the worker's only
    requests when the server counts five inside besides the one that held the thread: with a
    sixth it goes to the lane's thread."""
    for inside, on_loop in ((5, True), (6, False)):

        def count(inside=inside):
            return inside

        rows, threads, _ = _five_queued_behind_a_held_run(
            models_dir, digit_batch, cheap_rows=5, count=count
        )
        assert rows == [1, 5]
        assert (threads[1] is threading.main_thread()) is on_loop


def test_no_inline_run_while_another_lanes_thread_runs(models_dir, digit_batch):
    """A batch in any lane's thread holds a core: a cheap request then goes to its own lane's
    thread instead of holding up the event loop behind that batch. (Run on the loop, it would
    block the loop at the closed gate: the test would fail with 'gate never opened'.)"""

    async def main():
        core = await started(models_dir, inline_run_us=1_000_000)
        await infer(core, "folded", digit_batch[:1])  # folded measured: cheap from now on
        gate = Gate(core.registry.models["digits"])
        slow = asyncio.create_task(infer(core, "unfolded", digit_batch[:1]))  # unmeasured
        while not gate.rows:  # unfolded holds its lane's thread at the gate
            await asyncio.sleep(0.005)
        cheap = asyncio.create_task(infer(core, "folded", digit_batch[:1]))
        while len(gate.rows) < 2:
            await asyncio.sleep(0.005)
        gate.opened.set()
        await asyncio.gather(slow, cheap)
        await core.aclose()
        return gate.threads

    threads = asyncio.run(main())
    assert len(threads) == 2 and threading.main_thread() not in threads


@pytest.mark.parametrize("on_loop", [False, True])
def test_a_heavy_run_on_a_quiet_machine_takes_the_wide_session(models_dir, digit_batch, on_loop):
    """A run measured at WIDE_RUN_S or more goes to the variant's wide session (more intra-op
    threads) when the rest of the machine has been quiet lately; to the worker's own share when
    it has not, or is not known yet, or when runs of that size are cheaper. Same logits. The
    same choice when the run is done on the event loop (a lone request, under inline_run_us)."""
    from service.batching import QUIET_CORES, WIDE_RUN_S

    async def main():
        inline = {"inline_run_us": 1_000_000} if on_loop else {}
        core = await started(models_dir, threads=1, idle_threads=2, **inline)
        core.plane.count_requests_with(lambda: 1)  # the run's own request only
        model = core.registry.models["digits"]
        runner = core.plane.runner
        x = digit_batch[:1]
        first = await infer(core, "folded", x)  # measures runs of one row
        gate = Gate(model, open_=True)
        lane = runner.lanes[("digits", "folded")]
        got = []
        for others, seconds in [(0.0, 0.01), (QUIET_CORES * 3, 0.01), (None, 0.01),
                                (0.0, WIDE_RUN_S / 10), (0.0, 0.01)]:  # fmt: skip
            runner.others_load.others = lambda v=others: v
            lane.run_seconds[1] = seconds
            got.append(await infer(core, "folded", x))
        counted = core.metrics.registry.get_sample_value(
            "bnfold_wide_runs_total", {"model": "digits", "variant": "folded"}
        )
        await core.aclose()
        return set(model.wide_sessions), gate.wide, gate.threads, first, got, counted

    wide_variants, wide, threads, first, got, counted = asyncio.run(main())
    assert wide_variants == {"folded", "int8"}
    assert wide == [True, False, False, False, True]
    assert counted == 2  # bnfold_wide_runs_total: the runs that took the wide session
    assert all((t is threading.main_thread()) is on_loop for t in threads)
    for logits in got:
        np.testing.assert_allclose(logits, first, rtol=0, atol=TOL)
