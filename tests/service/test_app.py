"""service/app.py: lifespan loading and readiness, the body limit, and the error handlers."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import anyio
import pytest


def test_a_failed_bundle_is_not_served_and_the_server_is_not_ready(serve, copy_bundle, digits):
    good = copy_bundle("digits")
    (copy_bundle("broken") / "unfolded.onnx").write_bytes(b"tampered")
    client = serve(good.parent)
    r = client.get("/v2/health/ready")
    assert r.status_code == 503
    assert r.json()["error"].startswith("not ready: bundles failed to load: broken: ")
    assert "sha256 mismatch for the unfolded model" in r.json()["error"]
    # The good bundle is still served.
    assert client.get("/v2/models/digits/ready").status_code == 200
    r = client.post("/v1/models/digits/predict", content=digits[0].png,
                    headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 200
    # The broken one says why, everywhere it is asked about.
    r = client.get("/v2/models/broken/ready")
    assert r.status_code == 503 and r.json()["error"].startswith("model 'broken' is not ready: ")
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["digits"]["status"] == "ready" and listed["broken"]["status"] == "failed"
    assert "sha256 mismatch" in listed["broken"]["error"]
    detail = client.get("/v1/models/broken").json()
    assert detail["status"] == "failed" and detail["providers"] == []
    r = client.post("/v2/models/broken/infer", json={"inputs": []})
    assert r.status_code == 503 and "sha256 mismatch" in r.json()["error"]


def test_an_empty_models_folder_is_not_ready(serve, tmp_path):
    client = serve(tmp_path)
    r = client.get("/v2/health/ready")
    assert r.status_code == 503
    assert r.json() == {"error": f"not ready: no model bundles in {tmp_path}: run `make train` "
                                 "or set BNFOLD_MODELS_DIR"}  # fmt: skip
    assert client.get("/v2/health/live").status_code == 200


LIMIT = 4096


def test_body_over_the_limit_is_413_on_content_length(serve, models_dir):
    client = serve(models_dir, max_body_bytes=LIMIT)
    r = client.post("/v1/models/digits/predict", content=b"\0" * (LIMIT + 1),
                    headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 413
    assert r.json() == {"error": f"request body is {LIMIT + 1} bytes, over the limit of {LIMIT} "
                                 "bytes (BNFOLD_MAX_BODY_BYTES)"}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/models/digits/predict", "image/png"),
        ("/v1/models/digits/predict", "multipart/form-data; boundary=x"),
        ("/v2/models/digits/infer", "application/json"),
    ],
)
def test_streamed_body_over_the_limit_is_413(serve, models_dir, path, content_type):
    """No Content-Length (chunked upload): the bytes are counted as they arrive."""
    client = serve(models_dir, max_body_bytes=LIMIT)

    def chunks():
        for _ in range(8):
            yield b"--x\r\n" + b"\0" * 1024

    r = client.post(path, content=chunks(), headers={"content-type": content_type})
    assert r.status_code == 413
    assert r.json() == {"error": f"request body is more than {LIMIT} bytes, over the limit of "
                                 f"{LIMIT} bytes (BNFOLD_MAX_BODY_BYTES)"}  # fmt: skip


class FailingOnceRunner:
    """onnxruntime failing mid-request, once; otherwise each request alone in a thread."""

    failed = False

    async def logits(self, model, variant, x):
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected onnxruntime failure")
        return await anyio.to_thread.run_sync(model.run, variant, x)

    async def aclose(self) -> None:
        return None


def test_an_unexpected_error_is_logged_and_answered_500_then_serving_goes_on(
    serve, models_dir, digits, caplog
):
    client = serve(models_dir, runner=FailingOnceRunner())
    kwargs = {"content": digits[0].png, "headers": {"content-type": "image/png"}}
    with caplog.at_level(logging.ERROR, logger="service.api.middleware"):
        r = client.post("/v1/models/digits/predict", **kwargs)
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    record = caplog.records[-1]
    assert "POST /v1/models/digits/predict" in record.getMessage()
    assert record.exc_info[1].args == ("injected onnxruntime failure",)  # traceback kept
    assert client.post("/v1/models/digits/predict", **kwargs).status_code == 200


def test_unknown_routes_and_methods(client):
    r = client.get("/v3/anything")
    assert r.status_code == 404
    assert r.json() == {"error": "no route GET /v3/anything; the API is listed at /docs"}
    r = client.delete("/v2/health/live")
    assert r.status_code == 405
    assert r.json() == {"error": "method DELETE not allowed on /v2/health/live"}


def test_docs_and_openapi_document_bodies_examples_and_errors(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    content = infer["requestBody"]["content"]
    assert content["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"
    }
    assert "application/octet-stream" in content
    assert set(infer["responses"]) == {"200", "400", "404", "413", "415", "503", "504"}
    predict = spec["paths"]["/v1/models/{model}/predict"]["post"]
    assert {"multipart/form-data", "image/png"} <= set(predict["requestBody"]["content"])
    schemas = spec["components"]["schemas"]
    assert schemas["InferenceRequest"]["examples"][0]["parameters"] == {"variant": "folded"}
    assert "examples" in schemas["PredictResponse"] and "HTTPValidationError" not in schemas


def test_the_service_never_imports_torch(models_dir, digits):
    """The serve install has no torch: loading and answering must not need it."""
    code = textwrap.dedent(f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
        from service.app import create_app
        from service.config import Settings
        with TestClient(create_app(Settings(models_dir={str(models_dir)!r}))) as c:
            r = c.post("/v1/models/digits/compare", content={digits[0].png!r},
                       headers={{"content-type": "image/png"}})
            assert r.status_code == 200, r.text
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
