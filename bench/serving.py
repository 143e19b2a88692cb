"""Serving over HTTP: every target gets the same PNG, in turn (A B C A B C), at each concurrency.

Targets per model: bnfold's /v1 predict (multipart and raw body) and V2 /infer (the same PNG,
preprocessed, as a JSON tensor); the bare FastAPI ceiling; the minimal handler; LitServe; and
in-process onnxruntime at its best configuration (the compute limit). While one target runs,
every other server is paused (see servers.py). bnfold's figures become
ratios to each peer measured in the same round, then the median over rounds: these machines are
shared and noisy, and a ratio of neighbours survives drift that absolute numbers do not.
"""

from __future__ import annotations

import json
import statistics
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import servers
from bench.model_exec import InprocessLimit
from bench.models import BenchModel
from bench.plan import Plan
from bench.wrk_load import run_wrk
from bnfold.bundle import load_bundle
from bnfold.preprocess import preprocess_bytes

BOUNDARY = "bnfold-bench-boundary"
PEERS = ("bare", "minimal", "minimal_workers", "litserve", "limit")
WARMUP_CONNECTIONS = 16
MINIMAL_WORKERS = "minimal handler, same workers"  # uvicorn --workers N, N = bnfold's workers


@dataclass
class Target:
    """One thing to load: an HTTP endpoint with its body, or the in-process limit."""

    name: str
    role: str  # "bnfold" or one of PEERS
    url: str = ""
    body: Path | None = None
    content_type: str = ""
    inprocess: InprocessLimit | None = None
    server: servers.Server | None = None

    def measure(self, connections: int, seconds: int) -> dict:
        """One run with this target's server resumed, then settled and paused again."""
        if self.inprocess is not None:
            return self.inprocess.measure(seconds)
        assert self.body is not None and self.server is not None
        servers.resume(self.server)
        try:
            result = run_wrk(self.url, self.body, self.content_type, connections, seconds)
        finally:
            settled = servers.settle(self.server)  # work left over from abandoned requests
            servers.pause(self.server)
        return {**result, "settle_s": settled}


def write_payloads(model: BenchModel, folder: Path) -> dict[str, tuple[Path, str]]:
    """The one PNG as a raw body, as multipart field 'files', and as a V2 JSON tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{model.name}.png"
    png.write_bytes(model.png)
    multipart = folder / f"{model.name}.multipart"
    multipart.write_bytes(multipart_body(model.png, "image.png"))
    tensor = preprocess_bytes(model.png, model.spec)[None]  # (1, C, H, W)
    v2 = folder / f"{model.name}.v2.json"
    inputs = [
        {
            "name": "input",
            "shape": list(tensor.shape),
            "datatype": "FP32",
            "data": tensor.ravel().tolist(),
        }
    ]
    v2.write_text(json.dumps({"inputs": inputs}))
    v2_int8 = folder / f"{model.name}.v2-int8.json"
    v2_int8.write_text(json.dumps({"inputs": inputs, "parameters": {"variant": "int8"}}))
    return {
        "raw": (png, "image/png"),
        "multipart": (multipart, f"multipart/form-data; boundary={BOUNDARY}"),
        "v2": (v2, "application/json"),
        "v2_int8": (v2_int8, "application/json"),
    }


def multipart_body(data: bytes, filename: str) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def start_servers(model: BenchModel, plan: Plan, logs: Path) -> dict[str, servers.Server]:
    """All of this model's servers, started together, each waited for until ready."""
    running = {
        "bnfold": servers.bnfold_server(model.serve_dir, logs, plan.bnfold_env),
        "bare": servers.bare_server(logs),
        "minimal": servers.minimal_server(model.bundle_dir, logs),
        "litserve": servers.litserve_server(
            model.bundle_dir, plan.litserve_batch, plan.litserve_timeout_s, logs
        ),
    }
    workers = bnfold_workers(plan)
    if workers > 1:  # the same handler with as many processes as bnfold: uvicorn --workers N
        running["minimal_workers"] = servers.minimal_server(model.bundle_dir, logs, workers)
    try:
        for server in running.values():
            servers.wait_ready(server)
    except Exception:
        stop_servers(running)
        raise
    return running


def bnfold_workers(plan: Plan) -> int:
    """The worker processes bnfold runs with in this plan (its default: the usable cores)."""
    from service.cpus import resolve_workers, usable_cpus

    return resolve_workers(int(plan.bnfold_env.get("BNFOLD_WORKERS", 0)), usable_cpus())


def stop_servers(running: dict[str, servers.Server]) -> None:
    for server in running.values():
        servers.stop(server)


def build_targets(
    model: BenchModel, running: dict[str, servers.Server], payloads: dict, limit: InprocessLimit
) -> list[Target]:
    def http(name: str, role: str, path: str, payload: str) -> Target:
        server = running[role]
        return Target(name, role, server.url(path), *payloads[payload], server=server)

    predict, infer = f"/v1/models/{model.name}/predict", f"/v2/models/{model.name}/infer"
    int8 = "int8" in load_bundle(model.bundle_dir).files  # served as a third variant
    return [
        http("bnfold multipart", "bnfold", predict, "multipart"),
        http("bnfold raw", "bnfold", predict, "raw"),
        http("bnfold V2 infer", "bnfold", infer, "v2"),
        *([http("bnfold V2 infer int8", "bnfold", infer, "v2_int8")] if int8 else []),
        http("bare FastAPI", "bare", "/predict", "raw"),
        http("minimal handler", "minimal", "/predict", "multipart"),
        *(
            [http(MINIMAL_WORKERS, "minimal_workers", "/predict", "multipart")]
            if "minimal_workers" in running
            else []
        ),
        http("LitServe", "litserve", "/predict", "multipart"),
        Target("in-process ORT", "limit", inprocess=limit),
    ]


def check_once(target: Target) -> None:
    """One request before any load: a target that answers an error is a harness bug."""
    if target.inprocess is not None:
        return
    assert target.body is not None
    req = urllib.request.Request(
        target.url, data=target.body.read_bytes(), headers={"Content-Type": target.content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise RuntimeError(f"{target.name} answered {exc.code}: {detail}") from None


def measure_model(
    model: BenchModel, plan: Plan, limit: dict, work: Path, log: Callable[[str], None] = print
) -> dict:
    """Rows (one per target, concurrency and round) for one model, plus server start-up times."""
    payloads = write_payloads(model, work / "payloads")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    running = start_servers(model, plan, logs)
    try:
        targets = build_targets(model, running, payloads, InprocessLimit(model, limit))
        for target in targets:
            check_once(target)
        for server in running.values():  # from here on, only the measured target runs
            servers.settle(server)
            servers.pause(server)
        for target in targets if plan.warmup_seconds else []:
            target.measure(WARMUP_CONNECTIONS, plan.warmup_seconds)
        rows = list(_alternate(model, targets, plan, log))
    finally:
        stop_servers(running)
    return {"rows": rows, "payload_bytes": {k: p.stat().st_size for k, (p, _) in payloads.items()}}


def _alternate(model: BenchModel, targets: list[Target], plan: Plan, log: Callable[[str], None]):
    for connections in plan.concurrency:
        for rnd in range(plan.rounds):
            for target in targets:
                result = target.measure(connections, plan.wrk_seconds)
                log(
                    f"  {model.name} c={connections} round {rnd + 1}: {target.name}: "
                    f"{result['rps']:,.0f}/s p50 {result['p50_ms']:.2f} ms "
                    f"p99 {result['p99_ms']:.2f} ms errors {result['errors']}"
                )
                yield {
                    "model": model.name,
                    "target": target.name,
                    "role": target.role,
                    "concurrency": connections,
                    "round": rnd,
                    **result,
                }


# ---------------------------------------------------------------- aggregation


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, target, concurrency): medians over rounds; errors and requests summed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["target"], r["role"], r["concurrency"]), []).append(r)
    out = []
    for (model, target, role, conc), rs in groups.items():
        out.append(
            {
                "model": model,
                "target": target,
                "role": role,
                "concurrency": conc,
                "rounds": len(rs),
                "rps": statistics.median(r["rps"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "requests": sum(r["requests"] for r in rs),
            }
        )
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Each bnfold target against each peer, round by round, then the median over rounds."""
    by_key = {(r["model"], r["target"], r["concurrency"], r["round"]): r for r in rows}
    bnfold = dict.fromkeys(
        (r["model"], r["target"], r["concurrency"]) for r in rows if r["role"] == "bnfold"
    )
    peers = dict.fromkeys((r["model"], r["role"], r["target"]) for r in rows if r["role"] in PEERS)
    out = []
    for model, target, conc in bnfold:
        mine = [
            r for r in rows if (r["model"], r["target"], r["concurrency"]) == (model, target, conc)
        ]
        for peer_model, role, peer in peers:
            if peer_model != model:
                continue
            pairs = [
                (r, by_key[(model, peer, conc, r["round"])])
                for r in mine
                if (model, peer, conc, r["round"]) in by_key
            ]
            out.append(_ratio_row(model, target, conc, role, peer, pairs))
    return out


def _ratio_row(model, target, conc, role, peer, pairs) -> dict:
    def med(f) -> float:
        values = [f(a, b) for a, b in pairs if f(a, b) is not None]
        return statistics.median(values) if values else float("nan")

    def safe_div(x: float, y: float) -> float | None:
        return x / y if y > 0 else None

    return {
        "model": model,
        "target": target,
        "concurrency": conc,
        "peer_role": role,
        "peer": peer,
        "rps_ratio": med(lambda a, b: safe_div(a["rps"], b["rps"])),
        "p50_ratio": med(lambda a, b: safe_div(a["p50_ms"], b["p50_ms"])),
        "p99_ratio": med(lambda a, b: safe_div(a["p99_ms"], b["p99_ms"])),
        "p50_diff_ms": med(lambda a, b: a["p50_ms"] - b["p50_ms"]),
    }
