"""`python -m bench.contention`: bnfold and the minimal handler on a quiet and on a contended CPU.

The same request as make bench's headline comparison (multipart PNG predict on digits, wrk
with one thread and 64 connections), against bnfold (its defaults: one worker per core), the
minimal handler (bench/peers/minimal.py) and the minimal handler under `uvicorn --workers N`
(N = bnfold's workers), targets alternating, the others paused. Then the same with `--hogs`
busy-looping processes beside them, as on a node shared with other work.

Per server: successful requests/s, p99, the CPU the server's processes received (cores) and
successful calls per server CPU-second. On a contended CPU the scheduler decides how much CPU
each server gets; calls per CPU-second is what the server itself decides.
Results: bench/results/contention.md and .json, the command and the machine at the top.

    python -m bench.contention [--seconds 5] [--rounds 2] [--hogs 0,2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers_run, servers
from bench.serving import BOUNDARY, multipart_body
from bench.wrk_load import run_wrk

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits"
PATHS = {
    "bnfold": "/v1/models/digits/predict",
    "minimal": "/predict",
    "minimal-workers": "/predict",
}
CONNECTIONS = 64


def start(logs: Path) -> dict[str, servers.Server]:
    from service.cpus import usable_cpus

    running = {
        "bnfold": servers.bnfold_server(REPO / "models", logs),
        "minimal": servers.minimal_server(DIGITS, logs),
        # as many processes as bnfold's default workers (one per usable core)
        "minimal-workers": servers.minimal_server(DIGITS, logs, max(2, usable_cpus())),
    }
    for server in running.values():
        servers.wait_ready(server)
    return running


def measure(running: dict, body: Path, seconds: int, rounds: int, hogs: int) -> list[dict]:
    """One row per server: medians over rounds, with `hogs` busy loops running beside them."""
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    samples: dict[str, list[dict]] = {name: [] for name in running}
    try:
        for r in range(rounds):
            names = list(running)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for other, server in running.items():
                    (servers.resume if other == name else servers.pause)(server)
                server = running[name]
                cpu0, t0 = servers.group_cpu_seconds(server.proc.pid), time.monotonic()
                got = run_wrk(server.url(PATHS[name]), body, ctype, CONNECTIONS, seconds)
                cpu = servers.group_cpu_seconds(server.proc.pid) - cpu0
                got["cores"] = cpu / (time.monotonic() - t0)
                got["calls_per_cpu_s"] = got["rps"] * (time.monotonic() - t0) / max(cpu, 1e-9)
                samples[name].append(got)
    finally:
        for server in running.values():
            servers.resume(server)
        for loop in loops:
            loop.kill()
            loop.wait()
    rows = []
    for name, got in samples.items():
        med = {k: statistics.median(g[k] for g in got) for k in
               ("rps", "p99_ms", "cores", "calls_per_cpu_s")}  # fmt: skip
        rows.append({"server": name, "hogs": hogs, **med, "errors": sum(g["errors"] for g in got)})
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# bnfold and the minimal handler, quiet and beside CPU hogs (digits, multipart, c=64)",
        "",
        *(f"- {k}: {v}" for k, v in result["environment"].items()),
        "",
        "| CPU hogs | server | req/s | p99 ms | server CPU (cores) | calls per server CPU-s "
        "| errors |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['hogs']} | {row['server']} | {row['rps']:,.0f} | {row['p99_ms']:.1f} "
            f"| {row['cores']:.2f} | {row['calls_per_cpu_s']:,.0f} | {row['errors']} |"
        )
    lines += ["", "Medians over rounds; targets alternate, the others paused (SIGSTOP)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hogs", default="0,2", help="comma-separated busy-loop counts")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    command = " ".join(["python -m bench.contention", *argv])
    hogs = [int(h) for h in args.hogs.split(",")]
    print(markdown(run(args.seconds, args.rounds, hogs, args.out, command)))
    return 0


def run(seconds: int, rounds: int, hogs: list[int], out: Path, command: str) -> dict:
    """Measure, write contention.json and contention.md into `out`; the result."""
    work = Path(tempfile.mkdtemp(prefix="bnfold-contention-"))
    body = work / "digit.multipart"
    body.write_bytes(multipart_body((REPO / "examples" / "digit-3.png").read_bytes(), "d.png"))
    running = start(work)
    try:
        for name, server in running.items():  # warm, and every answer checked once
            run_wrk(server.url(PATHS[name]), body, f"multipart/form-data; boundary={BOUNDARY}",
                    16, 2)  # fmt: skip
        rows = []
        for count in hogs:
            rows += measure(running, body, seconds, rounds, count)
    finally:
        for server in running.values():
            servers.stop(server)
    # the same lines as peers.md's (bnfold runs with its defaults here too)
    result = {"environment": peers_run.environment(command, {}), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "contention.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "contention.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
