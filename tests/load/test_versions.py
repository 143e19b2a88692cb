"""`BNFOLD_WORKERS=2`: after a load answered 200, every worker serves the version it verified.

Real servers (tests/load/gated_serve.py: the workers apply another worker's change only once a
gate file exists, so the test changes the models folder at a known point). Which worker
answered is read from the JSON access lines: a load verified by one worker reaches the other
as that verified copy even when the files on disk changed in between; a worker killed and
restarted serves what was last loaded, not what the folder holds now.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.load.conftest import wait_for
from tests.load.test_workers import access_pids, worker_pids
from tests.pinned import THREADS
from tests.servers import free_port, stop, wait_ready

pytestmark = pytest.mark.e2e
TOKEN = "versions-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log


@pytest.fixture
def models(models_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(models_dir, tmp_path / "models")
    set_version(tmp_path / "models", "100")
    return tmp_path / "models"


@pytest.fixture
def server(models: Path, tmp_path: Path):
    """Two workers over `models`; the state folder under tmp_path/tmp; the gate tmp_path/gate."""
    (tmp_path / "tmp").mkdir()
    port = free_port()
    settings = {"provider": "cpu", "models_dir": models, "grpc_port": free_port(),
                "workers": 2, "threads": THREADS, "log_format": "json", "log_level": "info",
                "admin_token": TOKEN, "request_timeout_s": 120}  # fmt: skip
    env = {**os.environ, **{f"BNFOLD_{k.upper()}": str(v) for k, v in settings.items()},
           "TMPDIR": str(tmp_path / "tmp"), "GATED_SERVE_GATE": str(tmp_path / "gate")}  # fmt: skip
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "tests.load.gated_serve", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log, timeout=180)
        yield Server(proc, url, log)
    finally:
        if proc.poll() is None:
            stop(proc, timeout=30)


def set_version(models: Path, version: str) -> None:
    """A new version on disk (bundle.json only: the ONNX files keep their checksums)."""
    path = models / "digits" / "bundle.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    path.write_text(json.dumps(manifest))


def versions_by_worker(server: Server, tag: str) -> dict[int, set[str]]:
    """Metadata asked on new connections until two workers answered: pid -> versions seen."""
    answers: dict[str, str] = {}
    seen: dict[int, set[str]] = {}
    while len(seen) < 2:
        assert len(answers) < 400, "one worker answered every request"
        rid = f"{tag}-{len(answers)}"
        reply = httpx.get(
            f"{server.url}/v2/models/digits", headers={"X-Request-ID": rid}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        answers[rid] = ",".join(reply.json()["versions"])
        pids = access_pids(server.log.read_text())  # a line may follow its answer
        seen = {}
        for r, version in answers.items():
            if r in pids:
                seen.setdefault(pids[r], set()).add(version)
    return seen


def load(server: Server) -> httpx.Response:
    url = f"{server.url}/v2/repository/models/digits/load"
    return httpx.post(url, headers=AUTH, timeout=180)


def test_a_load_reaches_the_other_worker_as_verified_even_if_the_files_change(
    server, models, tmp_path
):
    set_version(models, "201")
    answer: list[httpx.Response] = []
    loading = threading.Thread(target=lambda: answer.append(load(server)))
    loading.start()
    ops = tmp_path / "tmp"
    wait_for(lambda: any(ops.glob("bnfold-workers-*/cluster/ops/*.json")), timeout=120)
    set_version(models, "202")  # after one worker verified 201, before the other applies it
    (tmp_path / "gate").touch()
    loading.join(timeout=240)
    assert answer and answer[0].status_code == 200, answer and answer[0].text
    assert answer[0].json()["version"] == "201"
    seen = versions_by_worker(server, "after-load")
    assert all(v == {"201"} for v in seen.values()), seen
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200


def test_a_restarted_worker_serves_the_last_loaded_version_not_the_folder(server, models, tmp_path):
    (tmp_path / "gate").touch()  # the workers apply each other's changes at once
    set_version(models, "101")
    assert load(server).status_code == 200
    set_version(models, "102")  # on disk, never loaded
    victim = min(worker_pids(server))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"(pid {victim}) was killed by SIGKILL" in server.log.read_text(), 120)
    wait_for(lambda: len(worker_pids(server)) == 3, timeout=120)

    def ready() -> bool:
        try:
            return httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, timeout=180)
    seen = versions_by_worker(server, "after-restart")
    assert victim not in seen
    assert all(v == {"101"} for v in seen.values()), seen
