"""Faults: onnxruntime failing mid-request, and a bundle file corrupted after start-up (the
corrupted file is refused by reload and never served; the verified sessions go on).

In-process (TestClient over the real app, batching on): the failure is injected where it would
happen, in the session's `run`, with onnxruntime's own exception type.
"""

from __future__ import annotations

import logging

from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from tests.load.conftest import PREDICT

PNG = {"content-type": "image/png"}


class FailingSession:
    """An onnxruntime session that raises on its next `fail` runs, then runs for real."""

    def __init__(self, session, fail: int = 1) -> None:
        self.session, self.fail = session, fail

    def run(self, *args, **kwargs):
        if self.fail:
            self.fail -= 1
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
        return self.session.run(*args, **kwargs)


def test_onnxruntime_failing_mid_request_is_500_and_the_next_requests_are_served(
    serve, models_dir, digits, caplog
):
    client = serve(models_dir)
    model = client.app.state.core.registry.models["digits"]
    model.sessions["folded"] = FailingSession(model.sessions["folded"])
    with caplog.at_level(logging.ERROR, logger="service.api.middleware"):
        r = client.post(PREDICT, content=digits[3].png, headers=PNG)
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    assert "RUNTIME_EXCEPTION : injected" in caplog.text  # logged with its traceback
    for d in digits[:5]:  # the same lane, the same sessions: serving goes on
        r = client.post(PREDICT, content=d.png, headers=PNG)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == str(d.label)
    assert client.get("/v2/health/ready").status_code == 200


def corrupt(path) -> bytes:
    """Flip bytes in the middle of the file, size unchanged; returns the original bytes."""
    original = path.read_bytes()
    middle = len(original) // 2
    path.write_bytes(original[:middle] + bytes(b ^ 0xFF for b in original[middle:middle + 64])
                     + original[middle + 64:])  # fmt: skip
    return original


TOKEN = "a-test-admin-token-of-32-chars!!"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def test_a_bundle_corrupted_after_start_up_is_refused_by_reload_and_never_served(
    serve, copy_bundle, digits
):
    bundle = copy_bundle("digits")
    client = serve(bundle.parent, admin_token=TOKEN)
    before = client.post(PREDICT, content=digits[0].png, headers=PNG)
    assert before.status_code == 200
    original = corrupt(bundle / "folded.onnx")
    r = client.post("/v1/models/digits/reload", headers=ADMIN)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error.startswith("bundle 'digits' failed verification, not loaded: ")
    assert "sha256 mismatch for the folded model" in error and "the file was modified" in error
    assert error.endswith("; the version loaded before is still served")
    # The corrupted file is never served: the sessions verified at start-up go on answering.
    r = client.post(PREDICT, content=digits[0].png, headers=PNG)
    assert r.status_code == 200 and r.json() == before.json()
    assert client.get("/v2/health/ready").status_code == 200
    # Put right, a reload swaps in sessions made from the file on disk.
    (bundle / "folded.onnx").write_bytes(original)
    old = client.app.state.core.registry.models["digits"]
    r = client.post("/v1/models/digits/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert client.app.state.core.registry.models["digits"] is not old
    r = client.post(PREDICT, content=digits[0].png, headers=PNG)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "0"


def test_reloading_an_unknown_model_is_404(serve, models_dir):
    client = serve(models_dir, admin_token=TOKEN)
    r = client.post("/v1/models/cats/reload", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"].startswith("unknown model 'cats'")
