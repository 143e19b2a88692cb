"""Graceful shutdown of the real process: SIGTERM while requests are in flight and queued.

Every onnxruntime run takes 1 s (slow_serve.py) and batching is off, so N requests are
still queued one behind the other when SIGTERM lands: all must complete with 200 and their own
answer, new requests must be refused (503, then no connection at all), and the process must exit
0 well within the drain timeout. The server logs JSON at info level here, so the test also reads
its access lines.
"""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.load.conftest import PREDICT, png_request, wait_for

pytestmark = pytest.mark.e2e
N = 6
RUN_S = 1.0  # long enough that all N are admitted before the first finishes, even on a busy CI
DRAIN_TIMEOUT_S = 15.0


def queue_depth(metrics_text: str) -> float:
    match = re.search(r'^bnfold_queue_depth\{model="digits"\} (\S+)$', metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def new_requests_until_refused(url: str, within_s: float = 5.0) -> list[int]:
    """Ask for readiness until the connection is refused (the listening socket is closed a
    tick after SIGTERM); returns the statuses answered before that."""
    time.sleep(0.05)  # let the signal land before the first probe
    statuses, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            statuses.append(httpx.get(url, timeout=2).status_code)
        except httpx.ConnectError:
            return statuses
        time.sleep(0.02)
    raise AssertionError(f"new connections still accepted {within_s} s after SIGTERM")


def json_line(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise AssertionError(f"log line is not JSON: {line!r}") from None


def test_sigterm_completes_requests_in_flight_and_queued_then_exits_0(start_server, digits):
    server = start_server(slow_run_s=RUN_S, max_batch_size=1, drain_timeout_s=DRAIN_TIMEOUT_S,
                          log_format="json", log_level="info")  # fmt: skip

    def predict(i: int) -> httpx.Response:
        headers = {"X-Request-ID": f"drain-{i}"}
        return httpx.post(f"{server.url}{PREDICT}", **png_request(digits, [i]), headers=headers,
                          timeout=30)  # fmt: skip

    with ThreadPoolExecutor(N) as pool:
        pending = [pool.submit(predict, i) for i in range(N)]
        wait_for(lambda: queue_depth(server.metrics()) == N)  # all admitted, none answered
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused = new_requests_until_refused(f"{server.url}/v2/health/ready")
        answers = [f.result(timeout=30) for f in pending]
    code = server.proc.wait(timeout=DRAIN_TIMEOUT_S + 5)
    elapsed = time.monotonic() - sent
    log = server.log.read_text()
    assert set(refused) <= {503}, (refused, log)  # never ready again once told to stop
    assert [r.status_code for r in answers] == [200] * N, log
    assert [r.json()["predictions"][0]["label"] for r in answers] == [str(i) for i in range(N)]
    assert code == 0, log
    assert elapsed < DRAIN_TIMEOUT_S  # drained: N runs of RUN_S, not the timeout
    lines = [json_line(line) for line in log.splitlines()]  # every line is JSON
    access = {a["request_id"]: a for a in lines if a["logger"] == "service.access"}
    for i, r in enumerate(answers):
        assert r.headers["x-request-id"] == f"drain-{i}"
        assert access[f"drain-{i}"]["status"] == 200 and access[f"drain-{i}"]["path"] == PREDICT
    assert not [a for a in lines if a["level"] in ("error", "critical")]
