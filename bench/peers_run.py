"""`python -m bench.peers_run`: bnfold beside Triton, KServe and MLServer on the digits model.

Every server runs models/digits' folded.onnx with onnxruntime on CPU and binds 127.0.0.1:
  bnfold       `python -m service`, its defaults (one worker per usable core)
  triton       Triton Inference Server from the nvidia-pytriton wheel: Triton's C++ REST and
               gRPC front ends and dynamic batcher (max batch 64, no queue delay), onnxruntime in
               its Python backend, 2 model instances (bench/peers/triton_server.py)
  kserve-1/-2  KServe's ModelServer with a `kserve.Model`, 1 and 2 REST workers
  mlserver-0/-2  MLServer with a custom runtime, 0 and 2 parallel workers
Each peer runs from its own virtualenv under bench/.peers/ (scripts/install_peers.sh); a peer
that is not installed or cannot start is reported with its reason, never dropped silently.

The load is the SAME bytes for every server: V2 JSON over REST with wrk (one thread, one call in
flight per connection), and one length-prefixed gRPC `ModelInfer` message (typed fp32
contents) with h2load (one stream per connection, `-m 1`). Before and after the measurements
every server's answer to those very bytes is checked against onnxruntime in this process.
Targets alternate (the order rotates each round) and only the one measured runs: the others are
paused (SIGSTOP to their process group, see bench/servers.py). bnfold's figures become ratios
to each peer per round, then the median over rounds. Server CPU is summed over the server's
whole process group (Triton's server, stubs and Python proxy included).
Results: bench/results/peers.json and peers.md, the command and the machine at the top.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import servers
from bench.wrk_load import run_wrk

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "digits"
PEERS_DIR = REPO / "bench" / ".peers"
RESULTS = REPO / "bench" / "results"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
PEERS = ("triton", "kserve-1", "kserve-2", "mlserver-0", "mlserver-2")
PROTOCOLS = ("rest", "grpc")
START_TIMEOUT_S = 240.0  # a loaded 2-core machine starting six servers at once
LABELS = {
    "bnfold": "bnfold (defaults)",
    "triton": "Triton (PyTriton, 2 instances, dynamic batching)",
    "kserve-1": "KServe (1 worker)",
    "kserve-2": "KServe (2 workers)",
    "mlserver-0": "MLServer (0 parallel workers)",
    "mlserver-2": "MLServer (2 parallel workers)",
}
VERSIONS = {  # the packages whose versions each peer's virtualenv reports
    "triton": ("nvidia-pytriton", "onnxruntime"),
    "kserve": ("kserve", "onnxruntime", "fastapi", "pydantic", "uvicorn", "uvloop", "grpcio"),
    "mlserver": ("mlserver", "onnxruntime", "fastapi", "pydantic", "uvicorn", "uvloop", "grpcio"),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the request bytes, the same for every server -----------------------------------------
@dataclass
class Payloads:
    rest: Path  # V2 JSON body
    grpc: Path  # 5-byte gRPC prefix + serialized ModelInferRequest
    expected: np.ndarray  # onnxruntime's logits for the input, here in this process

    def describe(self) -> dict:
        def info(path: Path) -> str:
            data = path.read_bytes()
            return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"

        return {"rest": f"V2 JSON: {info(self.rest)}", "grpc": f"ModelInfer: {info(self.grpc)}"}


def write_payloads(folder: Path) -> Payloads:
    import onnxruntime as ort

    from bench.grpc_vs_rest import digit
    from service.grpc import inference_pb2 as pb

    manifest = json.loads((MODEL_DIR / "bundle.json").read_text())
    x = digit()  # (1, 1, 8, 8) float32: examples/digit-3.png through the bundle's preprocessing
    name, input_name = manifest["name"], manifest["input"]["name"]
    rest = folder / "v2.json"
    tensor = {"name": input_name, "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist()}  # fmt: skip
    rest.write_text(json.dumps({"inputs": [tensor]}))
    request = pb.ModelInferRequest(model_name=name)
    grpc_input = request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    grpc_input.contents.fp32_contents.extend(x.ravel().tolist())
    message = request.SerializeToString()
    grpc = folder / "modelinfer.bin"
    grpc.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    path = MODEL_DIR / manifest["files"]["folded"]["path"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {input_name: x})[0]
    return Payloads(rest, grpc, expected)


# --- the servers ----------------------------------------------------------------------------
@dataclass
class Running:
    name: str
    server: servers.Server
    grpc_port: int
    metadata: dict = field(default_factory=dict)  # GET /v2: the server's name and version
    grpc_frame: int = 0  # bytes of one framed ModelInfer response (h2load's data check)


def peer_python(name: str) -> Path:
    return PEERS_DIR / name.split("-")[0] / "bin" / "python"


def why_unavailable(name: str) -> str | None:
    """None when the peer's virtualenv is installed; otherwise the reason, from the installer."""
    family = name.split("-")[0]
    skipped = PEERS_DIR / f"{family}.skipped"
    if skipped.exists():
        return f"not installed: {skipped.read_text().strip()}"
    if not (PEERS_DIR / family / ".installed").exists():
        install_log = PEERS_DIR / f"{family}.install.log"
        tail = install_log.read_text().strip().splitlines()[-1:] if install_log.exists() else []
        return "not installed (scripts/install_peers.sh" + (
            f" failed: {tail[0][:200]})" if tail else " has not run)"
        )
    return None


def peer_env(name: str) -> dict:
    """A clean environment for a peer's interpreter: nothing of the project's venv on its path."""
    env = {"PYTHONPATH": "", "VIRTUAL_ENV": str(PEERS_DIR / name.split("-")[0])}
    if name == "triton":
        # Triton's Python-backend stub must load the libpython of the interpreter that runs
        # the proxy; the system may hold another build of the same version (Debian's).
        libdir = subprocess.run(
            [str(peer_python(name)), "-c",
             "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
        )
    return env


def start(name: str, logs: Path, bnfold_env: dict) -> Running:
    http, grpc_port = servers.free_port(), servers.free_port()
    ready = f"/v2/models/{MODEL_DIR.name}/ready"  # /v2/health/ready can precede the model
    if name == "bnfold":
        settings = {**bnfold_env, "BNFOLD_GRPC_PORT": str(grpc_port)}
        server = servers.bnfold_server(MODEL_DIR.parent, logs, settings)
        server.ready_path = ready
        return Running(name, server, grpc_port)
    python, model = str(peer_python(name)), str(MODEL_DIR)
    env = peer_env(name)
    if name == "triton":
        cmd = [python, "bench/peers/triton_server.py", "--model-dir", model,
               "--http-port", str(http), "--grpc-port", str(grpc_port),
               "--instances", "2"]  # fmt: skip
    elif name.startswith("kserve"):
        cmd = [python, "bench/peers/kserve_server.py"]
        env |= {"BENCH_MODEL_DIR": model, "BENCH_HTTP_PORT": str(http),
                "BENCH_GRPC_PORT": str(grpc_port), "BENCH_WORKERS": name.split("-")[1]}  # fmt: skip
    else:
        cmd = [python, "bench/peers/mlserver_server.py", "--model-dir", model,
               "--work", str(logs / f"{name}-settings"), "--http-port", str(http),
               "--grpc-port", str(grpc_port), "--metrics-port", str(servers.free_port()),
               "--parallel-workers", name.split("-")[1]]  # fmt: skip
    server = servers._start(name, cmd, env, http, ready, logs)
    return Running(name, server, grpc_port)


def start_all(names: list[str], logs: Path, bnfold_env: dict) -> tuple[dict, dict]:
    """Start every server at once, wait for each; (running, {name: reason it is not})."""
    running, unavailable = {}, {}
    for name in names:
        reason = None if name == "bnfold" else why_unavailable(name)
        if reason:
            unavailable[name] = reason
            continue
        try:
            running[name] = start(name, logs, bnfold_env)
        except Exception as exc:  # noqa: BLE001 (reported in the results)
            unavailable[name] = f"did not start: {exc}"
    for name, r in list(running.items()):
        try:
            took = servers.wait_ready(r.server, START_TIMEOUT_S)
            log(f"{name} ready in {took:.1f} s")
        except RuntimeError as exc:
            unavailable[name] = f"not ready: {str(exc)[-600:]}"
            servers.stop(running.pop(name).server)
    return running, unavailable


def stop_all(running: dict) -> None:
    with ThreadPoolExecutor(max(1, len(running))) as pool:  # Triton takes 5-8 s to stop
        list(pool.map(lambda r: servers.stop(r.server, grace_s=15), running.values()))


# --- checking the answers -------------------------------------------------------------------
def check_rest(r: Running, payloads: Payloads) -> None:
    request = urllib.request.Request(
        r.server.url(f"/v2/models/{MODEL_DIR.name}/infer"),
        data=payloads.rest.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = json.loads(resp.read())
    got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
    _compare(r.name, "REST", got, payloads.expected)


def check_grpc(r: Running, payloads: Payloads) -> int:
    """The exact h2load body as one unary call; the framed response's size."""
    import grpc

    from service.grpc import inference_pb2 as pb

    body = payloads.grpc.read_bytes()[5:]
    with grpc.insecure_channel(f"{servers.HOST}:{r.grpc_port}") as channel:
        call = channel.unary_unary(GRPC_PATH)  # bytes in, bytes out
        raw = call(body, timeout=30)
    answer = pb.ModelInferResponse.FromString(raw)
    if answer.raw_output_contents:
        got = np.frombuffer(answer.raw_output_contents[0], dtype="<f4")
    else:
        got = np.asarray(answer.outputs[0].contents.fp32_contents, dtype=np.float32)
    _compare(r.name, "gRPC", got, payloads.expected)
    return len(raw) + 5


def _compare(name: str, protocol: str, got: np.ndarray, expected: np.ndarray) -> None:
    if got.size != expected.size or not np.allclose(got, expected.ravel(), atol=1e-4):
        raise RuntimeError(f"{name} {protocol}: logits {got[:10]} != {expected.ravel()}")


def check(r: Running, payloads: Payloads) -> None:
    servers.resume(r.server)
    try:
        check_rest(r, payloads)
        r.grpc_frame = check_grpc(r, payloads)
    finally:
        servers.pause(r.server)


def metadata(r: Running) -> dict:
    with urllib.request.urlopen(r.server.url("/v2"), timeout=10) as resp:
        meta = json.loads(resp.read())
    return {k: meta.get(k) for k in ("name", "version")}


def peer_versions(family: str) -> str:
    script = ("import importlib.metadata as m, sys; print(', '.join(f'{p} {m.version(p)}' "
              "for p in sys.argv[1:]))")  # fmt: skip
    done = subprocess.run([str(PEERS_DIR / family / "bin" / "python"), "-c", script,
                           *VERSIONS[family]], capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() or done.stderr.strip()[-200:]


# --- the load -------------------------------------------------------------------------------
def run_h2load(r: Running, body: Path, connections: int, seconds: int, work: Path) -> dict:
    """h2load: `connections` connections, one ModelInfer in flight on each, for `seconds`."""
    log_file = work / "h2load.log"
    log_file.unlink(missing_ok=True)  # h2load appends to its log file
    cmd = ["h2load", "-t1", f"-c{connections}", "-m1", f"-D{seconds}",
           "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
           f"--log-file={log_file}", f"http://{servers.HOST}:{r.grpc_port}{GRPC_PATH}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    return parse_h2load(done.stdout, done.returncode, log_file.read_text(), r.grpc_frame)


def parse_h2load(stdout: str, returncode: int, per_request: str, frame: int) -> dict:
    """req/s of successful calls, p50/p99 from h2load's per-request log, errors.

    h2load sees HTTP/2 statuses only; a gRPC error is a 200 whose trailers carry the status and
    no DATA. So calls that brought back less than one response message's worth of DATA count
    as errors (a lower bound: DATA of calls still open at the end adds to the total)."""
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", stdout)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout", stdout)  # fmt: skip
    data = re.search(r"\((\d+)\) data", stdout)
    if returncode != 0 or not (finished and counts and data):
        raise RuntimeError(f"h2load failed (exit {returncode}): {stdout[-1500:]}")
    done, succeeded, failed, errored, timeout = (int(counts.group(i)) for i in (3, 4, 5, 6, 7))
    short = max(0, succeeded - int(data.group(1)) // frame) if frame else 0
    ok = succeeded - short
    lat = sorted(int(line.split("\t")[2]) / 1e3 for line in per_request.splitlines()
                 if line.count("\t") == 2)  # fmt: skip
    return {
        "requests": done,
        "rps": float(finished.group(1)) * ok / done if done else 0.0,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "errors": failed + errored + timeout + short,
    }


def _pct(values: list[float], p: float) -> float | None:
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else None


def measure_point(
    r: Running, protocol: str, payloads: Payloads, c: int, seconds: int, work: Path
) -> dict:
    """One load run on `r` alone: the other servers stay paused."""
    servers.resume(r.server)
    try:
        cpu = servers.group_cpu_seconds(r.server.proc.pid)
        if protocol == "rest":
            url = r.server.url(f"/v2/models/{MODEL_DIR.name}/infer")
            row = run_wrk(url, payloads.rest, "application/json", c, seconds)
        else:
            row = run_h2load(r, payloads.grpc, c, seconds, work)
        cpu = servers.group_cpu_seconds(r.server.proc.pid) - cpu
    finally:
        servers.settle(r.server)
        servers.pause(r.server)
    ok_calls = row["rps"] * seconds
    row = {k: row[k] for k in ("rps", "p50_ms", "p99_ms", "errors")}
    return {**row, "cpu_s": cpu, "calls_per_cpu_s": ok_calls / cpu if cpu > 0 else None}


@dataclass(frozen=True)
class Settings:
    seconds: int = 3
    rounds: int = 2
    concurrency: tuple[int, ...] = (1, 16, 64)
    warmup_seconds: int = 1


def missing_tools() -> list[str]:
    tools = (("wrk", "wrk"), ("h2load", "nghttp2-client"))
    return [f"{tool} (Debian package {pkg})" for tool, pkg in tools if shutil.which(tool) is None]


def measure(
    settings: Settings, peers: tuple[str, ...] = PEERS, bnfold_env: dict | None = None
) -> dict:
    if missing_tools():
        raise RuntimeError(f"missing {', '.join(missing_tools())}: bash scripts/install_peers.sh")
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-peers-") as tmp:
        work = Path(tmp)
        payloads = write_payloads(work)
        running, unavailable = start_all(["bnfold", *peers], work, bnfold_env or {})
        if "bnfold" not in running:
            stop_all(running)
            raise RuntimeError(f"bnfold did not start: {unavailable.get('bnfold')}")
        try:
            for name, r in list(running.items()):
                try:
                    r.metadata = metadata(r)
                    check(r, payloads)
                    for protocol in PROTOCOLS:  # first calls: sessions, pools, connections
                        measure_point(r, protocol, payloads, 16, settings.warmup_seconds, work)
                except Exception as exc:  # noqa: BLE001 (reported in the results)
                    unavailable[name] = f"failed its check: {str(exc)[-600:]}"
                    servers.stop(running.pop(name).server)
            if "bnfold" not in running:
                raise RuntimeError(f"bnfold failed its check: {unavailable['bnfold']}")
            targets = list(running)
            runs = {n: {p: {c: [] for c in settings.concurrency} for p in PROTOCOLS}
                    for n in targets}  # fmt: skip
            for rnd in range(settings.rounds):
                for protocol in PROTOCOLS:
                    for i, c in enumerate(settings.concurrency):
                        shift = (rnd + i) % len(targets)
                        for name in targets[shift:] + targets[:shift]:
                            row = measure_point(
                                running[name], protocol, payloads, c, settings.seconds, work
                            )
                            runs[name][protocol][c].append(row)
                            log(f"round {rnd + 1} {protocol} c={c} {name}: {row['rps']:.0f}/s "
                                f"p99 {_fmt(row['p99_ms'], '.1f')} ms, "
                                f"{row['errors']} errors")  # fmt: skip
            checked_after = {}
            for name, r in running.items():  # the answers still right after the load
                try:
                    check(r, payloads)
                    checked_after[name] = "ok"
                except Exception as exc:  # noqa: BLE001
                    checked_after[name] = f"FAILED: {str(exc)[-300:]}"
            meta = {n: r.metadata for n, r in running.items()}
            described = payloads.describe()
        finally:
            stop_all(running)
    return {
        "settings": {**settings.__dict__, "concurrency": list(settings.concurrency)},
        "targets": targets,
        "labels": {n: LABELS[n] for n in targets},
        "unavailable": unavailable,
        "server_metadata": meta,
        "checked_after": checked_after,
        "payloads": described,
        "peer_versions": {
            f: peer_versions(f) for f in VERSIONS if any(t.startswith(f) for t in targets)
        },  # fmt: skip
        "load_average": f"{load_start} at start, "
        + " ".join(f"{v:.2f}" for v in os.getloadavg())
        + " at end",
        "loaded": _loaded(load_start),
        "elapsed_s": time.perf_counter() - started,
        "runs": runs,
        "table": summarize(runs),
        "ratios": ratios(runs),
    }


def _loaded(load_start: str) -> str:
    """A warning when other work competed for the cores during the run, else ''."""
    cores = len(os.sched_getaffinity(0))
    peak = max(float(load_start.split()[0]), os.getloadavg()[0])
    if peak <= cores * 0.75:
        return ""
    return (
        f"The machine was loaded by other work (1-minute load average up to {peak:.1f} on "
        f"{cores} cores): absolute figures are low and noisy, and a server with more runnable "
        "threads or processes takes a larger share of contended cores, which favours the "
        "multi-process servers over the single-process ones (KServe with 1 worker, MLServer "
        "with 0 parallel workers). Calls per server CPU-second depend least on the contention."
    )


def summarize(runs: dict) -> dict:
    """Median over rounds per server, protocol and concurrency."""
    table = {}
    for name, by_protocol in runs.items():
        for protocol, by_c in by_protocol.items():
            for c, rows in by_c.items():
                cell = {k: _median([r[k] for r in rows])
                        for k in ("rps", "p50_ms", "p99_ms", "calls_per_cpu_s")}  # fmt: skip
                cell["errors"] = sum(r["errors"] for r in rows)
                table.setdefault(name, {}).setdefault(protocol, {})[c] = cell
    return table


def ratios(runs: dict) -> dict:
    """bnfold / peer, per round (neighbours in time), then the median over rounds: req/s (> 1:
    bnfold serves more), p99 (< 1: bnfold's tail is shorter), calls per server CPU-second."""
    out = {}
    for peer in (n for n in runs if n != "bnfold"):
        for protocol, by_c in runs["bnfold"].items():
            for c, ours in by_c.items():
                theirs = runs[peer][protocol][c]
                cell = {}
                for key in ("rps", "p99_ms", "calls_per_cpu_s"):
                    pairs = [(a[key], b[key]) for a, b in zip(ours, theirs, strict=True)
                             if a[key] is not None and b[key]]  # fmt: skip
                    cell[key] = _median([a / b for a, b in pairs])
                out.setdefault(peer, {}).setdefault(protocol, {})[c] = cell
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- the report -----------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def ratio_table(result: dict) -> str:
    """bnfold / peer req/s (p99 ratio in brackets), one row per peer and protocol."""
    levels = result["settings"]["concurrency"]
    lines = ["| bnfold / peer: req/s (p99) | protocol | "
             + " | ".join(f"c={c}" for c in levels) + " |",
             "|---|---|" + "---:|" * len(levels)]  # fmt: skip
    for peer, by_protocol in result["ratios"].items():
        for protocol, by_c in by_protocol.items():
            cells = [f"{_fmt(by_c[_key(by_c, c)]['rps'])} ({_fmt(by_c[_key(by_c, c)]['p99_ms'])})"
                     for c in levels]  # fmt: skip
            name = "REST, V2 JSON" if protocol == "rest" else "gRPC ModelInfer"
            lines.append(f"| {result['labels'][peer]} | {name} | {' | '.join(cells)} |")
    for peer, reason in result["unavailable"].items():
        lines.append(
            f"| {LABELS.get(peer, peer)} | not measured | {reason} |" + " |" * (len(levels) - 1)
        )
    return "\n".join(lines) + "\n"


def _key(by_c: dict, c: int):
    return c if c in by_c else str(c)  # int keys in memory, str keys once read from JSON


def absolute_table(result: dict) -> str:
    levels = result["settings"]["concurrency"]
    lines = ["| server | protocol | c | req/s | p50 ms | p99 ms | errors "
             "| calls per server CPU-s |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in result["targets"]:
        for protocol in PROTOCOLS:
            by_c = result["table"][name][protocol]
            for c in levels:
                cell = by_c[_key(by_c, c)]
                lines.append(
                    f"| {result['labels'][name]} | {protocol} | {c} | {_fmt(cell['rps'], ',.0f')}"
                    f" | {_fmt(cell['p50_ms'])} | {_fmt(cell['p99_ms'])} | {cell['errors']} "
                    f"| {_fmt(cell['calls_per_cpu_s'], ',.0f')} |"
                )
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    rows = [("command", f"`{env['command']}`"), ("date", env["date"]),
            ("machine", env["machine"]), ("load average (1, 5, 15 min)", result["load_average"]),
            ("bnfold", env["bnfold"]),
            *((f"{f} virtualenv", v) for f, v in result["peer_versions"].items()),
            *((f"{n} reports", f"{m.get('name')} {m.get('version')}")
              for n, m in result["server_metadata"].items()),
            ("request bytes (every server)", "; ".join(result["payloads"].values())),
            ("load", f"wrk -t1 (REST), h2load -t1 -m1 (gRPC); {s['rounds']} round(s) x "
                     f"{s['seconds']} s per server, protocol and concurrency, order rotating"),
            ("answers checked after the load", ", ".join(
                f"{n}: {v}" for n, v in result["checked_after"].items())),
            ("elapsed", f"{result['elapsed_s']:.0f} s")]  # fmt: skip
    head = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    if result.get("loaded"):
        head += f"\n**{result['loaded']}**\n"
    return (
        "# bnfold beside Triton, KServe and MLServer (digits, CPU)\n\n"
        + head
        + "\nbnfold / peer, median over rounds of same-round ratios: req/s (> 1: bnfold serves "
        "more), in brackets p99 latency (< 1: bnfold's tail is shorter).\n\n"
        + ratio_table(result)
        + "\nMedians over rounds. Calls per server CPU-second: successful calls over the CPU "
        "time of the server's whole process group during the run.\n\n" + absolute_table(result)
    )


def environment(command: str, bnfold_env: dict) -> dict:
    from bench.provenance import bnfold_settings, cpu_count, cpu_model, git_commit, mem_gib

    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {cpu_count()} cores, {mem_gib():.0f} GiB, "
        f"Python {platform.python_version()}, {platform.libc_ver()[0]} {platform.libc_ver()[1]}",
        "bnfold": f"commit {git_commit()}; settings: {bnfold_settings(bnfold_env)}",
    }


def write(result: dict, out: Path) -> list[Path]:
    from bench.provenance import finite

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "peers.json", out / "peers.md"]
    paths[0].write_text(json.dumps(finite(result), indent=1, default=str) + "\n")
    paths[1].write_text(markdown(result))
    return paths


def run(settings: Settings, out: Path, command: str, peers: tuple[str, ...] = PEERS,
        bnfold_env: dict | None = None) -> dict:  # fmt: skip
    result = measure(settings, peers, bnfold_env)
    result["environment"] = environment(command, bnfold_env or {})
    for path in write(result, out):
        log(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.peers_run", description=__doc__)
    parser.add_argument("--seconds", type=int, default=Settings.seconds)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    peers = tuple(p for p in args.peers.split(",") if p)
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {sorted(unknown)}; choose from {','.join(PEERS)}")
    if missing_tools():
        log(f"peers_run: missing {', '.join(missing_tools())}: bash scripts/install_peers.sh")
        return 2
    levels = tuple(int(c) for c in args.concurrency.split(","))
    command = " ".join(["python -m bench.peers_run", *argv])
    result = run(Settings(args.seconds, args.rounds, levels), args.out, command, peers)
    print(ratio_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
