"""`BNFOLD_WORKERS=2`: two real worker processes under the supervisor, on one loopback port.

Which worker answered is read from the JSON access lines (each carries its process id), so the
tests check behaviour across processes without any timing threshold: both workers answer, the
merged /metrics counts exactly the requests sent, readiness waits for every worker, a killed
worker is replaced while the other keeps answering, a reload reaches both, and SIGTERM to the
supervisor drains both (exit 0; exit 1 when the drain timeout cut a request off).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import time

import httpx
import pytest

from tests.load.conftest import PREDICT, wait_for, whole_lines
from tests.load.test_shutdown import connected, predict_request, queue_depth, read_response

pytestmark = pytest.mark.e2e
TOKEN = "workers-test-admin-token-0123456789"


def access_pids(log_text: str) -> dict[str, int]:
    """request id -> pid of the worker that answered it, from the JSON access lines."""
    out = {}
    for line in whole_lines(log_text):
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "service.access":
                out[entry["request_id"]] = entry["pid"]
    return out


def worker_pids(server) -> set[int]:
    """The supervisor's children that run a server (not multiprocessing's resource tracker)."""
    pids = set()
    for line in server.log.read_text().splitlines():
        match = re.search(r"worker \d of 2 started \(pid (\d+)\)", line)
        if match:
            pids.add(int(match.group(1)))
    return pids


def predict(url: str, png: bytes, request_id: str) -> httpx.Response:
    """One predict on a new connection (a new connection may land on either worker)."""
    files = {"files": ("digit.png", png, "image/png")}
    return httpx.post(f"{url}{PREDICT}", files=files, headers={"X-Request-ID": request_id})


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def json_server(start_server, **settings):
    return start_server(workers=2, log_format="json", log_level="info", **settings)


def test_both_workers_answer_and_metrics_count_every_request_once(start_server, digits):
    server = json_server(start_server)
    sent, answered_by = 0, set()
    while len(answered_by) < 2:  # new connections until each worker has answered one
        assert sent < 400, f"one worker answered all {sent} requests"
        response = predict(server.url, digits[sent % 10].png, f"req-{sent}")
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"] == str(digits[sent % 10].label)
        sent += 1
        pids = access_pids(server.log.read_text())  # a line may follow its answer: None
        answered_by = {pids.get(f"req-{i}") for i in range(sent)} - {None}
    assert answered_by == worker_pids(server)  # two distinct workers, not the supervisor
    assert server.proc.pid not in answered_by

    text = server.metrics()  # whichever worker answers it, the whole server's
    endpoint = "/v1/models/{model}/predict"
    assert metric(text, "bnfold_requests_total", endpoint=endpoint, code="200") == sent
    assert metric(text, "bnfold_request_duration_seconds_count", endpoint=endpoint) == sent
    assert metric(text, "bnfold_images_total", model="digits", variant="folded") == sent
    assert metric(text, "bnfold_queue_depth", model="digits") == 0  # livesum, nothing in flight


def test_a_killed_worker_is_replaced_and_readiness_waits_for_it(start_server, digits):
    server = json_server(start_server)
    victim = min(worker_pids(server))
    os.kill(victim, signal.SIGKILL)
    not_ready = None
    while not_ready is None:  # until the supervisor has seen the death (a tick: 0.1 s)
        try:
            answer = httpx.get(f"{server.url}/v2/health/ready", timeout=5)
        except httpx.TransportError:  # queued for the killed worker: reset
            continue
        if answer.status_code == 503:
            not_ready = answer.json()["error"]
    assert "of 2 not ready yet" in not_ready
    for i in range(20):  # meanwhile the other worker answers every request
        assert predict(server.url, digits[i % 10].png, f"during-{i}").status_code == 200
    wait_for(lambda: httpx.get(f"{server.url}/v2/health/ready").status_code == 200, timeout=60)
    log = server.log.read_text()
    assert f"(pid {victim}) was killed by SIGKILL; starting a new one" in log
    assert len(worker_pids(server)) == 3 and server.proc.poll() is None
    assert predict(server.url, digits[3].png, "after").status_code == 200


def test_a_reload_reaches_every_worker(start_server, models_dir, tmp_path, digits):
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    server = json_server(start_server, models_dir=models, admin_token=TOKEN)
    manifest = models / "digits" / "bundle.json"
    data = json.loads(manifest.read_text())
    data["version"] = "2"  # what the workers serve after the reload (checksums cover ONNX)
    manifest.write_text(json.dumps(data))

    auth = {"Authorization": f"Bearer {TOKEN}"}
    reloaded = httpx.post(f"{server.url}/v1/models/digits/reload", headers=auth, timeout=30)
    assert reloaded.status_code == 200, reloaded.text
    # The reload answered after the other worker applied it: every worker now says version 2.
    versions, seen, asked = set(), set(), 0
    while len(seen) < 2:
        assert asked < 400, "one worker answered every request"
        rid = f"meta-{asked}"
        answer = httpx.get(f"{server.url}/v2/models/digits", headers={"X-Request-ID": rid})
        versions.add(tuple(answer.json()["versions"]))
        asked += 1
        pids = access_pids(server.log.read_text())
        seen = {pids.get(f"meta-{i}") for i in range(asked)} - {None}
    assert versions == {("2",)}


def test_sigterm_drains_both_workers_with_requests_in_flight_then_exits_0(start_server, digits):
    server = json_server(start_server, slow_run_s=1.0, drain_timeout_s=30)
    port = int(server.url.rsplit(":", 1)[1])
    count = 24  # on new connections: the chance that one worker accepted all is 2 ** -23
    socks = {}
    for i in range(count):
        socks[i] = connected(port)
        socks[i].sendall(b"".join(predict_request(digits[i % 10].png, f"req-{i}", f"h:{port}")))
    wait_for(lambda: queue_depth(server.metrics()) == count, timeout=30)  # all admitted

    server.proc.send_signal(signal.SIGTERM)
    answers = {i: read_response(sock) for i, sock in socks.items()}
    code = server.proc.wait(timeout=60)
    log = server.log.read_text()

    assert {i: r.status for i, r in answers.items()} == {i: 200 for i in range(count)}, log
    for i, r in answers.items():
        assert json.loads(r.body)["predictions"][0]["label"] == str(digits[i % 10].label)
        assert r.getheader("connection") == "close"
    pids = access_pids(log)
    assert {pids[f"req-{i}"] for i in range(count)} == worker_pids(server)  # both drained
    assert code == 0, log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_sigterm_that_reaches_a_worker_after_its_drain_does_not_kill_it(start_server):
    """A process group's SIGTERM (systemd's default KillMode, `kill -- -PGID`) reaches every
    worker twice: directly, and forwarded by the supervisor. A worker whose drain is over when
    the second one comes must still exit 0, not die of the signal: here each worker gets a
    SIGTERM every millisecond until it is gone."""
    server = json_server(start_server)
    workers = worker_pids(server)
    assert len(workers) == 2
    server.proc.send_signal(signal.SIGTERM)
    while workers and server.proc.poll() is None:
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # exited and reaped by the supervisor
                workers.discard(pid)
        time.sleep(0.001)
    code = server.proc.wait(timeout=60)
    log = server.log.read_text()
    assert "was killed by" not in log, log
    assert code == 0, log


def test_a_worker_cut_off_by_the_drain_timeout_makes_the_exit_code_1(start_server, digits):
    server = start_server(workers=2, slow_run_s=4, drain_timeout_s=1)
    port = int(server.url.rsplit(":", 1)[1])
    sock = connected(port)
    sock.sendall(b"".join(predict_request(digits[0].png, "cut", f"h:{port}")))
    wait_for(lambda: queue_depth(server.metrics()) == 1)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 1
    assert "request(s) cut off" in server.log.read_text()
