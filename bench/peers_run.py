"""`python -m bench.peers_run`: bnfold beside Triton, KServe and MLServer, one bundle at a time.

Every server runs the bundle's folded.onnx with onnxruntime on CPU and binds 127.0.0.1:
  bnfold       `python -m service`, its defaults (one worker per usable core)
  triton       Triton Inference Server from the nvidia-pytriton wheel: Triton's C++ REST and
               gRPC front ends and dynamic batcher (max batch 64, no queue delay), onnxruntime in
               its Python backend, 2 model instances (bench/peers/triton_server.py)
  kserve-1/-2  KServe's ModelServer with a `kserve.Model`, 1 and 2 REST workers
  mlserver-0/-2  MLServer with a custom runtime, 0 and 2 parallel workers
Each peer runs from its own virtualenv under bench/.peers/ (scripts/install_peers.sh); a peer
that is not installed or cannot start is reported with its reason, never dropped silently.

The bundles: models/digits by default (`--model DIR`, more than once for several); `--model
heavy` is `make bench`'s heavy bundle (bench/models.py `prepare_heavy`: ResNet-18-like, random
weights, 3x128x128), built in a temporary folder. `bench.run` measures digits and heavy.
The input: for digits examples/digit-3.png through its preprocessing; for any other bundle
seeded random 8-bit pixels through the bundle's scale and normalization (one image).

The load is the SAME bytes for every server, three protocols:
  rest         V2 JSON over REST with wrk (one thread, one call in flight per connection)
  rest-binary  the V2 binary tensor extension (what `tritonclient.http` sends by default): a
               JSON header asking for the output as binary data, then the raw little-endian
               float32 input; Content-Type application/octet-stream and the header
               Inference-Header-Content-Length, with wrk
  grpc         one length-prefixed gRPC `ModelInfer` message (typed fp32 contents) with h2load
               (one stream per connection, `-m 1`)
Before and after the measurements every server's answer to those very bytes is checked against
onnxruntime in this process. A server that does not take a protocol (it answers an error
status, or JSON without binary data to the binary request) is reported as unavailable for that
protocol with its answer's status and start, and measured on the others.
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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import servers
from bench.wrk_load import run_wrk

REPO = Path(__file__).resolve().parent.parent
DIGITS_DIR = REPO / "models" / "digits"
HEAVY = "heavy"  # --model's word for make bench's heavy bundle, built here
PEERS_DIR = REPO / "bench" / ".peers"
RESULTS = REPO / "bench" / "results"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
PEERS = ("triton", "kserve-1", "kserve-2", "mlserver-0", "mlserver-2")
PROTOCOLS = ("rest", "rest-binary", "grpc")
PROTOCOL_NAMES = {
    "rest": "REST, V2 JSON",
    "rest-binary": "REST, V2 binary tensors",
    "grpc": "gRPC ModelInfer",
}
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension's JSON header size
INPUT_SEED = 0  # the random pixels of a bundle other than digits
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


# --- the bundle and the request bytes, the same for every server ----------------------------
class Unsupported(Exception):
    """The server does not take a protocol: the message is its answer's status and start."""


@dataclass(frozen=True)
class Bundle:
    """One bundle folder, as its bundle.json names and shapes the served model."""

    path: Path
    name: str
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]  # one image: the manifest's input shape with a batch of 1
    preprocess: dict
    folded: Path

    @classmethod
    def read(cls, path: Path) -> Bundle:
        manifest = json.loads((path / "bundle.json").read_text())
        shape = (1, *manifest["input"]["shape"][1:])
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"{path}: input shape {manifest['input']['shape']} has free sizes")
        return cls(
            path=path,
            name=manifest["name"],
            input_name=manifest["input"]["name"],
            output_name=manifest["output"]["name"],
            input_shape=shape,
            preprocess=manifest["input"].get("preprocess") or {},
            folded=path / manifest["files"]["folded"]["path"],
        )

    def describe(self) -> str:
        return f"{self.name} ({'x'.join(map(str, self.input_shape[1:]))} input)"


def model_input(bundle: Bundle) -> np.ndarray:
    """The one image every request carries: digits' held-out digit, else `synthetic_input`."""
    if bundle.path.resolve() == DIGITS_DIR.resolve():
        from bench.grpc_vs_rest import digit

        return digit()  # (1, 1, 8, 8): examples/digit-3.png through the bundle's preprocessing
    return synthetic_input(bundle)


def synthetic_input(bundle: Bundle, seed: int = INPUT_SEED) -> np.ndarray:
    """Seeded random 8-bit pixels through the bundle's scale and per-channel normalization, in
    the bundle's layout: values in the range its preprocessing gives real images."""
    spec = bundle.preprocess
    pixels = np.random.default_rng(seed).integers(0, 256, size=bundle.input_shape)
    stat_shape = [1] * len(bundle.input_shape)
    stat_shape[-1 if spec.get("layout") == "NHWC" else min(1, len(stat_shape) - 1)] = -1
    mean = np.asarray(spec.get("mean", [0.0]), np.float32).reshape(stat_shape)
    std = np.asarray(spec.get("std", [1.0]), np.float32).reshape(stat_shape)
    scale = np.float32(spec.get("scale", 1.0 / 255.0))
    return ((pixels.astype(np.float32) * scale - mean) / std).astype(np.float32)


def v2_json(bundle: Bundle, x: np.ndarray) -> bytes:
    """The V2 JSON infer request: the tensor's values as a JSON list."""
    tensor = {"name": bundle.input_name, "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist()}  # fmt: skip
    return json.dumps({"inputs": [tensor]}).encode()


def v2_binary(bundle: Bundle, x: np.ndarray) -> tuple[bytes, int]:
    """The V2 binary tensor request (tritonclient.http's default): the JSON header, which asks
    for the output as binary data too, then the raw little-endian float32 input; the body and
    the header's length (Inference-Header-Content-Length)."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": bundle.input_name, "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": bundle.output_name, "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return header + raw, len(header)


def model_infer(bundle: Bundle, x: np.ndarray) -> bytes:
    """One gRPC message on the wire: 5-byte prefix + ModelInferRequest (typed fp32 contents)."""
    from service.grpc import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=bundle.name)
    grpc_input = request.inputs.add(name=bundle.input_name, datatype="FP32", shape=list(x.shape))
    grpc_input.contents.fp32_contents.extend(x.ravel().tolist())
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def parse_binary_response(body: bytes, header_length: str | None, output: str) -> np.ndarray:
    """The float32 values of `output` in a binary-extension answer: a JSON header of
    `header_length` bytes, then each binary output's raw bytes in the header's order.
    Unsupported when the answer carries no binary data for `output`."""
    if header_length is None:
        raise Unsupported(f"HTTP 200 without {HEADER_LENGTH} (no binary data): {_start(body)}")
    size = int(header_length)
    header = json.loads(body[:size])
    offset = size
    for tensor in header.get("outputs", []):
        length = (tensor.get("parameters") or {}).get("binary_data_size")
        if tensor.get("name") == output and length is not None:
            if tensor.get("datatype", "FP32") != "FP32":
                raise Unsupported(f"HTTP 200, output {output} as {tensor.get('datatype')}")
            return np.frombuffer(body[offset : offset + int(length)], dtype="<f4")
        offset += int(length or 0)
    raise Unsupported(f"HTTP 200 without binary data for {output}: {_start(body[:size])}")


def _start(body: bytes, chars: int = 200) -> str:
    """The start of an answer's body, on one line."""
    return " ".join(body[:chars].decode("utf-8", "replace").split())


@dataclass
class Payloads:
    bundle: Bundle
    rest: Path  # V2 JSON body
    rest_binary: Path  # V2 binary tensor body: JSON header, then the raw input
    binary_header_length: int  # bytes of that JSON header
    grpc: Path  # 5-byte gRPC prefix + serialized ModelInferRequest
    expected: np.ndarray  # onnxruntime's output for the input, here in this process

    def body(self, protocol: str) -> Path:
        return {"rest": self.rest, "rest-binary": self.rest_binary, "grpc": self.grpc}[protocol]

    def headers(self, protocol: str) -> dict[str, str]:
        """The HTTP headers a REST protocol's request carries."""
        if protocol == "rest-binary":
            return {"Content-Type": "application/octet-stream",
                    HEADER_LENGTH: str(self.binary_header_length)}  # fmt: skip
        return {"Content-Type": "application/json"}

    def describe(self) -> dict:
        def info(path: Path) -> str:
            data = path.read_bytes()
            return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"

        return {"rest": f"V2 JSON: {info(self.rest)}",
                "rest-binary": f"V2 binary: {info(self.rest_binary)}",
                "grpc": f"ModelInfer: {info(self.grpc)}"}  # fmt: skip


def write_payloads(folder: Path, bundle: Bundle) -> Payloads:
    import onnxruntime as ort

    folder.mkdir(parents=True, exist_ok=True)
    x = model_input(bundle)
    rest, rest_binary, grpc = folder / "v2.json", folder / "v2.bin", folder / "modelinfer.bin"
    rest.write_bytes(v2_json(bundle, x))
    binary, header_length = v2_binary(bundle, x)
    rest_binary.write_bytes(binary)
    grpc.write_bytes(model_infer(bundle, x))
    session = ort.InferenceSession(str(bundle.folded), providers=["CPUExecutionProvider"])
    expected = session.run([bundle.output_name], {bundle.input_name: x})[0]
    return Payloads(bundle, rest, rest_binary, header_length, grpc, expected)


def prepare_bundle(model: str | Path, work: Path) -> Bundle:
    """A bundle folder as it is, or HEAVY: make bench's heavy bundle (bench/models.py
    `prepare_heavy` with the full plan's size and evaluation images), built under `work`."""
    if str(model) != HEAVY:
        return Bundle.read(Path(model))
    from bench.models import prepare_heavy
    from bench.plan import FULL

    started = time.perf_counter()
    built = prepare_heavy(work / "heavy-build", FULL.heavy_size, FULL.eval_images)
    log(f"built the heavy bundle in {time.perf_counter() - started:.0f} s")
    return Bundle.read(built.serve_dir / built.name)


def served_folder(bundle: Bundle, work: Path) -> Path:
    """A models folder for bnfold holding this bundle alone, under its manifest's name (bnfold
    serves every bundle of its folder, each under its folder's name)."""
    folder = work / "bnfold-models"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / bundle.name).symlink_to(bundle.path.resolve(), target_is_directory=True)
    return folder


# --- the servers ----------------------------------------------------------------------------
@dataclass
class Running:
    name: str
    server: servers.Server
    grpc_port: int
    metadata: dict = field(default_factory=dict)  # GET /v2: the server's name and version
    grpc_frame: int = 0  # bytes of one framed ModelInfer response (h2load's data check)
    protocols: tuple[str, ...] = PROTOCOLS  # those whose answers passed the check


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


def start(name: str, bundle: Bundle, logs: Path, bnfold_env: dict) -> Running:
    http, grpc_port = servers.free_port(), servers.free_port()
    ready = f"/v2/models/{bundle.name}/ready"  # the peers' /v2/health/ready precedes the model
    if name == "bnfold":
        # bnfold's /v2/health/ready: every bundle loaded, every worker up, the gRPC port open
        # (a model's readiness comes from whichever worker answers, maybe before the others)
        settings = {**bnfold_env, "BNFOLD_GRPC_PORT": str(grpc_port)}
        server = servers.bnfold_server(served_folder(bundle, logs), logs, settings)
        return Running(name, server, grpc_port)
    python, model = str(peer_python(name)), str(bundle.path.resolve())
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


def start_all(names: list[str], bundle: Bundle, logs: Path, bnfold_env: dict) -> tuple[dict, dict]:
    """Start every server at once, wait for each; (running, {name: reason it is not})."""
    running, unavailable = {}, {}
    for name in names:
        reason = None if name == "bnfold" else why_unavailable(name)
        if reason:
            unavailable[name] = reason
            continue
        try:
            running[name] = start(name, bundle, logs, bnfold_env)
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
def infer_url(r: Running, payloads: Payloads) -> str:
    return r.server.url(f"/v2/models/{payloads.bundle.name}/infer")


def check_rest(r: Running, payloads: Payloads) -> None:
    request = urllib.request.Request(
        infer_url(r, payloads), data=payloads.rest.read_bytes(), headers=payloads.headers("rest")
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = json.loads(resp.read())
    output = next(o for o in answer["outputs"] if o["name"] == payloads.bundle.output_name)
    got = np.asarray(output["data"], dtype=np.float32)
    _compare(r.name, "REST", got, payloads.expected)


def check_rest_binary(r: Running, payloads: Payloads) -> None:
    """The binary-extension body; Unsupported when the answer is an error or has no binary
    data."""
    request = urllib.request.Request(
        infer_url(r, payloads),
        data=payloads.rest_binary.read_bytes(),
        headers=payloads.headers("rest-binary"),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            body, header_length = resp.read(), resp.headers.get(HEADER_LENGTH)
    except urllib.error.HTTPError as exc:
        raise Unsupported(f"HTTP {exc.code}: {_start(exc.read())}") from exc
    got = parse_binary_response(body, header_length, payloads.bundle.output_name)
    _compare(r.name, "REST binary", got, payloads.expected)


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
        raise RuntimeError(f"{name} {protocol}: output {got[:10]} != {expected.ravel()[:10]}")


def check(r: Running, payloads: Payloads, protocols: tuple[str, ...] = PROTOCOLS) -> dict:
    """Each protocol's answer to the load's bytes against onnxruntime's; {protocol: reason} for
    those the server does not take. A wrong answer raises."""
    unsupported = {}
    servers.resume(r.server)
    try:
        for protocol in protocols:
            try:
                if protocol == "rest":
                    check_rest(r, payloads)
                elif protocol == "rest-binary":
                    check_rest_binary(r, payloads)
                else:
                    r.grpc_frame = check_grpc(r, payloads)
            except Unsupported as exc:
                unsupported[protocol] = str(exc)
    finally:
        servers.pause(r.server)
    return unsupported


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
        if protocol == "grpc":
            row = run_h2load(r, payloads.grpc, c, seconds, work)
        else:
            headers = payloads.headers(protocol)
            content_type = headers.pop("Content-Type")
            row = run_wrk(infer_url(r, payloads), payloads.body(protocol), content_type, c,
                          seconds, headers=headers)  # fmt: skip
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


def prepare_servers(running: dict, payloads: Payloads, warmup_s: int, work: Path) -> tuple:
    """Metadata, the answers checked, one warm-up run per protocol taken (sessions, pools,
    connections); ({name: reason} of servers dropped, {name: {protocol: reason}} not taken)."""
    failed, unsupported = {}, {}
    for name, r in list(running.items()):
        try:
            r.metadata = metadata(r)
            refused = check(r, payloads)
            r.protocols = tuple(p for p in PROTOCOLS if p not in refused)
            if refused:
                unsupported[name] = refused
                log(f"{name}: {'; '.join(f'{p} unavailable: {why}' for p, why in refused.items())}")
            for protocol in r.protocols:
                measure_point(r, protocol, payloads, 16, warmup_s, work)
        except Exception as exc:  # noqa: BLE001 (reported in the results)
            failed[name] = f"failed its check: {str(exc)[-600:]}"
            servers.stop(running.pop(name).server)
    return failed, unsupported


def check_after(running: dict, payloads: Payloads) -> dict:
    """The answers still right after the load, on every protocol measured: {name: verdict}."""
    verdicts = {}
    for name, r in running.items():
        try:
            refused = check(r, payloads, r.protocols)
            verdicts[name] = "ok" if not refused else f"FAILED: {refused}"
        except Exception as exc:  # noqa: BLE001
            verdicts[name] = f"FAILED: {str(exc)[-300:]}"
    return verdicts


def measure_model(
    settings: Settings, bundle: Bundle, peers: tuple[str, ...], bnfold_env: dict, work: Path
) -> dict:
    """Every server on one bundle, every protocol it takes, the rounds alternating."""
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    started = time.perf_counter()
    payloads = write_payloads(work, bundle)
    running, unavailable = start_all(["bnfold", *peers], bundle, work, bnfold_env)
    if "bnfold" not in running:
        stop_all(running)
        raise RuntimeError(f"bnfold did not start: {unavailable.get('bnfold')}")
    try:
        failed, unsupported = prepare_servers(running, payloads, settings.warmup_seconds, work)
        unavailable |= failed
        if "bnfold" not in running:
            raise RuntimeError(f"bnfold failed its check: {unavailable['bnfold']}")
        targets = list(running)
        runs = {n: {p: {c: [] for c in settings.concurrency} for p in running[n].protocols}
                for n in targets}  # fmt: skip
        for rnd in range(settings.rounds):
            for protocol in PROTOCOLS:
                takers = [n for n in targets if protocol in running[n].protocols]
                for i, c in enumerate(settings.concurrency):
                    shift = (rnd + i) % max(1, len(takers))
                    for name in takers[shift:] + takers[:shift]:
                        row = measure_point(
                            running[name], protocol, payloads, c, settings.seconds, work
                        )
                        runs[name][protocol][c].append(row)
                        log(f"{bundle.name} round {rnd + 1} {protocol} c={c} {name}: "
                            f"{row['rps']:.0f}/s p99 {_fmt(row['p99_ms'], '.1f')} ms, "
                            f"{row['errors']} errors")  # fmt: skip
        checked_after = check_after(running, payloads)
        meta = {n: r.metadata for n, r in running.items()}
    finally:
        stop_all(running)
    return {
        "model": bundle.describe(),
        "bundle": str(bundle.path),
        "targets": targets,
        "labels": {n: LABELS[n] for n in targets},
        "unavailable": unavailable,
        "unsupported": unsupported,
        "server_metadata": meta,
        "checked_after": checked_after,
        "payloads": payloads.describe(),
        "load_average": f"{load_start} at start, "
        + " ".join(f"{v:.2f}" for v in os.getloadavg())
        + " at end",
        "elapsed_s": time.perf_counter() - started,
        "runs": runs,
        "table": summarize(runs),
        "ratios": ratios(runs),
    }


def measure(
    settings: Settings,
    peers: tuple[str, ...] = PEERS,
    bnfold_env: dict | None = None,
    models: tuple[str | Path, ...] = (DIGITS_DIR,),
) -> dict:
    """Each bundle in turn, its servers started for it and stopped after it. A bundle that
    cannot be measured (bnfold fails on it) is reported with its reason; the others stand."""
    if missing_tools():
        raise RuntimeError(f"missing {', '.join(missing_tools())}: bash scripts/install_peers.sh")
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-peers-") as tmp:
        for i, model in enumerate(models):
            work = Path(tmp) / str(i)
            work.mkdir()
            try:
                bundle = prepare_bundle(model, work)
                results[bundle.name] = measure_model(
                    settings, bundle, peers, bnfold_env or {}, work
                )
                if str(model) == HEAVY:  # its folder is gone with the temporary one
                    results[bundle.name]["bundle"] = "built by bench/models.py prepare_heavy"
            except Exception as exc:  # noqa: BLE001 (reported in the results)
                log(f"{model}: not measured: {exc}")
                results[Path(str(model)).name] = {"error": str(exc)[-1000:]}
    if all("error" in m for m in results.values()):
        raise RuntimeError("; ".join(f"{n}: {m['error']}" for n, m in results.items()))
    measured = {t for m in results.values() for t in m.get("targets", ())}
    return {
        "settings": {**settings.__dict__, "concurrency": list(settings.concurrency)},
        "models": results,
        "peer_versions": {
            f: peer_versions(f) for f in VERSIONS if any(t.startswith(f) for t in measured)
        },  # fmt: skip
        "load_average": f"{load_start} at start, "
        + " ".join(f"{v:.2f}" for v in os.getloadavg())
        + " at end",
        "loaded": _loaded(load_start),
        "elapsed_s": time.perf_counter() - started,
    }


def _loaded(load_start: str) -> str:
    """A warning when other work held the cores as the run began, else ''. Only the figure at
    the start tells: during and after the run the load average counts the bench's own server
    and load generator, about one runnable task per core on a 2-core machine."""
    cores = len(os.sched_getaffinity(0))
    before = float(load_start.split()[0])
    if before <= cores * 0.75:
        return ""
    return (
        f"The machine was loaded by other work (1-minute load average {before:.1f} on {cores} "
        "cores before the run began): absolute figures are low and noisy, and a server with "
        "more runnable threads or processes takes a larger share of contended cores, which "
        "favours the multi-process servers over the single-process ones (KServe with 1 worker, "
        "MLServer with 0 parallel workers). Calls per server CPU-second depend least on the "
        "contention."
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
    bnfold serves more), p99 (< 1: bnfold's tail is shorter), calls per server CPU-second; for
    the protocols both take."""
    out = {}
    for peer in (n for n in runs if n != "bnfold"):
        for protocol, by_c in runs["bnfold"].items():
            if protocol not in runs[peer]:
                continue
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
    """bnfold / peer req/s (p99 ratio in brackets), one row per model, peer and protocol; then
    the protocols a server does not take and the servers not measured, each with its reason."""
    levels = result["settings"]["concurrency"]
    blank = " |" * (len(levels) - 1)
    lines = ["| model | bnfold / peer: req/s (p99) | protocol | "
             + " | ".join(f"c={c}" for c in levels) + " |",
             "|---|---|---|" + "---:|" * len(levels)]  # fmt: skip
    for model, m in result["models"].items():
        if "error" in m:
            lines.append(f"| {model} | all servers | not measured | {_cell(m['error'])} |{blank}")
            continue
        for peer, by_protocol in m["ratios"].items():
            for protocol in (p for p in PROTOCOLS if p in by_protocol):
                by_c = by_protocol[protocol]
                cells = [f"{_fmt(by_c[_key(by_c, c)]['rps'])} "
                         f"({_fmt(by_c[_key(by_c, c)]['p99_ms'])})" for c in levels]  # fmt: skip
                lines.append(f"| {model} | {m['labels'][peer]} | {PROTOCOL_NAMES[protocol]} | "
                             f"{' | '.join(cells)} |")  # fmt: skip
        for name, refused in m.get("unsupported", {}).items():
            for protocol, reason in refused.items():
                lines.append(f"| {model} | {LABELS.get(name, name)} | {PROTOCOL_NAMES[protocol]} "
                             f"| unavailable: {_cell(reason)} |{blank}")  # fmt: skip
        for name, reason in m["unavailable"].items():
            lines.append(
                f"| {model} | {LABELS.get(name, name)} | not measured | {_cell(reason)} |{blank}"
            )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A reason as one markdown table cell: one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _key(by_c: dict, c: int):
    return c if c in by_c else str(c)  # int keys in memory, str keys once read from JSON


def absolute_table(result: dict) -> str:
    levels = result["settings"]["concurrency"]
    lines = ["| model | server | protocol | c | req/s | p50 ms | p99 ms | errors "
             "| calls per server CPU-s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model, m in result["models"].items():
        for name in m.get("targets", ()):
            for protocol in (p for p in PROTOCOLS if p in m["table"][name]):
                by_c = m["table"][name][protocol]
                for c in levels:
                    cell = by_c[_key(by_c, c)]
                    lines.append(
                        f"| {model} | {m['labels'][name]} | {protocol} | {c} "
                        f"| {_fmt(cell['rps'], ',.0f')} | {_fmt(cell['p50_ms'])} "
                        f"| {_fmt(cell['p99_ms'])} | {cell['errors']} "
                        f"| {_fmt(cell['calls_per_cpu_s'], ',.0f')} |"
                    )
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    measured = {n: m for n, m in result["models"].items() if "error" not in m}
    reports = {}  # every server reports the same name and version whatever the bundle
    for m in measured.values():
        reports |= m["server_metadata"]
    rows = [("command", f"`{env['command']}`"), ("date", env["date"]),
            ("machine", env["machine"]), ("load average (1, 5, 15 min)", result["load_average"]),
            ("bnfold", env["bnfold"]),
            *((f"{f} virtualenv", v) for f, v in result["peer_versions"].items()),
            *((f"{n} reports", f"{m.get('name')} {m.get('version')}")
              for n, m in reports.items()),
            *((f"{n}: bundle", f"{m['model']}, {m['bundle']}") for n, m in measured.items()),
            *((f"{n}: request bytes (every server)", "; ".join(m["payloads"].values()))
              for n, m in measured.items()),
            ("load", f"wrk -t1 (REST JSON and binary), h2load -t1 -m1 (gRPC); {s['rounds']} "
                     f"round(s) x {s['seconds']} s per model, server, protocol and concurrency, "
                     "order rotating"),
            *((f"{n}: answers checked after the load", ", ".join(
                f"{k}: {v}" for k, v in m["checked_after"].items())) for n, m in measured.items()),
            *((f"{n}: elapsed", f"{m['elapsed_s']:.0f} s, load average {m['load_average']}")
              for n, m in measured.items()),
            ("elapsed", f"{result['elapsed_s']:.0f} s")]  # fmt: skip
    head = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows) + "\n"
    if result.get("loaded"):
        head += f"\n**{result['loaded']}**\n"
    return (
        f"# bnfold beside Triton, KServe and MLServer ({', '.join(result['models'])}, CPU)\n\n"
        + head
        + "\nbnfold / peer, median over rounds of same-round ratios: req/s (> 1: bnfold serves "
        "more), in brackets p99 latency (< 1: bnfold's tail is shorter). REST binary is the V2 "
        "binary tensor extension (tritonclient.http's default); a server that answers it with "
        "an error or without binary data is listed as unavailable for it, with its answer.\n\n"
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
        bnfold_env: dict | None = None,
        models: tuple[str | Path, ...] = (DIGITS_DIR, HEAVY)) -> dict:  # fmt: skip
    """Measure `models` (bundle folders, or HEAVY), write peers.json and peers.md into `out`.
    The default, digits and heavy, is what `make bench` (bench/run.py) measures."""
    result = measure(settings, peers, bnfold_env, models)
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
    parser.add_argument(
        "--model",
        action="append",
        help=f"a bundle folder, or '{HEAVY}' for make bench's heavy bundle (built in a temporary "
        "folder); repeat for several, measured one after the other (default models/digits)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = tuple(m if m == HEAVY else Path(m) for m in args.model or [DIGITS_DIR])
    for model in models:
        if model != HEAVY and not (model / "bundle.json").is_file():
            parser.error(f"--model {model}: no bundle.json there (or '{HEAVY}')")
    peers = tuple(p for p in args.peers.split(",") if p)
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {sorted(unknown)}; choose from {','.join(PEERS)}")
    if missing_tools():
        log(f"peers_run: missing {', '.join(missing_tools())}: bash scripts/install_peers.sh")
        return 2
    levels = tuple(int(c) for c in args.concurrency.split(","))
    command = " ".join(["python -m bench.peers_run", *argv])
    result = run(Settings(args.seconds, args.rounds, levels), args.out, command, peers,
                 models=models)  # fmt: skip
    print(ratio_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
