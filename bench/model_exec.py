"""Model execution in process: onnxruntime per variant, optimization level and threads, and torch.

Each point (engine, variant, level, threads, batch) runs one warm-up, then timed runs for about
`plan.point_seconds`. A point whose single run would take longer than `plan.max_run_seconds`
(estimated from the previous batch size) is skipped and says so: the time stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from bench.models import BenchModel
from bench.plan import Plan

ORT_LEVELS = {
    "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
MIN_TIMED_RUNS = 2


@dataclass(frozen=True)
class Config:
    """What executes: engine, variant, optimization level, intra-op threads."""

    engine: str
    variant: str  # "folded" or "unfolded"
    level: str  # onnxruntime graph optimization level; "eager" for torch
    threads: int

    @property
    def label(self) -> str:
        return f"{self.engine} {self.variant} {self.level} t{self.threads}"


def ort_session(path: str, level: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ORT_LEVELS[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def latency_stats(seconds: list[float], batch: int) -> dict:
    """Images/s over all timed runs and per-run latency percentiles in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return {
        "runs": len(seconds),
        "images_per_s": batch * len(seconds) / float(np.sum(seconds)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def time_runs(run: Callable[[], object], seconds: float) -> list[float]:
    """One warm-up, then timed runs until `seconds` passed (at least MIN_TIMED_RUNS)."""
    run()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < MIN_TIMED_RUNS or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def sweep_batches(
    make_run: Callable[[np.ndarray], Callable[[], object]], shape: tuple, plan: Plan
) -> Iterator[dict]:
    """One row per batch size; skipped when the previous size predicts a run over budget."""
    rng = np.random.default_rng(0)
    per_image = 0.0
    for batch in plan.batch_sizes:
        estimate = per_image * batch
        if estimate > plan.max_run_seconds:
            yield {"batch": batch, "skipped": f"one run would take ~{estimate:.2f} s"}
            continue
        x = rng.normal(size=(batch, *shape)).astype(np.float32)  # (N, C, H, W)
        row = {"batch": batch, **latency_stats(time_runs(make_run(x), plan.point_seconds), batch)}
        per_image = 1.0 / row["images_per_s"]
        yield row


def ort_configs(plan: Plan) -> Iterator[Config]:
    for variant in ("folded", "unfolded"):
        for level in plan.levels:
            for threads in plan.threads:
                yield Config("onnxruntime", variant, level, threads)


def torch_configs(plan: Plan) -> Iterator[Config]:
    for variant in ("unfolded", "folded"):
        for threads in plan.threads:
            yield Config("torch", variant, "eager", threads)


def measure_ort(model: BenchModel, cfg: Config, plan: Plan) -> list[dict]:
    session = ort_session(str(model.bundle_dir / f"{cfg.variant}.onnx"), cfg.level, cfg.threads)
    name_in = session.get_inputs()[0].name

    def make_run(x: np.ndarray) -> Callable[[], object]:
        return lambda: session.run(None, {name_in: x})

    return list(sweep_batches(make_run, model.input_shape, plan))


def measure_torch(model: BenchModel, cfg: Config, plan: Plan) -> list[dict]:
    """torch eager in inference mode: the module as trained, or fold_batchnorm's GraphModule."""
    module = model.folded_module if cfg.variant == "folded" else model.module
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)

    def make_run(x: np.ndarray) -> Callable[[], object]:
        tensor = torch.from_numpy(x)

        def run() -> object:
            with torch.inference_mode():
                return module(tensor)

        return run

    try:
        return list(sweep_batches(make_run, model.input_shape, plan))
    finally:
        torch.set_num_threads(previous)


def measure_model(model: BenchModel, plan: Plan, log: Callable[[str], None] = print) -> list[dict]:
    """Every configuration in turn, `plan.exec_rounds` times over; one row per point.

    Odd rounds run the configurations in reverse (A B C, C B A) so that a load drifting over
    the run cannot favour whichever came first. A point keeps its faster round: on a shared
    machine, noise only ever slows a compute loop down.
    """
    configs = [(c, measure_ort) for c in ort_configs(plan)]
    configs += [(c, measure_torch) for c in torch_configs(plan)]
    rounds: dict[tuple, list[dict]] = {}
    for rnd in range(plan.exec_rounds):
        for cfg, measure in configs if rnd % 2 == 0 else configs[::-1]:
            start = time.perf_counter()
            points = measure(model, cfg, plan)
            for p in points:
                rounds.setdefault((cfg, p["batch"]), []).append(p)
            best = max((p.get("images_per_s", 0.0) for p in points), default=0.0)
            took = time.perf_counter() - start
            log(f"  {model.name} r{rnd + 1}: {cfg.label}: best {best:,.0f} img/s ({took:.1f} s)")
    return [_merge_rounds(model.name, cfg, points) for (cfg, _), points in rounds.items()]


def _merge_rounds(model: str, cfg: Config, points: list[dict]) -> dict:
    measured = [p for p in points if "images_per_s" in p]
    if not measured:
        return {"model": model, **cfg.__dict__, **points[0]}
    best = max(measured, key=lambda p: p["images_per_s"])
    per_round = [round(p["images_per_s"], 1) for p in measured]
    return {"model": model, **cfg.__dict__, **best, "rounds_images_per_s": per_round}


def best_limit(rows: list[dict], model: str) -> dict:
    """The compute limit: the fastest onnxruntime point of the folded (served) model."""
    points = [
        r
        for r in rows
        if r["model"] == model
        and r["engine"] == "onnxruntime"
        and r["variant"] == "folded"
        and "images_per_s" in r
    ]
    best = max(points, key=lambda r: r["images_per_s"])
    keys = ("level", "threads", "batch", "images_per_s", "p50_ms")
    return {k: best[k] for k in keys}


class InprocessLimit:
    """In-process onnxruntime at its best configuration, runnable as one serving target."""

    def __init__(self, model: BenchModel, limit: dict) -> None:
        path = str(model.bundle_dir / "folded.onnx")
        self.session = ort_session(path, limit["level"], limit["threads"])
        self.batch = limit["batch"]
        shape = (self.batch, *model.input_shape)
        self.x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        self.name_in = self.session.get_inputs()[0].name

    def measure(self, seconds: float) -> dict:
        """Images/s (one image = one request) and per-batch latency, as a wrk row reads."""
        times = time_runs(lambda: self.session.run(None, {self.name_in: self.x}), seconds)
        stats = latency_stats(times, self.batch)
        return {
            "requests": self.batch * len(times),
            "rps": stats["images_per_s"],
            "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"],
            "errors": 0,
        }


EXEC_RATIOS = (
    # (label, numerator config, denominator config): (engine, variant, level)
    (
        "folded / unfolded, both ALL",
        ("onnxruntime", "folded", "ALL"),
        ("onnxruntime", "unfolded", "ALL"),
    ),
    (
        "folded / unfolded, both DISABLE_ALL (BN executed)",
        ("onnxruntime", "folded", "DISABLE_ALL"),
        ("onnxruntime", "unfolded", "DISABLE_ALL"),
    ),
    (
        "served: folded ALL / unfolded DISABLE_ALL",
        ("onnxruntime", "folded", "ALL"),
        ("onnxruntime", "unfolded", "DISABLE_ALL"),
    ),
    (
        "folded: ALL / DISABLE_ALL",
        ("onnxruntime", "folded", "ALL"),
        ("onnxruntime", "folded", "DISABLE_ALL"),
    ),
    (
        "folded: BASIC / DISABLE_ALL",
        ("onnxruntime", "folded", "BASIC"),
        ("onnxruntime", "folded", "DISABLE_ALL"),
    ),
    (
        "onnxruntime folded ALL / torch eager",
        ("onnxruntime", "folded", "ALL"),
        ("torch", "unfolded", "eager"),
    ),
    (
        "torch eager: folded GraphModule / module",
        ("torch", "folded", "eager"),
        ("torch", "unfolded", "eager"),
    ),
)


def exec_ratios(rows: list[dict], limits: dict[str, dict]) -> list[dict]:
    """Images/s ratios between configurations at equal threads, at batch 1 and the limit's batch."""
    keys = ("model", "engine", "variant", "level", "threads", "batch")
    speed = {tuple(r[k] for k in keys): r["images_per_s"] for r in rows if "images_per_s" in r}
    out = []
    for model, limit in limits.items():
        threads = sorted({r["threads"] for r in rows if r["model"] == model})
        for label, num, den in EXEC_RATIOS:
            for t in threads:
                for batch in dict.fromkeys((1, limit["batch"])):
                    a, b = speed.get((model, *num, t, batch)), speed.get((model, *den, t, batch))
                    if a and b:
                        out.append(
                            {
                                "model": model,
                                "ratio": label,
                                "threads": t,
                                "batch": batch,
                                "value": a / b,
                            }
                        )
    return out
