"""The model repository extension end to end: tritonclient.http and tritonclient.grpc against the
real process, with the admin token (Bearer header over HTTP, `authorization` metadata over gRPC).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import serving

pytestmark = pytest.mark.e2e
TOKEN = "e2e-repository-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def urls(bundle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(http host:port, grpc host:port, models folder) of a server with the admin token on."""
    root = tmp_path_factory.mktemp("repo")
    models = root / "models"
    shutil.copytree(bundle_src, models / "digits")
    # One worker: an unload is seen by the next request (workers follow it within a poll).
    log = root / "server.log"
    with serving(models, log, log_level="info", admin_token=TOKEN, workers=1) as served:
        yield served.url.removeprefix("http://"), served.grpc, models
    proc = served.proc
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text
    assert TOKEN not in text  # never logged


def copy_as(models: Path, name: str) -> None:
    shutil.copytree(models / "digits", models / name)
    manifest = json.loads((models / name / "bundle.json").read_text())
    manifest["name"] = name
    (models / name / "bundle.json").write_text(json.dumps(manifest))


def zeros_input(module) -> list:
    inp = module.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    return [inp]


def test_tritonclient_http_index_load_unload(urls):
    http_url, _, models = urls
    client = thttp.InferenceServerClient(http_url)
    copy_as(models, "viahttp")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["digits"]["state"] == "READY"
    assert index["viahttp"]["reason"] == "not loaded"
    with pytest.raises(InferenceServerException, match="send the header 'Authorization"):
        client.load_model("viahttp")
    client.load_model("viahttp", headers=ADMIN)
    assert client.is_model_ready("viahttp")
    assert client.infer("viahttp", zeros_input(thttp)).as_numpy("logits").shape == (1, 10)
    client.unload_model("viahttp", headers=ADMIN)
    with pytest.raises(InferenceServerException, match="unknown model 'viahttp'"):
        client.infer("viahttp", zeros_input(thttp))
    client.close()


def test_tritonclient_grpc_index_load_unload_and_the_token_codes(urls):
    _, grpc_url, models = urls
    client = tgrpc.InferenceServerClient(grpc_url)
    copy_as(models, "viagrpc")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["digits"].state == "READY" and index["viagrpc"].reason == "not loaded"
    wrong = {"authorization": "Bearer not-the-token-at-all"}
    for headers, code in [({}, "UNAUTHENTICATED"), (wrong, "PERMISSION_DENIED")]:
        with pytest.raises(InferenceServerException) as info:
            client.load_model("viagrpc", headers=headers)
        assert info.value.status() == f"StatusCode.{code}"
    client.load_model("viagrpc", headers={"authorization": f"Bearer {TOKEN}"})
    assert client.is_model_ready("viagrpc")
    assert client.infer("viagrpc", zeros_input(tgrpc)).as_numpy("logits").shape == (1, 10)
    client.unload_model("viagrpc", headers={"authorization": f"Bearer {TOKEN}"})
    with pytest.raises(InferenceServerException) as info:
        client.infer("viagrpc", zeros_input(tgrpc))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_server_ready()  # digits still served
    client.close()
