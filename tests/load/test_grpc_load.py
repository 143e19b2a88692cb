"""gRPC under load on the real process: a full queue, deadlines, and SIGTERM with calls in flight.

Every onnxruntime run takes RUN_S (slow_serve.py), so calls are still queued or running when
the test acts. Calls use tritonclient's protobuf messages and stub, so this process never
imports the server's own generated modules.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.conftest import REPO
from tests.load.conftest import PREDICT, png_request, wait_for
from tests.load.test_shutdown import queue_depth
from tests.servers import free_port

pytestmark = pytest.mark.e2e
RUN_S = 1.0


def infer_request(x: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(shape)


def test_a_full_queue_is_unavailable_with_retry_after_and_a_deadline_is_exceeded(
    start_server, digit_batch
):
    server = start_server(slow_run_s=RUN_S, max_queue_size=2, max_batch_size=1)
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = [stub.ModelInfer.future(infer_request(digit_batch[i : i + 1])) for i in range(2)]
        wait_for(lambda: queue_depth(server.metrics()) == 2)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request(digit_batch[2:3]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == ("model 'digits' is busy: 2 requests already queued "
                                        "(BNFOLD_MAX_QUEUE_SIZE); retry after 1 s")  # fmt: skip
        assert ("retry-after", "1") in info.value.trailing_metadata()
        assert [f.result(timeout=30).id for f in held] == ["", ""]  # both answered
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:  # the client's deadline, shorter than a run
            stub.ModelInfer(infer_request(digit_batch[:1]), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < RUN_S
    text = server.metrics()
    assert 'code="UNAVAILABLE",endpoint="ModelInfer",model="digits",protocol="grpc"' in text


def test_sigterm_answers_every_grpc_call_and_rest_request_received_then_exits_0(
    start_server, digits, digit_batch, direct
):
    server = start_server(slow_run_s=RUN_S, drain_timeout_s=20)
    n_grpc, n_rest = 8, 4
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(infer_request(digit_batch[i : i + 1], f"g{i}"))
                 for i in range(n_grpc)]  # fmt: skip
        with httpx.Client(timeout=30) as http, cf.ThreadPoolExecutor(n_rest) as pool:
            rest = [pool.submit(http.post, f"{server.url}{PREDICT}",
                                **png_request(digits, [i])) for i in range(n_rest)]  # fmt: skip
            wait_for(lambda: queue_depth(server.metrics()) == n_grpc + n_rest)
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=30) for f in calls]
            rest_answers = [f.result(timeout=30) for f in rest]
        code = server.proc.wait(timeout=30)
    for i, response in enumerate(answers):
        assert response.id == f"g{i}"
        assert np.array_equal(logits_of(response), direct.logits(digit_batch[i : i + 1]))
    assert [r.status_code for r in rest_answers] == [200] * n_rest
    assert [r.json()["predictions"][0]["label"] for r in rest_answers] == ["0", "1", "2", "3"]
    assert code == 0, server.log.read_text()
    assert time.monotonic() - sent < 20
    with grpc.insecure_channel(server.grpc) as channel:  # the gRPC port is closed
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_grpc_port_in_use_fails_start_up_with_one_line(models_dir, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {"BNFOLD_PROVIDER": "cpu", "BNFOLD_MODELS_DIR": str(models_dir),
           "BNFOLD_GRPC_PORT": str(port), "BNFOLD_LOG_LEVEL": "warning"}  # fmt: skip
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(free_port())]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    taken.close()
    assert done.returncode == 3
    assert f"gRPC port {port} cannot be bound" in done.stderr
    assert "Traceback" not in done.stderr
