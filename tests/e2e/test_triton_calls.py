"""What Triton clients call on a classifier, against the real `bnfold-serve` process, with
tritonclient over REST (JSON and binary) and gRPC: the classification extension
(`InferRequestedOutput(name, class_count=k)`), the statistics extension
(`get_inference_statistics`) and the model configuration (`get_model_config`).

References, independent of the server: the bundle's folded.onnx run by onnxruntime directly
(requests go one at a time, each runs alone, so the logits are the same bit for bit), the class
names read from bundle.json, and Triton's documented formats: each classification element is
"<value>:<index>:<label>" with the value as C's "%f" prints it, highest first, the count clamped
to the number of classes. This process never imports the server's generated protobuf modules
(both define the `inference` package in protobuf's default pool): it uses tritonclient's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import serving
from tests.e2e.test_grpc import Server
from tests.pinned import THREADS, pinned_direct

pytestmark = pytest.mark.e2e

# Explicit, so the configuration the server reports can be checked against them.
SETTINGS = {"workers": 1, "threads": THREADS, "max_batch_size": 16, "max_delay_ms": 3,
            "max_images_per_request": 48}  # fmt: skip
PROTOCOLS = ["rest-json", "rest-binary", "grpc"]


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("triton_calls") / "server.log"
    with serving(models_dir, log, **SETTINGS) as served:
        yield Server(served.url, served.grpc)
    assert served.proc.returncode == 0, f"exit {served.proc.returncode}:\n{log.read_text()}"
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def direct(bundle_src: Path):
    return pinned_direct(bundle_src)


@pytest.fixture(scope="module")
def classes(bundle_src: Path) -> list[str]:
    return json.loads((bundle_src / "bundle.json").read_text())["classes"]


@pytest.fixture(scope="module")
def rest(server: Server) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server: Server) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def expected_top(logits: np.ndarray, k: int, classes: list[str]) -> list[list[str]]:
    """Triton's classification answer, from the reference logits: per row the min(k, classes)
    highest values, highest first, "%f:index:label"."""
    answer = []
    for row in logits:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[: min(k, len(row))]
        answer.append(["%f:%d:%s" % (row[i], i, classes[i]) for i in order])  # noqa: UP031
    return answer


def infer(protocol: str, clients, x: np.ndarray, class_count: int = 0):
    """(the answered array, its datatype) for `x` over `protocol`."""
    rest, grpc_client = clients
    if protocol == "grpc":
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = tgrpc.InferRequestedOutput("logits", class_count=class_count)
        result = grpc_client.infer("digits", [inp], outputs=[out])
        return result.as_numpy("logits"), result.get_output("logits").datatype
    binary = protocol == "rest-binary"
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = thttp.InferRequestedOutput("logits", binary_data=binary, class_count=class_count)
    result = rest.infer("digits", [inp], outputs=[out])
    return result.as_numpy("logits"), result.get_output("logits")["datatype"]


def as_text(array: np.ndarray) -> list[list[str]]:
    """BYTES elements as str (tritonclient gives bytes, or str from REST JSON)."""
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in array]


# --- classification extension -------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_class_count_answers_the_top_k_as_triton_formats_them(
    protocol, k, rest, grpc_client, direct, classes, digit_batch
):
    x = digit_batch[:5]
    top, datatype = infer(protocol, (rest, grpc_client), x, class_count=k)
    assert datatype == "BYTES"
    assert top.shape == (5, min(k, len(classes)))  # 25 is clamped to the 10 classes
    assert as_text(top) == expected_top(direct.logits(x), k, classes)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_class_count_the_logits_are_answered(protocol, rest, grpc_client, direct,
                                                     digit_batch):  # fmt: skip
    x = digit_batch[5:7]
    logits, datatype = infer(protocol, (rest, grpc_client), x)
    assert datatype == "FP32" and np.array_equal(logits, direct.logits(x))


def test_top_1_is_the_predicted_class(rest, digits, digit_batch, classes):
    """The top-1 label over the classification extension is the digit's true class."""
    top, _ = infer("rest-binary", (rest, None), digit_batch, class_count=1)
    labels = [row[0].decode().split(":")[2] for row in top]
    truth = [classes[d.label] for d in digits]
    assert np.mean([a == b for a, b in zip(labels, truth, strict=True)]) >= 0.8


BAD_COUNTS = [(0, "got 0"), (-2, "got -2"), ("3", "got '3'"), (2.5, "got 2.5"),
              (True, "got True")]  # fmt: skip


@pytest.mark.parametrize(("count", "shown"), BAD_COUNTS)
def test_a_bad_class_count_is_a_400_over_rest(server, digit_batch, count, shown):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                        "data": digit_batch[0].ravel().tolist()}],
            "outputs": [{"name": "logits", "parameters": {"classification": count}}]}  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"] == (
        "output 'logits': parameters.classification must be a whole number of classes, at "
        f"least 1, {shown}"
    )


def test_a_bad_class_count_is_invalid_argument_over_grpc(grpc_client, digit_batch):
    inp = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(digit_batch[:1])
    out = tgrpc.InferRequestedOutput("logits", class_count=-1)
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("digits", [inp], outputs=[out])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameters.classification must be a whole number of classes, at least 1, got -1" in (
        caught.value.message()
    )


def test_the_extensions_are_listed(rest, grpc_client):
    wanted = {"classification", "statistics", "model_configuration"}
    assert wanted <= set(rest.get_server_metadata()["extensions"])
    assert wanted <= set(grpc_client.get_server_metadata().extensions)


# --- statistics extension -----------------------------------------------------------------


def digits_stats(rest) -> dict:
    (stats,) = rest.get_inference_statistics("digits")["model_stats"]
    return stats


def test_statistics_count_what_the_calls_did(rest, grpc_client, digit_batch):
    before = digits_stats(rest)
    started_ms = time.time_ns() // 1_000_000
    rows = [1, 3, 2, 5]  # one request each, one at a time: each runs alone
    for i, n in enumerate(rows):
        infer(PROTOCOLS[i % 3], (rest, grpc_client), digit_batch[:n], class_count=i % 2 * 2)
    bad = digit_batch[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException, match="NaN"):
        infer("grpc", (rest, grpc_client), bad)
    after = digits_stats(rest)

    assert after["name"] == "digits" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == sum(rows)
    assert after["execution_count"] - before["execution_count"] == len(rows)
    assert after["last_inference"] >= started_ms
    grew = {name: {key: after["inference_stats"][name][key] - before["inference_stats"][name][key]
                   for key in ("count", "ns")}
            for name in after["inference_stats"]}  # fmt: skip
    assert grew["fail"]["count"] == 1 and grew["fail"]["ns"] > 0
    for name in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert grew[name]["count"] == len(rows), name
    for name in ("success", "compute_input", "compute_infer"):
        assert grew[name]["ns"] > 0, name
    # Each request's time in the data plane holds its input, its queue, its run and its output.
    parts = sum(grew[n]["ns"] for n in ("queue", "compute_input", "compute_infer",
                                        "compute_output"))  # fmt: skip
    assert parts <= grew["success"]["ns"]
    assert grew["cache_hit"] == grew["cache_miss"] == {"count": 0, "ns": 0}
    runs = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert all(runs.get(n, 0) >= 1 for n in rows)


def test_concurrent_requests_share_runs(rest, grpc_client, digit_batch):
    """24 requests at once: every row counted, in no more runs than requests."""
    before = digits_stats(rest)

    def call(i: int) -> None:
        infer("grpc", (rest, grpc_client), digit_batch[i % 8 : i % 8 + 2])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(24)))
    after = digits_stats(rest)
    assert after["inference_count"] - before["inference_count"] == 48
    assert 1 <= after["execution_count"] - before["execution_count"] <= 24
    success = after["inference_stats"]["success"]["count"]
    assert success - before["inference_stats"]["success"]["count"] == 24


def test_statistics_are_the_same_over_rest_and_grpc(rest, grpc_client, server, digit_batch):
    infer("rest-json", (rest, grpc_client), digit_batch[:2])
    every = httpx.get(f"{server.url}/v2/models/stats", timeout=10).json()
    assert [m["name"] for m in every["model_stats"]] == ["digits"]
    one = rest.get_inference_statistics("digits")
    by_version = rest.get_inference_statistics("digits", model_version="1")
    assert every == one == by_version  # no inference in between: nothing moved
    from_grpc = grpc_client.get_inference_statistics("digits")
    assert from_grpc == json_format.ParseDict(one, pb.ModelStatisticsResponse())
    assert grpc_client.get_inference_statistics("") == from_grpc


@pytest.mark.parametrize("call", ["get_inference_statistics", "get_model_config"])
def test_statistics_and_config_of_an_unknown_model(rest, grpc_client, call):
    with pytest.raises(InferenceServerException, match="unknown model 'cats'"):
        getattr(rest, call)("cats")
    with pytest.raises(InferenceServerException, match="unknown model 'cats'") as caught:
        getattr(grpc_client, call)("cats")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


# --- model configuration ------------------------------------------------------------------


def test_model_config_as_triton_reports_it(rest, grpc_client):
    config = rest.get_model_config("digits")
    assert config == {
        "name": "digits",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 48,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                   "dims": [1, 8, 8]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}],
        "instance_group": [{"name": "digits", "kind": "KIND_CPU", "count": 1}],
        "dynamic_batching": {"preferred_batch_size": [16], "max_queue_delay_microseconds": 3000},
    }  # fmt: skip
    assert rest.get_model_config("digits", model_version="1") == config
    answer = grpc_client.get_model_config("digits")
    assert answer.config == json_format.ParseDict(config, mc.ModelConfig())
    got = answer.config
    assert got.max_batch_size == 48 and list(got.input[0].dims) == [1, 8, 8]
    assert got.input[0].data_type == mc.TYPE_FP32
    assert got.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert got.dynamic_batching.max_queue_delay_microseconds == 3000
    assert got.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
