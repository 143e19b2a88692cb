"""A large V2 JSON body is refused on its declared shape before its data lists are built.

Python's lists and numbers cost 60-100 times their JSON text: 32 concurrent 10 MiB bodies took a
worker to 1.1 GB, though their shape (81,919 rows against a limit of 64) allowed a 413 before
any of it was parsed. On the real server process here, eight such bodies (rows nested as the
shape, the worst case) are answered 413, one with a small shape and far more data 400, and the
process's peak memory grows by a small multiple of one body, not by the parse's 60-100x; a
full legitimate batch is still answered.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.e2e
INFER = "/v2/models/digits/infer"
ROWS = 81_919


def tensor(shape: list[int], data: list) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                                   "data": data}]}, separators=(",", ":")).encode()  # fmt: skip


def test_oversized_json_bodies_are_refused_before_parsing(start_server):
    server = start_server(max_body_bytes=32 * 1024 * 1024)
    rows = tensor([ROWS, 1, 8, 8], [[[[0] * 8] * 8]] * ROWS)  # about 10 MiB
    flat = tensor([1, 1, 8, 8], [0] * 5_000_000)
    before = server.memory_kib("VmHWM")
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=60) as client:

        def post(body: bytes) -> httpx.Response:
            return client.post(INFER, content=body, headers=headers)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, [rows] * 8))
        assert all(a.status_code == 413 for a in answers), answers[0].text
        assert "81919 images in one request" in answers[0].json()["error"]
        grown_mib = (server.memory_kib("VmHWM") - before) / 1024
        # 4 bodies of 10 MiB at once, each held about twice while received: well under 150 MiB.
        # Parsed, a single one of them grew the process by 600 MiB or more.
        assert grown_mib < 150, f"peak memory grew by {grown_mib:.0f} MiB"
        answer = post(flat)
        assert answer.status_code == 400 and "(64 elements)" in answer.json()["error"]
        assert server.memory_kib("VmHWM") - before < 150 * 1024
        batch = [[[[random.random() for _ in range(8)] for _ in range(8)]] for _ in range(64)]
        answer = post(tensor([64, 1, 8, 8], batch))  # the largest batch allowed: served
        assert answer.status_code == 200, answer.text
