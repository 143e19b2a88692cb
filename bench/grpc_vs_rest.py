"""`python -m bench.grpc_vs_rest [--quick]`: gRPC infer next to REST infer, same server, same run.

One `bnfold-serve` process (one worker, default settings) serves both protocols; the digits
model gets one preprocessed digit per request. The load generators are the clients a user of
the Open Inference Protocol would reach for in Python: tritonclient.grpc.aio for gRPC (raw
tensor bytes) and tritonclient.http.aio for REST (binary tensor extension, and JSON), each a
closed loop of C concurrent requests in a process of its own, plus wrk on the JSON body as the
C-speed HTTP reference the main benchmark uses. ghz, the usual gRPC load generator, is not
packaged on the registries these machines reach.

Targets alternate within each round (A B C D, then B C D A, ...) and every figure is the median
over rounds: the machines are shared and noisy, and neighbours in time drift together.
Results: bench/results/grpc_vs_rest.json, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "grpc_vs_rest.json"
CLIENTS = ("grpc", "rest-binary", "rest-json")
TARGETS = (*CLIENTS, "wrk-json")
CONCURRENCY = (1, 16, 64)


def digit() -> np.ndarray:
    """One held-out digit through the shared preprocessing: (1, 1, 8, 8) float32."""
    from bnfold.bundle import read_manifest
    from bnfold.preprocess import preprocess_bytes

    png = (REPO / "examples" / "digit-3.png").read_bytes()
    spec = read_manifest(REPO / "models" / "digits").input.preprocess
    return preprocess_bytes(png, spec)[None]


# --- the client side: one closed loop per process ------------------------------------------
async def closed_loop(kind: str, url: str, concurrency: int, seconds: float) -> dict:
    """`concurrency` coroutines each sending one request after the other for `seconds`."""
    x = digit()
    if kind == "grpc":
        import tritonclient.grpc.aio as client_lib

        client = client_lib.InferenceServerClient(url)
        inputs = [client_lib.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        outputs = None
    else:
        import tritonclient.http.aio as client_lib

        client = client_lib.InferenceServerClient(url, conn_limit=concurrency)
        binary = kind == "rest-binary"
        inputs = [client_lib.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        outputs = [client_lib.InferRequestedOutput("logits", binary_data=binary)]
    latencies: list[float] = []
    errors = 0

    async def one_loop(deadline: float, record: bool) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await client.infer("digits", inputs, outputs=outputs)
            except Exception:
                errors += 1
                continue
            if record:
                latencies.append(time.perf_counter() - started)

    warm = time.perf_counter() + min(1.0, seconds / 4)
    await asyncio.gather(*(one_loop(warm, False) for _ in range(concurrency)))
    errors = 0
    started = time.perf_counter()
    await asyncio.gather(*(one_loop(started + seconds, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    ms = sorted(t * 1000 for t in latencies)
    return {
        "rps": len(ms) / elapsed,
        "p50_ms": ms[len(ms) // 2] if ms else None,
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else None,
        "errors": errors,
    }


def run_client(kind: str, url: str, concurrency: int, seconds: float) -> dict:
    """The closed loop in a fresh process (its CPU is its own, not the orchestrator's)."""
    cmd = [sys.executable, "-m", "bench.grpc_vs_rest", "--client", kind, "--url", url,
           "-c", str(concurrency), "--seconds", str(seconds)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} client failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_wrk_json(http: str, concurrency: int, seconds: float, work: Path) -> dict:
    from bench.wrk_load import run_wrk

    x = digit()
    body = work / "v2.json"
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist()}  # fmt: skip
    body.write_text(json.dumps({"inputs": [tensor]}))
    url = f"http://{http}/v2/models/digits/infer"
    row = run_wrk(url, body, "application/json", concurrency, int(max(1, seconds)))
    return {k: row[k] for k in ("rps", "p50_ms", "p99_ms", "errors")}


# --- the orchestrator -----------------------------------------------------------------------
def start_server(work: Path) -> tuple[subprocess.Popen, str, str]:
    from tests.servers import free_port

    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BNFOLD_PROVIDER": "cpu", "BNFOLD_LOG_LEVEL": "warning",
           "BNFOLD_WORKERS": "1", "BNFOLD_GRPC_PORT": str(grpc_port)}  # fmt: skip
    log = open(work / "server.log", "wb")  # noqa: SIM115 (closed with the process)
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
           "--models-dir", str(REPO / "models")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
    import urllib.request

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return proc, f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready: {(work / 'server.log').read_text()[-2000:]}")


def measure(
    seconds: float, rounds: int, log=print, concurrency: tuple[int, ...] = CONCURRENCY
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, http, grpc_url = start_server(work)
        try:
            runs: dict[str, dict[int, list[dict]]] = {t: {c: [] for c in concurrency}
                                                      for t in TARGETS}  # fmt: skip
            for r in range(rounds):
                for c in concurrency:
                    order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
                    for target in order:
                        if target == "wrk-json":
                            row = run_wrk_json(http, c, seconds, work)
                        else:
                            url = grpc_url if target == "grpc" else http
                            row = run_client(target, url, c, seconds)
                        runs[target][c].append(row)
                        log(f"round {r + 1} c={c} {target}: {row['rps']:.0f}/s "
                            f"p50 {row['p50_ms']:.2f} ms, {row['errors']} errors")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return summarize(runs, seconds, rounds)


def summarize(runs: dict, seconds: float, rounds: int) -> dict:
    table = {}
    for target, by_c in runs.items():
        table[target] = {}
        for c, rows in by_c.items():
            table[target][c] = {
                k: statistics.median(r[k] for r in rows if r[k] is not None)
                for k in ("rps", "p50_ms", "p99_ms")
            }
            table[target][c]["errors"] = sum(r["errors"] for r in rows)
    for c in table["grpc"]:  # the ratio asked about: gRPC over REST, same client family
        grpc_rps = table["grpc"][c]["rps"]
        for rest in ("rest-binary", "rest-json", "wrk-json"):
            table["grpc"][c][f"x_{rest}"] = grpc_rps / table[rest][c]["rps"]
    return {"seconds": seconds, "rounds": rounds, "cpus": os.cpu_count(), "table": table,
            "runs": runs}  # fmt: skip


def markdown(result: dict) -> str:
    names = {"grpc": "gRPC ModelInfer, raw (tritonclient.grpc.aio)",
             "rest-binary": "REST V2 infer, binary (tritonclient.http.aio)",
             "rest-json": "REST V2 infer, JSON (tritonclient.http.aio)",
             "wrk-json": "REST V2 infer, JSON (wrk)"}  # fmt: skip
    levels = list(result["table"]["grpc"])
    lines = [f"| digits, one image per request: requests/s (p50 ms) | "
             f"{' | '.join(f'c={c}' for c in levels)} |",
             f"|---|{'---:|' * len(levels)}"]  # fmt: skip
    for target in TARGETS:
        cells = [f"{result['table'][target][c]['rps']:,.0f} "
                 f"({result['table'][target][c]['p50_ms']:.2f})" for c in levels]  # fmt: skip
        lines.append(f"| {names[target]} | {' | '.join(cells)} |")
    ratios = [f"{result['table']['grpc'][c]['x_rest-binary']:.2f}x" for c in levels]
    lines.append(f"| gRPC / REST binary (same client family) | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_vs_rest", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 s runs, one round")
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("-c", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:  # a client process started by run_client
        print(json.dumps(asyncio.run(closed_loop(args.client, args.url, args.c, args.seconds))))
        return 0
    seconds, rounds = (2.0, 1) if args.quick else (5.0, 3)
    result = measure(seconds, rounds, log=lambda m: print(m, file=sys.stderr, flush=True))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
