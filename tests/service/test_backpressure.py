"""Backpressure: a full model queue answers 503 + Retry-After at once, the request timeout
answers 504 and drops the queued work, and health stays fast while inference is stuck.

The model's onnxruntime run is held shut by a gate (tests/service/test_batching.py), so
"busy" is a state the test controls rather than a race it hopes to win.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.errors import GatewayTimeout
from tests.service.test_batching import Gate

PREDICT = "/v1/models/digits/predict"


def png(digit) -> dict:
    return {"content": digit.png, "headers": {"content-type": "image/png"}}


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def sample(metrics_text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_a_full_queue_answers_503_with_retry_after_at_once(serve, models_dir, digits):
    client = serve(models_dir, max_queue_size=2, retry_after_s=3)
    core = client.app.state.core
    gate = Gate(core.registry.models["digits"])
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(client.post, PREDICT, **png(d)) for d in digits[:2]]
        wait_until(lambda: core.admission.admitted["digits"] == 2 and gate.rows)
        # The gate holds both queued requests until it opens below, so an answer now is an
        # answer "at once": a server that waited for the queue to move would block here.
        r = client.post(PREDICT, **png(digits[2]))
        assert r.status_code == 503 and not any(f.done() for f in held)
        assert r.headers["retry-after"] == "3"
        assert r.json() == {"error": "model 'digits' is busy: 2 requests already queued "
                                     "(BNFOLD_MAX_QUEUE_SIZE); retry after 3 s"}  # fmt: skip
        # Health and metrics are never queued behind inference, and tell the truth.
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            r = client.get(path)
            assert r.status_code == 200 and not gate.opened.is_set(), path
        text = r.text
        assert sample(text, "bnfold_queue_depth", model="digits") == 2
        assert sample(text, "bnfold_rejected_requests_total", model="digits") == 1
        gate.opened.set()
        answers = [f.result(timeout=10) for f in held]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["predictions"][0]["label"] for a in answers] == ["0", "1"]
    assert core.admission.admitted["digits"] == 0
    assert client.post(PREDICT, **png(digits[3])).status_code == 200  # the slot came back


def test_past_the_request_timeout_504_and_the_queued_work_is_dropped(serve, models_dir, digits):
    client = serve(models_dir, request_timeout_s=0.3)
    core = client.app.state.core
    gate = Gate(core.registry.models["digits"])
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, PREDICT, **png(digits[0]))
        wait_until(lambda: gate.rows == [1])  # in onnxruntime, stuck
        queued = pool.submit(client.post, PREDICT, files=[("files", ("a.png", d.png)) for d in
                                                          digits[1:4]])  # fmt: skip
        answers = [running.result(timeout=5), queued.result(timeout=5)]
    message = ("request not answered within 0.3 s (BNFOLD_REQUEST_TIMEOUT_S); its queued work "
               "was dropped: retry later")  # fmt: skip
    for r in answers:
        assert r.status_code == 504 and r.json() == {"error": message}
    gate.opened.set()
    r = client.post(PREDICT, **png(digits[4]))
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "4"
    # The 3-image request timed out in the queue: its rows never reached onnxruntime.
    assert gate.rows == [1, 1]
    text = client.get("/metrics").text
    assert sample(text, "bnfold_request_timeouts_total", model="digits") == 2
    assert sample(text, "bnfold_queue_depth", model="digits") == 0


def test_an_unknown_model_is_404_before_any_queue(serve, models_dir, digits):
    client = serve(models_dir, max_queue_size=1)
    r = client.post("/v1/models/cats/predict", **png(digits[0]))
    assert r.status_code == 404 and "retry-after" not in r.headers


def test_a_deadline_already_past_is_504_before_taking_a_slot(client):
    """gRPC hands admission the client's time_remaining(); at or below 0 the answer was
    'not answered within the client's deadline (0 s)' after taking a queue slot."""
    admission = client.app.state.core.admission

    async def admit(deadline: float) -> None:
        async with admission.admit("digits", None, deadline):
            raise AssertionError("admitted past its deadline")

    for deadline in (0.0, -0.5):
        with pytest.raises(GatewayTimeout) as info:
            anyio.run(admit, deadline)
        assert info.value.message == (
            "the client's deadline had passed when the request arrived: nothing was run; give "
            "the call a longer deadline"
        )
    assert admission.admitted["digits"] == 0
