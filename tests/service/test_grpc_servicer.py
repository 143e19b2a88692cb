"""service/grpc: the servicer and its codec in-process, over a real grpc.aio channel on a free
port of 127.0.0.1, with only the server's own generated code (service/grpc/inference_pb2*.py)
as the client: inference with raw and typed contents, metadata, and the status codes of
errors, with the same messages REST gives (service/errors.py).

Server and client run in one child process of this module's own: tritonclient's generated code
(the client of the e2e tests, in this same pytest process) defines the same `inference.*`
protobuf symbols, and one process's descriptor pool holds only one of the two. What comes back
from the child is plain data (strings, tuples, arrays); the assertions are made here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.pinned import THREADS


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()  # started here: the process belongs to this module's scope
        yield pool


def served(child: ProcessPoolExecutor, models_dir: Path, calls: str, *args) -> object:
    """`calls(stub, pb, *args)` (a coroutine function of this module) in the child, against
    the servicer on a started core served on 127.0.0.1:<free port>; what it returns."""
    return child.submit(_serve, str(models_dir), calls, *args).result(timeout=180)


def _serve(models_dir: str, calls: str, *args) -> object:
    import grpc

    from service.config import Settings
    from service.grpc import inference_pb2 as pb
    from service.grpc import inference_pb2_grpc as pb_grpc
    from service.grpc.servicer import InferenceServicer, add_to_server
    from service.process import Core

    async def main() -> object:
        core = Core.build(Settings(models_dir=models_dir, provider="cpu", threads=THREADS))
        await core.start()
        server = grpc.aio.server()
        add_to_server(InferenceServicer(core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                return await globals()[calls](stub, pb, *args)
        finally:
            await server.stop(None)
            await core.aclose()

    return asyncio.run(main())


def _infer_request(pb, x: np.ndarray, raw: bool = True, **fields):
    request = pb.ModelInferRequest(model_name="digits", **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def _answer(response) -> dict:
    outputs = [(o.name, o.datatype, list(o.shape)) for o in response.outputs]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    return {
        "header": (response.model_name, response.model_version, response.id),
        "variant": response.parameters["variant"].string_param,
        "outputs": outputs,
        "logits": logits.reshape(outputs[0][2]),
    }


async def _infer_calls(stub, pb, x: np.ndarray) -> dict:
    unfolded = _infer_request(pb, x)
    unfolded.parameters["variant"].string_param = "unfolded"
    return {
        "raw": _answer(await stub.ModelInfer(_infer_request(pb, x, id="r1"))),
        "typed": _answer(await stub.ModelInfer(_infer_request(pb, x, raw=False))),
        "unfolded": _answer(await stub.ModelInfer(unfolded)),
    }


def test_model_infer_with_raw_and_typed_contents_answers_the_model_logits(
    child, models_dir, digit_batch, direct, digits
):
    x = digit_batch[:4]
    answers = served(child, models_dir, "_infer_calls", x)
    raw, typed, unfolded = answers["raw"], answers["typed"], answers["unfolded"]
    assert raw["header"] == ("digits", "1", "r1") and raw["variant"] == "folded"
    assert raw["outputs"] == [("logits", "FP32", [4, 10])]
    assert np.array_equal(raw["logits"], direct.logits(x))
    assert np.array_equal(typed["logits"], raw["logits"])
    assert list(raw["logits"].argmax(1)) == [d.label for d in digits[:4]]
    assert unfolded["variant"] == "unfolded"
    assert np.array_equal(unfolded["logits"], direct.logits(x, "unfolded"))


async def _metadata_calls(stub, pb) -> dict:
    server = await stub.ServerMetadata(pb.ServerMetadataRequest())
    model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    tensors = [(t.name, t.datatype, list(t.shape)) for t in [*model.inputs, *model.outputs]]
    return {
        "server": (server.name, list(server.extensions)),
        "model": (model.name, list(model.versions), model.platform, tensors),
        "live": (await stub.ServerLive(pb.ServerLiveRequest())).live,
        "ready": (await stub.ServerReady(pb.ServerReadyRequest())).ready,
        "model_ready": (await stub.ModelReady(pb.ModelReadyRequest(name="digits"))).ready,
    }


def test_metadata_and_health(child, models_dir):
    answers = served(child, models_dir, "_metadata_calls")
    assert answers["server"] == (
        "bnfold",
        ["model_repository", "classification", "statistics", "model_configuration"],
    )
    assert answers["model"] == (
        "digits",
        ["1"],
        "onnxruntime_onnx",
        [("input", "FP32", [-1, 1, 8, 8]), ("logits", "FP32", [-1, 10])],
    )
    assert answers["live"] and answers["ready"] and answers["model_ready"]


def _bad_request(pb, case: str):
    zeros = np.zeros((1, 1, 8, 8), np.float32)
    request = _infer_request(pb, zeros)
    if case == "unknown model":
        request.model_name = "cats"
    elif case == "no model name":
        request.model_name = ""
    elif case == "wrong shape":
        request = _infer_request(pb, np.zeros((1, 1, 8, 7), np.float32))
    elif case == "wrong datatype":
        request.inputs[0].datatype = "FP64"
    elif case == "raw and typed contents":
        request.inputs[0].contents.fp32_contents.extend(zeros.ravel().tolist())
    elif case == "unknown output":
        request.outputs.add(name="probs")
    return request


async def _error_calls(stub, pb, cases: list[str], method: str = "ModelInfer") -> list:
    import grpc

    answers = []
    for case in cases:
        request = (
            _bad_request(pb, case) if method == "ModelInfer" else pb.ModelMetadataRequest(name=case)
        )
        try:
            await getattr(stub, method)(request, metadata=[("x-request-id", "abc-1")])
        except grpc.aio.AioRpcError as exc:
            trailing = tuple(exc.trailing_metadata() or ())
            answers.append((exc.code().name, exc.details(), ("x-request-id", "abc-1") in trailing))
        else:
            answers.append(("OK", "", False))
    return answers


ERRORS = {
    "unknown model": ("NOT_FOUND", "unknown model 'cats'; models served here: digits"),
    "no model name": ("NOT_FOUND", "model_name is empty: name the model to run"),
    "wrong shape": ("INVALID_ARGUMENT",
                    "input 'input' must have shape ['N', 1, 8, 8], got [1, 1, 8, 7]"),
    "wrong datatype": ("INVALID_ARGUMENT",
                       "input 'input' has datatype FP64; this model takes FP32"),
    "raw and typed contents": ("INVALID_ARGUMENT",
                               "input 'input' has both contents and raw_input_contents: pick one"),
    "unknown output": ("INVALID_ARGUMENT",
                       "unknown output 'probs'; this model has outputs ['logits']"),
}  # fmt: skip


def test_errors_answer_their_status_code_and_message_with_the_request_id(child, models_dir):
    answers = served(child, models_dir, "_error_calls", list(ERRORS))
    for (case, (code, message)), (got_code, details, has_id) in zip(
        ERRORS.items(), answers, strict=True
    ):
        assert (case, got_code) == (case, code)
        assert details.startswith(message), (case, details)
        assert has_id, case


def test_unknown_model_metadata_is_not_found(child, models_dir):
    [(code, details, _)] = served(child, models_dir, "_error_calls", ["cats"], "ModelMetadata")
    assert code == "NOT_FOUND" and details.startswith("unknown model 'cats'")
