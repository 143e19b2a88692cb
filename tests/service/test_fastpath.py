"""service/api/fastpath.py: V2 infer and predict answered without FastAPI's routing answer
exactly what the FastAPI routes answer (the reference: the same app with the fast path
removed), for good calls and for every kind of refusal, and it is the fast path that answers
the hot routes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api import v1, v2
from service.api.fastpath import FastPath
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


def _form(images: list[bytes], field: str = "files", filename: str = "d.png") -> bytes:
    parts = [b'--xyz\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
             b"Content-Type: image/png\r\n\r\n%s\r\n" % (field.encode(), filename.encode(), png)
             for png in images]  # fmt: skip
    return b"".join(parts) + b"--xyz--\r\n"


# Query strings the fast path takes, and ones it leaves to the route's validation.
QUERIES = [
    "?top_k=10",
    "?top_k=1&variant=unfolded",
    "?variant=folded&top_k=1000",
    "?variant=int8",
    "?variant=",
    "?variant=%66olded",
    "?variant=nope",
    "?top_k=0",  # the route's validation answers
    "?top_k=1001",
    "?top_k=-1",
    "?top_k=%2B3",
    "?top_k=3.0",
    "?top_k=" + "9" * 5000,
    "?top_k=abc",
    "?top_k=",
    "?top_k=2&top_k=5",
    "?variant=unfolded&variant=folded",
    "?other=1",
    "?top_k",
]


def _predict_calls(pngs: list[bytes]) -> list[tuple[str, str, bytes, dict]]:
    """(method, path, body, headers): predict calls, good ones and refusals of every kind."""
    form = {"Content-Type": "multipart/form-data; boundary=xyz"}
    one, three = _form(pngs[:1]), _form(pngs[:3])
    path = "/v1/models/digits/predict"
    return [
        ("POST", path, three, form),
        ("POST", path, pngs[0], {"Content-Type": "image/png"}),
        *[("POST", path + query, one, form) for query in QUERIES],
        ("POST", "/v1/models/nope/predict", one, form),
        ("POST", path, one, {"Content-Type": "multipart/form-data"}),
        ("POST", path, b"--xyz\r\n", form),
        ("POST", path, _form(pngs[:1], field="other"), form),
        ("POST", path, _form([b"not a png"]), form),
        ("POST", path, one, {"Content-Type": "text/plain"}),
        ("POST", path, one, {**form, "Content-Encoding": "gzip"}),
        ("POST", path, _form(pngs * 2), form),  # more images than max_images_per_request
        ("GET", path, b"", {}),
        ("POST", path + "/", one, form),
        ("POST", "/v1/models//predict", one, form),
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
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not FastPath]
    with TestClient(create_app(s)) as fast, TestClient(plain) as route:
        yield fast, route


def test_the_fast_path_answers_what_the_route_answers(both, digit_batch):
    fast, route = both
    for method, path, body, headers in _calls(digit_batch[:3]):
        got = _answer(fast, method, path, body, headers)
        want = _answer(route, method, path, body, headers)
        assert got == want, (method, path, headers, got[0], want[0], got[2][:300])


def test_the_fast_path_answers_predict_as_the_route_does(both, digits):
    fast, route = both
    for method, path, body, headers in _predict_calls([d.png for d in digits]):
        got = _answer(fast, method, path, body, headers)
        want = _answer(route, method, path, body, headers)
        assert got == want, (method, path[:80], headers, got[0], want[0], got[2][:300])


def _endpoints_entered(monkeypatch, module, name: str) -> list:
    """module.name (an endpoint's answer function) spied on: the route endpoint in each call's
    scope (None when no route matched, i.e. the fast path called it)."""
    entered = []
    original = getattr(module, name)

    async def spy(request, *args):
        entered.append(request.scope.get("endpoint"))
        return await original(request, *args)

    monkeypatch.setattr(module, name, spy)
    return entered


def test_predict_is_answered_by_the_fast_path(both, digits, monkeypatch):
    """The route's own endpoint is never entered for a plain predict call; a query string it
    does not take for certain still goes to the route (whose validation answers)."""
    fast, _ = both
    entered = _endpoints_entered(monkeypatch, v1, "predict_response")
    form = {"Content-Type": "multipart/form-data; boundary=xyz"}
    body = _form([digits[3].png])
    r = fast.post("/v1/models/digits/predict?top_k=2", content=body, headers=form)
    assert r.status_code == 200 and entered == [None]  # no route matched: no endpoint in scope
    assert r.json()["predictions"][0]["label"] == "3"
    r = fast.post("/v1/models/digits/predict?top_k=2&top_k=2", content=body, headers=form)
    assert r.status_code == 200 and entered[1] is not None  # the route answered it


def test_the_hot_route_is_answered_by_the_fast_path(both, digit_batch, monkeypatch):
    """The route's own endpoint is never entered for a plain infer call; a malformed header
    still goes to it (its validation answers)."""
    fast, _ = both
    entered = _endpoints_entered(monkeypatch, v2, "infer_response")
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
