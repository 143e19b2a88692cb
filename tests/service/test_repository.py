"""The model repository extension over REST, and the admin token that guards its changes.

In process (TestClient over the real app, real sessions). The independent reference for a
swap: which LoadedModel object each request ran on, seen from inside its onnxruntime run.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from service.config import Settings
from tests.service.test_batching import Gate

TOKEN = "repository-test-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PNG = {"content-type": "image/png"}


def predict(client, model: str, digit) -> object:
    return client.post(f"/v1/models/{model}/predict", content=digit.png, headers=PNG)


def test_index_load_and_unload_a_bundle_written_while_the_server_runs(serve, copy_bundle, digits):
    bundle = copy_bundle("digits")
    client = serve(bundle.parent, admin_token=TOKEN)
    assert client.post("/v2/repository/index").json() == [
        {"name": "digits", "version": "1", "state": "READY", "reason": ""}
    ]
    copy_bundle("second")  # written after start-up: on disk, not served yet
    index = client.post("/v2/repository/index").json()
    assert index[1] == {"name": "second", "version": "", "state": "UNAVAILABLE",
                        "reason": "not loaded"}  # fmt: skip
    assert client.post("/v2/repository/index", json={"ready": True}).json() == index[:1]
    assert predict(client, "second", digits[2]).status_code == 404
    r = client.post("/v2/repository/models/second/load", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"name": "second", "state": "READY", "version": "1"}
    r = predict(client, "second", digits[2])
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "2"
    r = client.post("/v2/repository/models/second/unload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["state"] == "UNLOADED"
    assert predict(client, "second", digits[2]).status_code == 404
    assert client.post("/v2/repository/index").json()[1]["reason"] == "not loaded"
    assert client.get("/v2/health/ready").status_code == 200  # digits still served
    r = client.post("/v2/repository/models/third/load", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"].startswith("no bundle 'third' in ")
    r = client.post("/v2/repository/models/..%2Fetc/load", headers=ADMIN)
    assert r.status_code in (400, 404)


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "this call changes what the server serves: send the header 'Authorization: "
                  "Bearer <BNFOLD_ADMIN_TOKEN>'"),
        ({"Authorization": TOKEN}, 401,
         "the Authorization header must be 'Bearer <BNFOLD_ADMIN_TOKEN>'"),
        ({"Authorization": "Bearer "}, 401,  # was 403 'not the one': there is none
         "the Authorization header has no token after 'Bearer': send 'Bearer "
         "<BNFOLD_ADMIN_TOKEN>'"),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, 403,
         "the admin token is not the one this server was given"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403,
         "the admin token is not the one this server was given"),
    ],
)  # fmt: skip
def test_changes_need_the_right_bearer_token(serve, models_dir, headers, status, message, caplog):
    client = serve(models_dir, admin_token=TOKEN)
    with caplog.at_level(logging.DEBUG):
        for path in ("/v2/repository/models/digits/load", "/v2/repository/models/digits/unload",
                     "/v1/models/digits/reload"):  # fmt: skip
            r = client.post(path, headers=headers)
            assert r.status_code == status and r.json() == {"error": message}, path
            if status == 401:
                assert r.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/models/digits/reload", headers=ADMIN).status_code == 200
    assert TOKEN not in caplog.text  # never logged, whatever the level
    assert client.get("/v2/health/ready").status_code == 200  # nothing was unloaded


def test_without_a_token_changes_are_off_and_inference_stays_open(client, digits):
    for path in ("/v2/repository/models/digits/load", "/v1/models/digits/reload"):
        r = client.post(path, headers=ADMIN)
        assert r.status_code == 403
        assert r.json()["error"].startswith("model repository changes are off on this server")
    assert client.post("/v2/repository/index").status_code == 200  # reading stays open
    assert predict(client, "digits", digits[1]).status_code == 200


def test_a_short_token_is_refused_at_start_up(models_dir):
    with pytest.raises(ValidationError, match="Value error, must be at least 16 characters"):
        Settings(models_dir=models_dir, admin_token="short")
    assert TOKEN not in repr(Settings(models_dir=models_dir, admin_token=TOKEN))


def test_a_load_swaps_atomically_and_requests_in_flight_finish_on_the_old_sessions(
    serve, copy_bundle, digits
):
    bundle = copy_bundle("digits")
    client = serve(bundle.parent, admin_token=TOKEN)
    registry = client.app.state.core.registry
    old = registry.models["digits"]
    gate = Gate(old)  # the old sessions' runs wait here
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(predict, client, "digits", digits[5])
        while not gate.rows:  # admitted, inside the old sessions' run
            pass
        r = client.post("/v2/repository/models/digits/load", headers=ADMIN)
        assert r.status_code == 200
        new = registry.models["digits"]
        assert new is not old and new.ready  # swapped while the request is in flight
        gate.opened.set()
        r = in_flight.result(timeout=10)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "5"
    after = predict(client, "digits", digits[6])
    assert after.status_code == 200 and after.json()["predictions"][0]["label"] == "6"
    assert gate.rows == [1]  # only the request admitted before the swap ran on the old sessions


def test_a_bundle_that_fails_verification_is_not_loaded_and_the_old_one_stays(
    serve, copy_bundle, digits
):
    bundle = copy_bundle("digits")
    client = serve(bundle.parent, admin_token=TOKEN)
    (bundle / "unfolded.onnx").unlink()
    r = client.post("/v2/repository/models/digits/load", headers=ADMIN)
    assert r.status_code == 400
    assert r.json()["error"].startswith("bundle 'digits' failed verification, not loaded: ")
    assert r.json()["error"].endswith("; the version loaded before is still served")
    assert predict(client, "digits", digits[7]).status_code == 200
    shutil.rmtree(bundle)  # gone from disk: the served model answers until it is unloaded
    assert client.post("/v2/repository/models/digits/unload", headers=ADMIN).status_code == 200
    assert client.get("/v2/health/ready").status_code == 503  # nothing left to serve


def test_an_unloaded_model_is_named_as_unloaded_with_how_to_serve_it_again(serve, copy_bundle):
    """Once its only model was unloaded, readiness said 'no model bundles in DIR: run make
    train' and requests 'unknown model', though the bundle sits on disk; load brings it back."""
    bundle = copy_bundle("digits")
    client = serve(bundle.parent, admin_token=TOKEN)
    assert client.post("/v2/repository/models/digits/unload", headers=ADMIN).status_code == 200
    again = "POST /v2/repository/models/{model}/load serves it again"
    r = client.get("/v2/health/ready")
    assert r.status_code == 503
    assert r.json() == {"error": f"not ready: no model is served: digits unloaded ({again})"}
    for r in (
        client.post("/v1/models/digits/predict", content=b"x", headers=PNG),
        client.post("/v2/repository/models/digits/unload", headers=ADMIN),
        client.post("/v1/models/digits/reload", headers=ADMIN),
    ):
        assert r.status_code == 404
        assert r.json() == {"error": f"unknown model 'digits': it was unloaded ({again})"}
    assert client.post("/v2/repository/models/digits/load", headers=ADMIN).status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    r = client.post("/v1/models/nope/predict", content=b"x", headers=PNG)
    assert r.json() == {"error": "unknown model 'nope'; models served here: digits"}


def test_load_parameters_and_other_repositories_are_refused_not_ignored(serve, copy_bundle):
    """tritonclient's load_model(config=...) sends parameters.config; it was ignored (200, the
    bundle loaded as on disk). repository_name was ignored by the REST index (gRPC refused)."""
    bundle = copy_bundle("digits")
    client = serve(bundle.parent, admin_token=TOKEN)
    load = "/v2/repository/models/digits/load"
    for parameters, shown in (({"config": "{}"}, "['config']"),
                              ({"file:1/model.onnx": "AAAA", "config": "{}"},
                               "['config', 'file:1/model.onnx']")):  # fmt: skip
        r = client.post(load, headers=ADMIN, json={"parameters": parameters})
        assert r.status_code == 400
        assert r.json() == {"error": f"load parameters {shown} are not supported: a bundle loads "
                            "as it is on disk; write its files there (bnfold-train, bnfold "
                            "import), then load it without parameters"}  # fmt: skip
    assert client.post(load, headers=ADMIN, json={"parameters": {}}).status_code == 200
    assert client.post(load, headers=ADMIN).status_code == 200
    r = client.post("/v2/repository/index", json={"repository_name": "other"})
    assert r.status_code == 400
    assert r.json() == {"error": "unknown repository 'other': this server has one (its models "
                        "folder); leave repository_name empty"}  # fmt: skip
    assert client.post("/v2/repository/index", json={"repository_name": ""}).status_code == 200
    r = client.post(load, headers=ADMIN, content=b"[1]")
    assert r.status_code == 400
    assert r.json() == {"error": 'the load request body must be JSON: {} or {"parameters": {...}}'}
    r = client.post(load, headers=ADMIN, content=b'{"parameters": {"config": "{}"}}')
    assert r.status_code == 400  # no Content-Type (tritonclient.http sends none)
