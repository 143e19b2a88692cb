"""A soak of the real server: mixed good and malformed requests for a while, then what came back
(`python -m bench.soak [--seconds 120] [--workers 2] [--concurrency 16]`).

Starts `bnfold-serve` on 127.0.0.1 with the shipped models, sends V2 JSON infers, multipart
predicts and, one request in ten, a malformed one (bad JSON, a wrong shape, a corrupt PNG, an
unknown model), checks every good answer against onnxruntime on the same file, and reports the
status codes, wrong answers, 5xx, and each worker's RSS at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def _workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children] or [parent]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _requests(rng: random.Random):
    """(kind, method, path, kwargs, x or None): good ones carry their input for the check."""
    x = np.asarray([rng.random() for _ in range(64)], dtype=np.float32).reshape(1, 1, 8, 8)
    pixels = (x[0, 0] * 255).astype(np.uint8)
    if rng.random() < 0.1:
        bad = rng.choice(["json", "shape", "png", "model"])
        if bad == "json":
            return bad, "/v2/models/digits/infer", {"content": b'{"inputs": [', "headers":
                    {"content-type": "application/json"}}, None  # fmt: skip
        if bad == "shape":
            body = {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                "data": [0.0] * 192}]}  # fmt: skip
            return bad, "/v2/models/digits/infer", {"json": body}, None
        if bad == "png":
            return (
                bad,
                "/v1/models/digits/predict",
                {"files": {"files": ("a.png", b"\x89PNG junk")}},
                None,
            )
        return bad, "/v2/models/nope/infer", {"json": {"inputs": []}}, None
    if rng.random() < 0.5:
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        return "infer", "/v2/models/digits/infer", {"json": body}, x
    return (
        "predict",
        "/v1/models/digits/predict",
        {"files": {"files": ("d.png", _png(pixels))}},
        None,
    )


async def _client(url, deadline, rng, session, codes, wrong):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            kind, path, kwargs, x = _requests(rng)
            try:
                r = await client.post(path, **kwargs)
            except httpx.HTTPError as exc:
                codes[f"{kind} {type(exc).__name__}"] += 1
                continue
            codes[f"{kind} {r.status_code}"] += 1
            if kind == "infer" and r.status_code == 200:
                got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32)
                want = session.run(None, {"input": x})[0].ravel()
                wrong["infer"] += int(not np.array_equal(got, want))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    import onnxruntime as ort

    from tests.servers import free_port, stop, wait_ready

    port = free_port()
    env = {**os.environ, "BNFOLD_PORT": str(port), "BNFOLD_GRPC_PORT": "0",
           "BNFOLD_HOST": "127.0.0.1", "BNFOLD_WORKERS": str(args.workers),
           "BNFOLD_MODELS_DIR": str(REPO / "models"), "BNFOLD_MAX_BATCH_SIZE": "1"}  # fmt: skip
    log = Path(f"/tmp/bnfold-soak-{port}.log")
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        time.sleep(2)
        start = {pid: _rss_mib(pid) for pid in _workers(proc.pid)}
        # Batch size 1 on the server and the same session settings here: bit-equal answers.
        opts = ort.SessionOptions()
        session = ort.InferenceSession(str(REPO / "models/digits/folded.onnx"), opts)
        codes, wrong = Counter(), Counter()
        deadline = time.monotonic() + args.seconds
        rngs = [random.Random(i) for i in range(args.concurrency)]

        async def all_clients():
            await asyncio.gather(*(_client(url, deadline, r, session, codes, wrong) for r in rngs))

        asyncio.run(all_clients())
        end = {pid: _rss_mib(pid) for pid in _workers(proc.pid)}
    finally:
        proc.send_signal(signal.SIGTERM)
        stop(proc)
    five = sum(n for k, n in codes.items() if k.split()[-1].startswith("5"))
    result = {
        "seconds": args.seconds,
        "requests": sum(codes.values()),
        "codes": codes,
        "wrong_answers": sum(wrong.values()),
        "5xx": five,
        "rss_mib_start": start,
        "rss_mib_end": end,
    }
    print(json.dumps(result, indent=1, default=str))
    return 0 if five == 0 and not sum(wrong.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
