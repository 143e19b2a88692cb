"""GET /metrics (Prometheus) and the access/error log lines with their request ids."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import captured_log
from tests.service.test_app import FailingOnceRunner

PREDICT = "/v1/models/digits/predict"
FAMILIES = {  # family -> type, as the issue names them
    "bnfold_requests": "counter",
    "bnfold_request_duration_seconds": "histogram",
    "bnfold_requests_in_flight": "gauge",
    "bnfold_queue_depth": "gauge",
    "bnfold_rejected_requests": "counter",
    "bnfold_request_timeouts": "counter",
    "bnfold_queue_wait_seconds": "histogram",
    "bnfold_inference_duration_seconds": "histogram",
    "bnfold_batch_size": "histogram",
    "bnfold_images": "counter",
    "bnfold_inferences": "counter",
}


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} for every sample on the page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(table: dict, name: str, **labels) -> float:
    return table[(name, tuple(sorted(labels.items())))]


def test_metrics_expose_every_family_with_values_that_add_up(serve, models_dir, digits):
    client = serve(models_dir)
    for d in digits[:3]:
        r = client.post(PREDICT, content=d.png, headers={"content-type": "image/png"})
        assert r.status_code == 200
    tensor = {"name": "input", "shape": [4, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 256}
    body = {"inputs": [tensor], "parameters": {"variant": "unfolded"}}
    assert client.post("/v2/models/digits/infer", json=body).status_code == 200
    assert client.post("/v1/models/cats/predict", content=b"x").status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    t = samples(r.text)
    predict = {"protocol": "rest", "endpoint": "/v1/models/{model}/predict"}
    assert value(t, "bnfold_requests_total", **predict, model="digits", code="200") == 3
    assert value(t, "bnfold_requests_total", **predict, model="unknown", code="404") == 1
    assert value(t, "bnfold_request_duration_seconds_count", **predict) == 4
    assert 0 < value(t, "bnfold_request_duration_seconds_sum", **predict) < 10
    folded = {"model": "digits", "variant": "folded"}
    unfolded = {"model": "digits", "variant": "unfolded"}
    assert value(t, "bnfold_images_total", **folded) == 3
    assert value(t, "bnfold_images_total", **unfolded) == 4
    assert value(t, "bnfold_inferences_total", **folded) == 3
    assert value(t, "bnfold_batch_size_sum", **unfolded) == 4  # one run of 4 rows
    assert value(t, "bnfold_batch_size_count", **folded) == 3  # sequential: three runs of 1
    runs = value(t, "bnfold_inference_duration_seconds_count", **folded)
    assert runs == 3 and value(t, "bnfold_queue_wait_seconds_count", **folded) == 3
    assert value(t, "bnfold_queue_depth", model="digits") == 0
    assert value(t, "bnfold_requests_in_flight") == 1  # this scrape


@pytest.fixture
def log_lines(request):
    """JSON log lines written while the test runs, as dicts (the service's own handler)."""
    with captured_log("json") as stream:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_access_line_per_request_with_the_request_id_of_the_header(
    serve, models_dir, digits, log_lines
):
    client = serve(models_dir)
    png = {"content": digits[0].png, "headers": {"content-type": "image/png"}}
    mine = client.post(PREDICT, content=png["content"],
                       headers={**png["headers"], "X-Request-ID": "client-42.a:b"})  # fmt: skip
    fresh = client.post(PREDICT, **png)
    odd = client.get("/v2/health/ready", headers={"X-Request-ID": "no spaces please"})
    assert mine.headers["x-request-id"] == "client-42.a:b"  # a sane incoming id is kept
    assert re.fullmatch("[0-9a-f]{32}", fresh.headers["x-request-id"])
    assert re.fullmatch("[0-9a-f]{32}", odd.headers["x-request-id"])  # an odd one is replaced
    access = [line for line in log_lines() if line["logger"] == "service.access"]
    assert [(a["request_id"], a["method"], a["path"], a["status"]) for a in access] == [
        ("client-42.a:b", "POST", PREDICT, 200),
        (fresh.headers["x-request-id"], "POST", PREDICT, 200),
        (odd.headers["x-request-id"], "GET", "/v2/health/ready", 200),
    ]
    first = access[0]
    assert first["level"] == "info" and first["endpoint"] == "/v1/models/{model}/predict"
    assert first["duration_ms"] > 0 and first["client"] == "testclient"


def test_an_error_line_names_the_request_and_keeps_the_traceback(
    serve, models_dir, digits, log_lines
):
    client = serve(models_dir, runner=FailingOnceRunner())
    r = client.post(PREDICT, content=digits[0].png, headers={"content-type": "image/png"})
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    rid = r.headers["x-request-id"]
    lines = [line for line in log_lines() if line["request_id"] == rid]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("service.api.middleware", "error"),
        ("service.access", "info"),
    ]
    assert "RuntimeError: injected onnxruntime failure" in lines[0]["exception"]
    assert lines[1]["status"] == 500
