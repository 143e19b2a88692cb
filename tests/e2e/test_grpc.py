"""End to end over gRPC: the real `bnfold-serve` process, called with tritonclient.grpc.

Reference: the bundle's ONNX run directly by onnxruntime on the same tensor. Requests go one at
a time, so the batcher runs each alone, and the logits must match bit for bit. The hostile
corpus uses tritonclient's own protobuf messages and stub (this process never imports the
server's generated modules: both define the `inference` package in protobuf's default pool),
and checks each mistake's gRPC code, its message (the REST message, where REST can make the
same mistake), and that the server goes on serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import SERVED_VARIANTS, DirectOnnx
from tests.e2e.conftest import MAX_BODY_BYTES, serving
from tests.pinned import THREADS, pinned_direct

pytestmark = pytest.mark.e2e
INFER = "/v2/models/digits/infer"


class Server:
    def __init__(self, url: str, grpc_url: str) -> None:
        self.url, self.grpc_url = url, grpc_url


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """REST and gRPC of one process; stopped with SIGTERM after the module, exiting 0."""
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    settings = {"max_body_bytes": MAX_BODY_BYTES, "workers": 1, "threads": THREADS}
    with serving(models_dir, log, **settings) as served:
        yield Server(served.url, served.grpc)
    proc = served.proc
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{log.read_text()}"
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def direct(bundle_src: Path) -> DirectOnnx:
    """The reference at the server's intra-op thread count (tests/pinned.py)."""
    return pinned_direct(bundle_src)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc_url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def triton_input(x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_live_ready_model_ready_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "bnfold" and server["version"]
    for call in (lambda: client.is_model_ready("cats"), lambda: client.get_model_metadata("cats")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert info.value.message() == "unknown model 'cats'; models served here: digits"
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        client.get_model_metadata("digits", "7")


@pytest.mark.parametrize("variant", ["folded", "unfolded"])
@pytest.mark.parametrize("rows", [1, 8])
def test_infer_equals_onnxruntime_bit_for_bit(client, direct, digit_batch, variant, rows):
    x = digit_batch[:rows]
    result = client.infer("digits", [triton_input(x)], request_id=f"g-{rows}",
                          parameters={"variant": variant})  # fmt: skip
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (rows, 10)
    assert np.array_equal(logits, direct.logits(x, variant))
    response = result.get_response()
    assert response.id == f"g-{rows}" and response.model_version == "1"
    assert response.parameters["variant"].string_param == variant


def test_typed_contents_in_raw_contents_out(stub, direct, digit_batch):
    x = digit_batch[3:7]
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="logits")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["logits"] and response.outputs[0].shape == [4, 10]
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(4, 10)
    assert np.array_equal(logits, direct.logits(x))


def test_health_checking_and_reflection(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(services)


def raw_request(x: np.ndarray | None = None, **fields) -> pb.ModelInferRequest:
    """A ModelInferRequest for x (default one zero digit), raw bytes, with fields overridden."""
    x = np.zeros((1, 1, 8, 8), np.float32) if x is None else x
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    tensor.update(fields.pop("tensor", {}))
    request = pb.ModelInferRequest(model_name=fields.pop("model_name", "digits"), **fields)
    request.inputs.add(**tensor)
    if "raw_input_contents" not in fields:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


NAN = np.zeros((2, 1, 8, 8), np.float32)
NAN[1, 0, 2, 3] = np.nan


def hostile() -> dict[str, tuple[pb.ModelInferRequest, str, str]]:
    """name -> (request, gRPC code, message or its start)."""
    no_inputs = pb.ModelInferRequest(model_name="digits")
    both = raw_request()
    both.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    two_raw = raw_request()
    two_raw.raw_input_contents.append(b"\0" * 256)
    typed_short = pb.ModelInferRequest(model_name="digits")
    typed_short.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    typed_short.inputs[0].contents.fp32_contents.extend([0.0] * 63)
    typed_wrong = pb.ModelInferRequest(model_name="digits")
    typed_wrong.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    typed_wrong.inputs[0].contents.int_contents.extend([0] * 64)
    variant = raw_request()
    variant.parameters["variant"].string_param = "half"
    variant_int = raw_request()
    variant_int.parameters["variant"].int64_param = 3
    output = raw_request()
    output.outputs.add(name="probs")
    classify = raw_request()
    classify.outputs.add(name="logits").parameters["classification"].int64_param = -3
    hundred_dims = pb.ModelInferRequest(model_name="digits")
    hundred_dims.inputs.add(name="input", datatype="FP32", shape=[1] * 100)
    hundred_dims.inputs[0].contents.fp32_contents.append(0.0)
    long = "m" * 10000
    shm_in = raw_request(raw_input_contents=[])
    shm_in.inputs[0].parameters["shared_memory_region"].string_param = "in0"
    twice = raw_request()
    twice.outputs.add(name="logits")
    twice.outputs.add(name="logits")
    shm_out = raw_request()
    shm_out.outputs.add(name="logits").parameters["shared_memory_region"].string_param = "out0"
    invalid, busy = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"
    return {
        # Names and shapes come back cut: a status message over the client's 8 KiB metadata
        # limit never arrives (the client saw RESOURCE_EXHAUSTED 'Stream removed').
        "10 kB model name": (raw_request(model_name=long), "NOT_FOUND",
                             f"unknown model '{long[:79]}... (10000 characters); models served "
                             "here: digits"),
        "10 kB version": (raw_request(model_version=long), "NOT_FOUND",
                          f"model 'digits' has no version '{long[:79]}... (10000 characters)"),
        "10 kB datatype": (raw_request(tensor={"datatype": long}), invalid,
                           f"input 'input' has datatype '{long[:79]}... (10000 characters); "
                           "this model takes FP32"),
        "output twice": (twice, invalid, "output 'logits' is requested more than once: name "
                         "each output once"),
        # Shared memory is not served: an output region was ignored (answered in the body).
        "shared memory input": (shm_in, invalid, "input 'input' names a shared memory region; "
                                "this server has no shared memory extension: send it as data"),
        "shared memory output": (shm_out, invalid, "output 'logits' names a shared memory region"),
        # No numpy array has these shapes: were INTERNAL from numpy's reshape.
        "impossible empty shape": (
            raw_request(tensor={"shape": [2**31 - 1] * 3 + [0]}, raw_input_contents=[b""]),
            invalid, "input 'input' must have shape ['N', 1, 8, 8], got [2147483647, 2147483647, "
            "2147483647, 0]"),
        "100 dimensions": (hundred_dims, invalid, "input 'input' must have shape ['N', 1, 8, 8], "
                           "got [1, 1, 1, 1, 1, 1, 1, 1, ... (100 in all)]"),
        "unknown model": (raw_request(model_name="cats"), "NOT_FOUND",
                          "unknown model 'cats'; models served here: digits"),
        "no model name": (raw_request(model_name=""), "NOT_FOUND", "model_name is empty"),
        "unknown version": (raw_request(model_version="7"), "NOT_FOUND",
                            "model 'digits' has no version '7'; it has '1'"),
        "wrong name": (raw_request(tensor={"name": "image"}), invalid,
                       "this model takes one input named 'input'; the request has ['image']"),
        "no inputs": (no_inputs, invalid,
                      "this model takes one input named 'input'; the request has []"),
        "wrong datatype": (raw_request(tensor={"datatype": "FP16"}), invalid,
                           "input 'input' has datatype FP16; this model takes FP32"),
        "wrong shape": (raw_request(np.zeros((1, 8, 8), np.float32)), invalid,
                        "input 'input' must have shape ['N', 1, 8, 8], got [1, 8, 8]"),
        "negative dim": (raw_request(tensor={"shape": [-1, 1, 8, 8]}), invalid,
                         "invalid inference request: inputs.0.shape.0: Input should be greater"),
        "huge dim": (raw_request(tensor={"shape": [2**40, 0, 8, 8]}), invalid,
                     "input 'input': shape [1099511627776, 0, 8, 8] has a dimension over"),
        "raw too short": (raw_request(raw_input_contents=[b"\0" * 255]), invalid,
                          "input 'input' has shape [1, 1, 8, 8] (64 elements, 256 bytes of FP32)"
                          " but its raw_input_contents entry is 255 bytes"),
        "raw too long": (raw_request(raw_input_contents=[b"\0" * 260]), invalid,
                         "input 'input' has shape [1, 1, 8, 8] (64 elements, 256 bytes of FP32)"
                         " but its raw_input_contents entry is 260 bytes"),
        "raw count": (two_raw, invalid, "raw_input_contents has 2 entries for 1 input(s)"),
        "raw and typed": (both, invalid,
                          "input 'input' has both contents and raw_input_contents: pick one"),
        "typed count": (typed_short, invalid, "input 'input' has shape [1, 1, 8, 8] (64 "
                        "elements) but its contents.fp32_contents holds 63 elements"),
        "typed field": (typed_wrong, invalid, "input 'input' is FP32: send its values in "
                        "contents.fp32_contents or raw_input_contents, not contents.int_contents"),
        "no rows": (raw_request(np.zeros((0, 1, 8, 8), np.float32)), invalid,
                    "input 'input' has no rows: send at least one image"),
        "NaN": (raw_request(NAN), invalid, "input 'input' holds 1 NaN or Inf value(s), the first "
                "at index [1, 0, 2, 3]: send finite FP32 values"),
        "huge values": (raw_request(np.full((1, 1, 8, 8), 3e38, np.float32)), invalid,
                        "the model's output is not finite for input row(s) [0]"),
        "unknown variant": (variant, invalid, f"unknown variant 'half'; use {SERVED_VARIANTS}"),
        "variant type": (variant_int, invalid, "parameters.variant must be a string, got 3"),
        "unknown output": (output, invalid,
                           "unknown output 'probs'; this model has outputs ['logits']"),
        "classification": (classify, invalid, "output 'logits': parameters.classification must "
                           "be a whole number of classes, at least 1, got -3"),
        "too many rows": (raw_request(np.zeros((65, 1, 8, 8), np.float32)), busy,
                          "65 images in one request, over the limit of 64: split the batch"),
        "over max_body_bytes": (raw_request(np.zeros((4000, 1, 8, 8), np.float32)), busy,
                                "SERVER: Received message larger than max (1024034 vs. 1000000)"),
    }  # fmt: skip


HOSTILE = hostile()


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_request_gets_its_code_and_the_server_goes_on(stub, case, digit_batch, direct):
    request, code, message = HOSTILE[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode[code], info.value.details()
    assert info.value.details().startswith(message), info.value.details()
    response = stub.ModelInfer(raw_request(digit_batch[:1]))  # alive and right
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 10)
    assert np.array_equal(logits, direct.logits(digit_batch[:1]))


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "RepositoryModelLoad"])
def test_bytes_that_are_no_protobuf_message_are_invalid_argument(server, stub, method, digit_batch):
    """grpc answers UNKNOWN when a request cannot be deserialized; the server says what."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff\x0f")  # a varint tag that never ends
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"the request is not a valid inference.{method}Request")
    response = stub.ModelInfer(raw_request(digit_batch[:1]))  # still serving
    assert response.outputs[0].shape == [1, 10]


def rest_json(x: np.ndarray, **fields) -> dict:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
              "data": x.ravel().tolist(), **fields.pop("tensor", {})}  # fmt: skip
    return {"inputs": [tensor], **fields}


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("wrong name", rest_json(np.zeros((1, 1, 8, 8)), tensor={"name": "image"})),
        ("wrong datatype", rest_json(np.zeros((1, 1, 8, 8)), tensor={"datatype": "FP16"})),
        ("wrong shape", rest_json(np.zeros((1, 8, 8)))),
        ("no rows", rest_json(np.zeros((0, 1, 8, 8)))),
        ("unknown variant", rest_json(np.zeros((1, 1, 8, 8)), parameters={"variant": "half"})),
        ("unknown output", rest_json(np.zeros((1, 1, 8, 8)), outputs=[{"name": "probs"}])),
        ("too many rows", rest_json(np.zeros((65, 1, 8, 8)))),
    ],
)
def test_grpc_and_rest_say_the_same_about_the_same_mistake(server, stub, case, body):
    rest = httpx.post(f"{server.url}{INFER}", json=body, timeout=30)
    assert 400 <= rest.status_code < 500
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(HOSTILE[case][0])
    assert info.value.details() == rest.json()["error"]


def test_grpc_calls_are_counted_with_a_protocol_label(server, client, digit_batch):
    client.infer("digits", [triton_input(digit_batch[:2])])
    with pytest.raises(InferenceServerException):
        client.infer("cats", [triton_input(digit_batch[:2])])
    text = httpx.get(f"{server.url}/metrics").text
    assert 'bnfold_requests_total{code="OK",endpoint="ModelInfer",model="digits",' \
           'protocol="grpc"}' in text  # fmt: skip
    assert 'code="NOT_FOUND",endpoint="ModelInfer",model="unknown",protocol="grpc"' in text
