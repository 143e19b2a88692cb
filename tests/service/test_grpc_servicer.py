"""service/grpc: the servicer and its codec in-process, over a real grpc.aio channel on a free
port of 127.0.0.1, with only the server's own generated code (service/grpc/inference_pb2*.py)
as the client: inference with raw and typed contents, metadata, and the status codes of
errors, with the same messages REST gives (service/errors.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.config import Settings
from service.grpc import inference_pb2 as pb
from service.grpc import inference_pb2_grpc as pb_grpc
from service.grpc.servicer import InferenceServicer, add_to_server
from service.process import Core
from tests.pinned import THREADS

Stub = pb_grpc.GRPCInferenceServiceStub


def served(models_dir: Path, calls: Callable[[Stub], Awaitable[object]]) -> object:
    """`calls(stub)` against the servicer on a started core, served on 127.0.0.1:<free port>."""

    async def main() -> object:
        core = Core.build(Settings(models_dir=models_dir, provider="cpu", threads=THREADS))
        await core.start()
        server = grpc.aio.server()
        add_to_server(InferenceServicer(core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await calls(Stub(channel))
        finally:
            await server.stop(None)
            await core.aclose()

    return asyncio.run(main())


def infer_request(x: np.ndarray, raw: bool = True, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    out = response.outputs[0]
    data = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    return data.reshape(list(out.shape))


def test_model_infer_with_raw_and_typed_contents_answers_the_model_logits(
    models_dir, digit_batch, direct, digits
):
    x = digit_batch[:4]

    async def calls(stub: Stub):
        raw = await stub.ModelInfer(infer_request(x, id="r1"))
        typed = await stub.ModelInfer(infer_request(x, raw=False))
        variant = pb.ModelInferRequest(model_name="digits")
        variant.CopyFrom(infer_request(x))
        variant.parameters["variant"].string_param = "unfolded"
        unfolded = await stub.ModelInfer(variant)
        return raw, typed, unfolded

    raw, typed, unfolded = served(models_dir, calls)
    assert (raw.model_name, raw.model_version, raw.id) == ("digits", "1", "r1")
    assert raw.parameters["variant"].string_param == "folded"
    assert [(o.name, o.datatype, list(o.shape)) for o in raw.outputs] == [
        ("logits", "FP32", [4, 10])
    ]
    assert np.array_equal(logits_of(raw), direct.logits(x))
    assert np.array_equal(logits_of(typed), logits_of(raw))
    assert list(logits_of(raw).argmax(1)) == [d.label for d in digits[:4]]
    assert unfolded.parameters["variant"].string_param == "unfolded"
    assert np.array_equal(logits_of(unfolded), direct.logits(x, "unfolded"))


def test_metadata_and_health(models_dir):
    async def calls(stub: Stub):
        return (
            await stub.ServerMetadata(pb.ServerMetadataRequest()),
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="digits")),
            await stub.ServerLive(pb.ServerLiveRequest()),
            await stub.ServerReady(pb.ServerReadyRequest()),
            await stub.ModelReady(pb.ModelReadyRequest(name="digits")),
        )

    server, model, live, ready, model_ready = served(models_dir, calls)
    assert server.name == "bnfold" and list(server.extensions) == ["model_repository"]
    assert (model.name, list(model.versions), model.platform) == (
        "digits",
        ["1"],
        "onnxruntime_onnx",
    )
    tensors = [(t.name, t.datatype, list(t.shape)) for t in [*model.inputs, *model.outputs]]
    assert tensors == [("input", "FP32", [-1, 1, 8, 8]), ("logits", "FP32", [-1, 10])]
    assert live.live and ready.ready and model_ready.ready


def _fp64(x: np.ndarray) -> pb.ModelInferRequest:
    request = infer_request(x)
    request.inputs[0].datatype = "FP64"
    return request


def _both(x: np.ndarray) -> pb.ModelInferRequest:
    request = infer_request(x)
    request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    return request


def _output(x: np.ndarray, name: str) -> pb.ModelInferRequest:
    request = infer_request(x)
    request.outputs.add(name=name)
    return request


ZEROS = np.zeros((1, 1, 8, 8), np.float32)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.ModelInferRequest(model_name="cats"), "NOT_FOUND",
         "unknown model 'cats'; models served here: digits"),
        (pb.ModelInferRequest(), "NOT_FOUND", "model_name is empty: name the model to run"),
        (infer_request(np.zeros((1, 1, 8, 7), np.float32)), "INVALID_ARGUMENT",
         "input 'input' must have shape ['N', 1, 8, 8], got [1, 1, 8, 7]"),
        (_fp64(ZEROS), "INVALID_ARGUMENT",
         "input 'input' has datatype FP64; this model takes FP32"),
        (_both(ZEROS), "INVALID_ARGUMENT",
         "input 'input' has both contents and raw_input_contents: pick one"),
        (_output(ZEROS, "probs"), "INVALID_ARGUMENT",
         "unknown output 'probs'; this model has outputs ['logits']"),
    ],
)  # fmt: skip
def test_errors_answer_their_status_code_and_message(models_dir, request_, code, message):
    async def calls(stub: Stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request_, metadata=[("x-request-id", "abc-1")])
        return info.value

    error = served(models_dir, calls)
    assert error.code() == grpc.StatusCode[code]
    assert error.details().startswith(message)
    assert ("x-request-id", "abc-1") in tuple(error.trailing_metadata() or ())


def test_unknown_model_metadata_is_not_found(models_dir):
    async def calls(stub: Stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="cats"))
        return info.value

    assert served(models_dir, calls).code() == grpc.StatusCode.NOT_FOUND
