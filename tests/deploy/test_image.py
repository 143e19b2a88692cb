"""The serve image, built and run on a real Docker engine.

Builds the Dockerfile's `serve` target with BuildKit on the local stand-in for python:3.11-slim
(scripts/docker_base_image.sh), runs it with host networking bound to 127.0.0.1, and checks what
a user of the image relies on: the HEALTHCHECK turns healthy, the server runs as uid 10001
without torch, every example digit is classified right over HTTP, and `docker stop` while
requests are in flight answers all of them and exits 0.

The engine comes from scripts/docker_engine.sh (`make system-deps` runs it). When the engine or
the base image is missing the tests fail and say which script to run: a skip would let
`make test` pass without the image ever being built.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("BNFOLD_BASE_IMAGE", "bnfold-base/python:3.11-slim")
IMAGE = "bnfold-serve:e2e"
PREDICT = "/v1/models/digits/predict"
EXAMPLES = {n: (REPO / "examples" / f"digit-{n}.png").read_bytes() for n in range(10)}
# A cold build downloads the serve wheels (about 150 MB); the per-test default is 300 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the docker CLI; with `check`, fail the test with its stderr when it fails."""
    try:
        res = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        pytest.fail("no docker CLI on PATH: run `bash scripts/docker_engine.sh` as root")
    if check and res.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} failed ({res.returncode}): {res.stderr[-4000:]}")
    return res


def built_stages(log: str) -> set[str]:
    """Stage names in a BuildKit plain-progress log: `#8 [serve-deps 1/3] COPY ...`."""
    return set(re.findall(r"^#\d+ \[([\w.-]+) \d+/\d+\]", log, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def image() -> str:
    """The serve image, built with BuildKit so that only the stages `serve` needs are built."""
    info = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    if info.returncode != 0:
        pytest.fail(
            f"the Docker engine does not answer ({info.stderr.strip()}): "
            "run `bash scripts/docker_engine.sh` as root (make system-deps does)"
        )
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.fail(
            f"base image {BASE_IMAGE} is missing: run `bash scripts/docker_base_image.sh` "
            "(make system-deps does), or set BNFOLD_BASE_IMAGE to a python:3.11-slim image"
        )
    # DOCKER_BUILDKIT=1: without BuildKit the CLI would fall back to the legacy builder, which
    # builds every stage before the target, the train stage's torch download included.
    cmd = ["docker", "build", "--network", "host", "--progress", "plain"]
    cmd += ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--target", "serve", "-t", IMAGE, "."]
    started = time.monotonic()
    res = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    if res.returncode != 0:
        pytest.fail(f"docker build failed ({res.returncode}):\n{res.stderr[-6000:]}")
    stages = built_stages(res.stderr)
    assert "serve" in stages and "serve-deps" in stages, f"unexpected build log: {stages}"
    assert not stages & {"train", "serve-gpu"}, f"stages outside the serve target ran: {stages}"
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nbuilt {IMAGE} in {time.monotonic() - started:.1f} s, {size / 1e6:.0f} MB")
    return IMAGE


def state(name: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)


def wait_healthy(name: str, timeout: float = 120) -> None:
    """Until the image's HEALTHCHECK reports healthy; fail with the logs if it exits or never is."""
    deadline = time.monotonic() + timeout
    while True:
        st = state(name)
        health = st.get("Health", {}).get("Status")
        if health == "healthy":
            return
        if st["Status"] != "running" or health == "unhealthy" or time.monotonic() > deadline:
            logs = docker("logs", name, check=False)
            pytest.fail(
                f"container {st['Status']}, health {health}, exit code {st['ExitCode']}:\n"
                f"{(logs.stdout + logs.stderr)[-4000:]}"
            )
        time.sleep(0.5)


GRPC_PORT: dict[str, int] = {}


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, int]]:
    """A running, healthy serve container on free loopback ports: (name, REST port); its gRPC
    port is in GRPC_PORT (host networking: the image's 8000/8001 could be taken here)."""
    name, port = f"bnfold-e2e-{uuid.uuid4().hex[:8]}", free_port()
    GRPC_PORT[name] = free_port()
    env = ["-e", "BNFOLD_HOST=127.0.0.1", "-e", f"BNFOLD_PORT={port}",
           "-e", f"BNFOLD_GRPC_PORT={GRPC_PORT[name]}"]  # fmt: skip
    docker("run", "-d", "--name", name, "--network", "host", *env, image)
    try:
        wait_healthy(name)
        yield name, port
    finally:
        docker("rm", "-f", name, check=False)


def predict(conn: http.client.HTTPConnection, png: bytes) -> tuple[int, str]:
    """POST one raw PNG; (status, top label) or (status, error body)."""
    conn.request("POST", PREDICT, body=png, headers={"Content-Type": "image/png"})
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        return resp.status, body.decode(errors="replace")
    return resp.status, json.loads(body)["predictions"][0]["label"]


def test_healthy_non_root_and_without_torch(container):
    name, _ = container
    assert state(name)["Health"]["Status"] == "healthy"
    assert docker("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip() == (
        "10001"
    )
    # The server process itself (PID 1), not just what `docker exec` runs as.
    uid_line = next(
        line
        for line in docker("exec", name, "cat", "/proc/1/status").stdout.splitlines()
        if line.startswith("Uid:")
    )
    assert uid_line.split()[1:] == ["10001"] * 4  # real, effective, saved, filesystem
    res = docker("exec", name, "python", "-c", "import torch", check=False)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr


def test_grpc_answers_from_the_container(container):
    """The image's second protocol: gRPC health and the KServe ServerReady/ModelReady RPCs."""
    import tritonclient.grpc as grpcclient

    name, _ = container
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT[name]}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.get_model_metadata("digits").name == "digits"
    finally:
        client.close()


def test_predicts_every_example_digit(container):
    _, port = container
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        labels = {n: predict(conn, png) for n, png in EXAMPLES.items()}
    finally:
        conn.close()
    assert labels == {n: (200, str(n)) for n in EXAMPLES}


def open_half_sent_predict(port: int, png: bytes) -> http.client.HTTPConnection:
    """A keep-alive connection the server has provably accepted (one request answered on it),
    then a predict whose headers and first half of the body are sent: in flight."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v2/health/live")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.putrequest("POST", PREDICT)
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(len(png)))
    conn.endheaders()
    conn.send(png[: len(png) // 2])
    return conn


def wait_refused(port: int, timeout: float = 30) -> None:
    """Until a new connection is refused: the server got SIGTERM and closed its listener."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    pytest.fail(f"the listener on port {port} was still open {timeout:.0f} s after docker stop")


def test_docker_stop_answers_requests_in_flight_and_exits_0(container):
    """Last in the module: stops the container."""
    name, port = container
    digits = [3, 7, 0, 9, 4, 1]
    conns = [open_half_sent_predict(port, EXAMPLES[n]) for n in digits]
    # -t 30: SIGKILL only after 30 s, past the server's drain timeout; a kill reads as 137.
    stop = subprocess.Popen(["docker", "stop", "-t", "30", name], stdout=subprocess.DEVNULL)
    try:
        wait_refused(port)
        answers = []
        for n, conn in zip(digits, conns, strict=True):
            png = EXAMPLES[n]
            conn.send(png[len(png) // 2 :])
            resp = conn.getresponse()
            body = resp.read()
            label = json.loads(body)["predictions"][0]["label"] if resp.status == 200 else body
            answers.append((resp.status, label, resp.getheader("Connection")))
            conn.close()
        assert stop.wait(timeout=60) == 0
    finally:
        if stop.poll() is None:
            stop.kill()
    assert answers == [(200, str(n), "close") for n in digits]
    st = state(name)
    assert (st["Status"], st["ExitCode"], st["OOMKilled"]) == ("exited", 0, False)
