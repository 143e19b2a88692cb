"""The serve image's dependency closure and command, proven without a Docker engine.

Builds the install the way the Dockerfile's serve stage does (fresh venv, the serve extra's
requirements with the same constraints, then the package without deps), checks torch is absent,
starts the image's CMD with the image's environment, waits for the image's HEALTHCHECK command
to succeed, and predicts a digit over HTTP.
"""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.deploy.dockerfile import exec_form, healthcheck_command, parse
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    req = venv.parent / "requirements.txt"
    req.write_text(
        subprocess.run(
            [py, REPO / "scripts" / "requirements_from_pyproject.py", "serve"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", req, "-c", REPO / "constraints.txt"], check=True)
    subprocess.run([*pip, "--no-deps", str(REPO)], check=True)
    return venv


def test_serve_install_has_no_torch(serve_venv):
    res = subprocess.run(
        [serve_venv / "bin" / "python", "-c", "import torch"], capture_output=True, text=True
    )
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr


def test_image_command_serves_and_passes_its_healthcheck(serve_venv, tmp_path):
    stage = parse(REPO / "Dockerfile")[-1]
    port = free_port()
    # The image's environment, with the port moved off 8000 and models at the repo's copy
    # (the image copies models/ to /app/models).
    env = {
        **os.environ,
        **stage.env(),
        "BNFOLD_PORT": str(port),
        "BNFOLD_MODELS_DIR": str(REPO / "models"),
        "BNFOLD_HOST": "127.0.0.1",
        "PATH": f"{serve_venv / 'bin'}:{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    cmd, health = exec_form(stage.last("CMD")), healthcheck_command(stage)
    # cwd outside the repo: the installed package must be what runs.
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(health, env=env, cwd=tmp_path).returncode != 0:
            assert proc.poll() is None, f"server exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "health check never passed"
            time.sleep(0.5)
        digits = load_digits()
        pixels = np.round(digits.images[:5] * 255 / 16).astype(np.uint8)
        files = []
        for i, p in enumerate(pixels):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="PNG")
            files.append(("files", (f"{i}.png", buf.getvalue(), "image/png")))
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/digits/predict", files=files, timeout=30)
        assert r.status_code == 200, r.text
        labels = [p["label"] for p in r.json()["predictions"]]
        # Independent reference: the bundle's ONNX run directly on the same preprocessing.
        x = ((pixels.astype(np.float32) / 255 - 0.3) / 0.4)[:, None]
        sess = ort.InferenceSession(str(REPO / "models" / "digits" / "folded.onnx"))
        assert labels == [str(i) for i in sess.run(None, {"input": x})[0].argmax(1)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
