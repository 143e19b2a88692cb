"""bnfold per worker count: memory of the whole server (every process) idle and under a flood,
and throughput, digits model, multipart predict at concurrency 64.

For each count N (1 up to the usable cores) a fresh server starts with BNFOLD_WORKERS=N, is
left to settle, and its resident memory is summed over its process group (the supervisor,
multiprocessing's resource tracker and the N workers): that is `idle`. Then wrk floods it and
the group's memory is sampled every 0.1 s: the peak is `flood`. Counts run in turn, A B A B.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from pathlib import Path

from bench import servers
from bench.models import BenchModel
from bench.plan import Plan
from bench.serving import write_payloads
from bench.wrk_load import run_wrk

CONNECTIONS = 64


def counts() -> list[int]:
    from service.cpus import usable_cpus

    return sorted({1, usable_cpus()})


def measure(model: BenchModel, plan: Plan, work: Path, log: Callable[[str], None] = print) -> dict:
    """Rows (one per worker count and round) and their medians."""
    body, ctype = write_payloads(model, work / "payloads")["multipart"]
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for rnd in range(plan.rounds):
        for workers in counts():
            row = _one(model, plan, workers, body, ctype, logs)
            rows.append({"round": rnd, **row})
            log(
                f"  workers={workers} round {rnd + 1}: idle {row['idle_rss_mib']:.0f} MiB, "
                f"flood {row['flood_rss_mib']:.0f} MiB, {row['rps']:,.0f} req/s, "
                f"errors {row['errors']}"
            )
    return {"rows": rows, "summary": summarize(rows)}


def _one(model: BenchModel, plan: Plan, workers: int, body: Path, ctype: str, logs: Path) -> dict:
    env = {**plan.bnfold_env, "BNFOLD_WORKERS": str(workers)}
    server = servers.bnfold_server(model.serve_dir, logs, env)
    try:
        servers.wait_ready(server)
        servers.settle(server)
        pgid = server.proc.pid
        idle = servers.group_rss_kib(pgid)
        peak, stop = [idle], threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                peak.append(servers.group_rss_kib(pgid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        url = server.url(f"/v1/models/{model.name}/predict")
        try:
            result = run_wrk(url, body, ctype, CONNECTIONS, max(plan.wrk_seconds, 2))
        finally:
            stop.set()
            sampler.join()
    finally:
        servers.stop(server)
    return {
        "workers": workers,
        "idle_rss_mib": idle / 1024,
        "flood_rss_mib": max(peak) / 1024,
        "rps": result["rps"],
        "p99_ms": result["p99_ms"],
        "errors": result["errors"],
    }


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for workers in sorted({r["workers"] for r in rows}):
        rs = [r for r in rows if r["workers"] == workers]
        out.append(
            {
                "workers": workers,
                "rounds": len(rs),
                **{
                    k: statistics.median(r[k] for r in rs)
                    for k in ("idle_rss_mib", "flood_rss_mib", "rps", "p99_ms")
                },
                "errors": sum(r["errors"] for r in rs),
            }
        )
    return out


def markdown(result: dict) -> str:
    """The summary as a Markdown table (medians over rounds)."""
    lines = [
        "| workers | RSS idle, all processes (MiB) | RSS under flood, peak (MiB) | "
        "multipart req/s, c=64 | p99 (ms) | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['workers']} | {s['idle_rss_mib']:.0f} | {s['flood_rss_mib']:.0f} | "
            f"{s['rps']:,.0f} | {s['p99_ms']:.1f} | {s['errors']} |"
        )
    return "\n".join(lines)
