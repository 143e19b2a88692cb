"""service/api/fastpath.py: V2 infer answered without FastAPI's routing answers exactly what
the FastAPI route answers (the reference: the same app with the fast path removed), for good
calls and for every kind of refusal, and it is the fast path that answers the hot route."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api import v2
from service.api.fastpath import V2InferFastPath
from service.app import create_app
from service.config import Settings
from tests.service.test_api_v2 import binary_request, tensor

HEADER = "Inference-Header-Content-Length"


def _calls(x: np.ndarray) -> list[tuple[str, str, bytes, dict]]:
    """(method, path, body, headers): good calls and refusals of every kind."""
    good = json.dumps({"inputs": [tensor(x)]}).encode()
    binary, bin_headers = binary_request(x, parameters={"binary_data_output": True})
    nan = json.dumps({"inputs": [tensor(x)]}).replace("0.0", "NaN", 1).encode()
    unknown_variant = json.dumps({"inputs": [tensor(x)], "parameters": {"variant": "x"}}).encode()
    js = {"Content-Type": "application/json"}
    path = "/v2/models/digits/infer"
    return [
        ("POST", path, good, js),
        ("POST", "/v2/models/digits/versions/1/infer", good, js),
        ("POST", "/v2/models/digits/versions/7/infer", good, js),
        ("POST", "/v2/models/nope/infer", good, js),
        ("POST", path, binary, bin_headers),
        ("POST", path, binary, {HEADER: "abc"}),  # the route's validation answers
        ("POST", path, binary, {HEADER: "0"}),
        ("POST", path, binary, {HEADER: "+12"}),
        ("POST", path, binary, {HEADER: str(10**9)}),
        ("POST", path, binary, {HEADER: "9" * 4301}),  # past what Python's int() reads
        ("POST", path, binary, {HEADER: "0" * 5000 + "12"}),
        ("POST", path, b"{not json", js),
        ("POST", path, nan, js),
        ("POST", path, good, {"Content-Type": "text/plain"}),
        ("POST", path, good, {**js, "Content-Encoding": "gzip"}),
        ("POST", path, unknown_variant, js),
        ("POST", path, json.dumps({"inputs": [tensor(np.zeros((40, 1, 8, 8)))]}).encode(), js),
        ("GET", path, b"", {}),
        ("PUT", path, good, js),
        ("POST", path + "/", good, js),
        ("POST", "/v2/models//infer", good, js),
    ]  # fmt: skip


def _answer(client, method: str, path: str, body: bytes, headers: dict):
    r = client.request(method, path, content=body, headers=headers)
    kept = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date")}
    return r.status_code, kept, r.content


@pytest.fixture(scope="module")
def both(models_dir):
    """Two apps over the same bundle: as served, and with the fast path taken out."""
    from fastapi.testclient import TestClient

    s = Settings(models_dir=models_dir, provider="cpu", max_images_per_request=32, threads=1)
    plain = create_app(s)
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not V2InferFastPath]
    with TestClient(create_app(s)) as fast, TestClient(plain) as route:
        yield fast, route


def test_the_fast_path_answers_what_the_route_answers(both, digit_batch):
    fast, route = both
    for method, path, body, headers in _calls(digit_batch[:3]):
        got = _answer(fast, method, path, body, headers)
        want = _answer(route, method, path, body, headers)
        assert got == want, (method, path, headers, got[0], want[0], got[2][:300])


def test_the_hot_route_is_answered_by_the_fast_path(both, digit_batch, monkeypatch):
    """The route's own endpoint is never entered for a plain infer call; a malformed header
    still goes to it (its validation answers)."""
    fast, _ = both
    entered = []
    original = v2.infer_response

    async def spy(request, *args):
        entered.append(request.scope.get("endpoint"))
        return await original(request, *args)

    monkeypatch.setattr(v2, "infer_response", spy)
    body = json.dumps({"inputs": [tensor(digit_batch[:1])]}).encode()
    r = fast.post("/v2/models/digits/infer", content=body)
    assert r.status_code == 200 and entered == [None]  # no route matched: no endpoint in scope
    r = fast.post("/v2/models/digits/infer", content=body, headers={HEADER: "x"})
    assert r.status_code == 400 and entered == [None]  # validation refused it before the endpoint


def test_a_header_length_of_thousands_of_digits_is_a_client_mistake(both):
    """Python's int() refuses strings of over 4,300 digits (a ValueError, which was a 500)."""
    fast, _ = both
    for value in ("9" * 4301, "0" * 5000 + "12"):
        r = fast.post("/v2/models/digits/infer", content=b"{}", headers={HEADER: value})
        assert r.status_code == 400, (r.status_code, r.text[:200])
