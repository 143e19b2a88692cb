"""bench/peers_run.py's pure parts: the request bytes of each protocol for any bundle, the
binary extension's answer read back, a protocol a server refuses kept with its reason, and the
tables. No server, network or peer virtualenv.

The gRPC message is built and read in a child process: the server's generated code
(service/grpc/inference_pb2.py) and tritonclient's (imported by the e2e tests in this pytest
process) define the same `inference.*` protobuf symbols, and one process holds only one of
them. Here, write_payloads gets a stand-in gRPC message."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import struct
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import peers_run, wrk_load

LEVELS = (1, 16)
STAND_IN = b"\x00" + struct.pack(">I", 3) + b"abc"  # a framed gRPC message, not decoded here


@pytest.fixture(autouse=True)
def no_generated_grpc_code(monkeypatch):
    monkeypatch.setattr(peers_run, "model_infer", lambda bundle, x: STAND_IN)


def _model_infer_fields(folder: str) -> tuple:
    """In a child process: the framed ModelInfer of the bundle's input, decoded."""
    from service.grpc import inference_pb2 as pb

    bundle = peers_run.Bundle.read(Path(folder))
    framed = peers_run.model_infer(bundle, peers_run.synthetic_input(bundle))
    assert framed[0] == 0 and struct.unpack(">I", framed[1:5])[0] == len(framed) - 5
    request = pb.ModelInferRequest.FromString(framed[5:])
    tensor = request.inputs[0]
    values = np.asarray(tensor.contents.fp32_contents, "f4")
    return request.model_name, tensor.name, list(tensor.shape), values


@pytest.fixture
def bundle(tmp_path) -> peers_run.Bundle:
    """A bundle that is not digits: 3x4x4 input "image", ReduceMean to 3 "scores"."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["scores"], axes=[2, 3], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = tmp_path / "tiny-bundle"
    folder.mkdir()
    onnx.save(model, folder / "folded.onnx")
    manifest = {
        "name": "tiny",
        "input": {"name": "image", "shape": [-1, 3, 4, 4],
                  "preprocess": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3,
                                 "layout": "NCHW"}},
        "output": {"name": "scores", "shape": [-1, 3]},
        "files": {"folded": {"path": "folded.onnx"}},
    }  # fmt: skip
    (folder / "bundle.json").write_text(json.dumps(manifest))
    return peers_run.Bundle.read(folder)


def test_bundle_names_and_shapes_come_from_its_manifest(bundle):
    assert (bundle.name, bundle.input_name, bundle.output_name) == ("tiny", "image", "scores")
    assert bundle.input_shape == (1, 3, 4, 4)
    assert bundle.describe() == "tiny (3x4x4 input)"
    digits = peers_run.Bundle.read(peers_run.DIGITS_DIR)
    assert (digits.name, digits.input_shape) == ("digits", (1, 1, 8, 8))


def test_synthetic_input_is_seeded_and_in_the_preprocessed_range(bundle):
    x = peers_run.model_input(bundle)
    assert x.dtype == np.float32 and x.shape == (1, 3, 4, 4)
    assert np.array_equal(x, peers_run.synthetic_input(bundle))  # the same every run
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-6 and x.max() <= (1 - 0.5) / 0.25 + 1e-6
    assert not np.array_equal(x, peers_run.synthetic_input(bundle, seed=1))


def test_every_protocol_carries_the_same_input(bundle, tmp_path):
    payloads = peers_run.write_payloads(tmp_path / "load", bundle)
    x = peers_run.synthetic_input(bundle)
    assert np.allclose(payloads.expected, x.mean(axis=(2, 3)), atol=1e-6)

    (tensor,) = json.loads(payloads.rest.read_bytes())["inputs"]
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == ("image", [1, 3, 4, 4], "FP32")
    assert np.array_equal(np.asarray(tensor["data"], np.float32), x.ravel())

    binary = payloads.rest_binary.read_bytes()
    header = json.loads(binary[: payloads.binary_header_length])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": x.size * 4}
    assert header["outputs"] == [{"name": "scores", "parameters": {"binary_data": True}}]
    raw = binary[payloads.binary_header_length :]
    assert np.array_equal(np.frombuffer(raw, "<f4"), x.ravel())
    headers = payloads.headers("rest-binary")
    assert headers == {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(payloads.binary_header_length),
    }
    assert payloads.headers("rest") == {"Content-Type": "application/json"}

    assert payloads.grpc.read_bytes() == STAND_IN
    assert set(payloads.describe()) == set(peers_run.PROTOCOLS)


def test_the_grpc_message_carries_the_same_input(bundle):
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as child:
        name, input_name, shape, values = child.submit(
            _model_infer_fields, str(bundle.path)
        ).result(timeout=120)
    assert (name, input_name, shape) == ("tiny", "image", [1, 3, 4, 4])
    assert np.array_equal(values, peers_run.synthetic_input(bundle).ravel())


def test_digits_carries_the_held_out_digit(tmp_path):
    digits = peers_run.Bundle.read(peers_run.DIGITS_DIR)
    payloads = peers_run.write_payloads(tmp_path, digits)
    assert json.loads(payloads.rest.read_bytes())["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert payloads.expected.shape == (1, 10) and int(payloads.expected.argmax()) == 3


def _binary_answer(outputs: list[tuple[dict, bytes]]) -> tuple[bytes, str]:
    header = json.dumps({"model_name": "tiny", "outputs": [o for o, _ in outputs]}).encode()
    return header + b"".join(raw for _, raw in outputs), str(len(header))


def test_binary_answer_is_read_at_its_output_offset():
    other = np.arange(5, dtype="<f4")
    scores = np.array([0.5, -1.25, 3.0], dtype="<f4")
    body, length = _binary_answer([
        ({"name": "other", "datatype": "FP32", "shape": [1, 5],
          "parameters": {"binary_data_size": 20}}, other.tobytes()),
        ({"name": "scores", "datatype": "FP32", "shape": [1, 3],
          "parameters": {"binary_data_size": 12}}, scores.tobytes()),
    ])  # fmt: skip
    assert np.array_equal(peers_run.parse_binary_response(body, length, "scores"), scores)


def test_an_answer_without_binary_data_is_unsupported_with_its_start():
    body = json.dumps({"outputs": [{"name": "scores", "data": [1.0, 2.0, 3.0]}]}).encode()
    with pytest.raises(peers_run.Unsupported, match=r'HTTP 200 without .*\{"outputs"'):
        peers_run.parse_binary_response(body, None, "scores")
    with pytest.raises(peers_run.Unsupported, match="without binary data for scores"):
        peers_run.parse_binary_response(body, str(len(body)), "scores")


def test_a_refused_protocol_is_reported_and_the_others_still_checked(bundle, tmp_path, monkeypatch):
    """An error status to the binary body makes rest-binary unavailable with the status and
    the body's start; the JSON and gRPC answers are still checked."""
    payloads = peers_run.write_payloads(tmp_path, bundle)
    monkeypatch.setattr(peers_run.servers, "resume", lambda server: None)
    monkeypatch.setattr(peers_run.servers, "pause", lambda server: None)
    checked = []
    monkeypatch.setattr(peers_run, "check_rest", lambda r, p: checked.append("rest"))
    monkeypatch.setattr(peers_run, "check_grpc", lambda r, p: checked.append("grpc") or 99)

    def refuse(request, timeout):
        assert request.headers["Inference-header-content-length"].isdigit()
        body = io.BytesIO(b'{"error": "Unsupported content type application/octet-stream"}')
        raise peers_run.urllib.error.HTTPError(request.full_url, 415, "no", {}, body)

    monkeypatch.setattr(peers_run.urllib.request, "urlopen", refuse)
    server = SimpleNamespace(url=lambda path: f"http://127.0.0.1:1{path}")
    r = peers_run.Running("mlserver-0", server, 2)
    refused = peers_run.check(r, payloads)
    assert refused == {"rest-binary": 'HTTP 415: {"error": "Unsupported content type '
                       'application/octet-stream"}'}  # fmt: skip
    assert checked == ["rest", "grpc"] and r.grpc_frame == 99


def test_wrk_gets_the_extra_headers_as_lines(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 1, "", "no wrk here")

    monkeypatch.setattr(wrk_load.subprocess, "run", fake_run)
    headers = {"Inference-Header-Content-Length": "123", "X-Other": "a b"}
    with pytest.raises(RuntimeError, match="no wrk here"):
        wrk_load.run_wrk("http://x/", tmp_path / "b", "application/octet-stream", 1, 1,
                         headers=headers)  # fmt: skip
    assert seen["BENCH_HEADERS"] == "Inference-Header-Content-Length: 123\nX-Other: a b"
    assert seen["BENCH_CONTENT_TYPE"] == "application/octet-stream"
    with pytest.raises(ValueError):
        wrk_load.header_lines({"Bad: name": "x"})
    assert wrk_load.header_lines({}) == ""


def _row(rps: float) -> dict:
    return {"rps": rps, "p50_ms": 1.0, "p99_ms": 1000 / rps, "errors": 0, "cpu_s": 1.0,
            "calls_per_cpu_s": rps}  # fmt: skip


def _digits_result() -> dict:
    protocols = {"bnfold": peers_run.PROTOCOLS, "triton": peers_run.PROTOCOLS,
                 "mlserver-0": ("rest", "grpc")}  # fmt: skip
    speed = {"bnfold": 200.0, "triton": 100.0, "mlserver-0": 50.0}
    runs = {n: {p: {c: [_row(speed[n])] for c in LEVELS} for p in ps}
            for n, ps in protocols.items()}  # fmt: skip
    return {
        "model": "digits (1x8x8 input)",
        "bundle": "models/digits",
        "targets": list(runs),
        "labels": {n: peers_run.LABELS[n] for n in runs},
        "unavailable": {"kserve-1": "not installed: no wheel"},
        "unsupported": {"mlserver-0": {"rest-binary": 'HTTP 415: {"error": "a | b"}'}},
        "server_metadata": {n: {"name": n, "version": "1"} for n in runs},
        "checked_after": {n: "ok" for n in runs},
        "payloads": {
            "rest": "V2 JSON: 9 bytes",
            "rest-binary": "V2 binary: 8 bytes",
            "grpc": "ModelInfer: 7 bytes",
        },  # fmt: skip
        "load_average": "1.00 at start, 1.00 at end",
        "elapsed_s": 10.0,
        "runs": runs,
        "table": peers_run.summarize(runs),
        "ratios": peers_run.ratios(runs),
    }


def _result() -> dict:
    return {
        "settings": {"seconds": 1, "rounds": 1, "concurrency": list(LEVELS), "warmup_seconds": 1},
        "models": {"digits": _digits_result(), "heavy": {"error": "bnfold did not start: boom"}},
        "peer_versions": {"triton": "nvidia-pytriton 0.7.0"},
        "load_average": "1.00 at start, 1.00 at end",
        "loaded": "",
        "elapsed_s": 12.0,
        "environment": {
            "command": "python -m bench.peers_run --model models/digits",
            "date": "today",
            "machine": "here",
            "bnfold": "commit x",
        },  # fmt: skip
    }


def test_ratios_cover_only_the_protocols_both_servers_take():
    ratios = _digits_result()["ratios"]
    assert set(ratios["triton"]) == set(peers_run.PROTOCOLS)
    assert set(ratios["mlserver-0"]) == {"rest", "grpc"}
    assert ratios["mlserver-0"]["grpc"][16]["rps"] == pytest.approx(4.0)


def test_ratio_table_has_model_and_protocol_columns_and_every_reason():
    lines = peers_run.ratio_table(_result()).splitlines()
    assert lines[0] == "| model | bnfold / peer: req/s (p99) | protocol | c=1 | c=16 |"
    triton = peers_run.LABELS["triton"]
    assert f"| digits | {triton} | REST, V2 binary tensors | 2.00 (0.50) | 2.00 (0.50) |" in lines
    mlserver = peers_run.LABELS["mlserver-0"]
    assert (f'| digits | {mlserver} | REST, V2 binary tensors | unavailable: HTTP 415: '
            f'{{"error": "a \\| b"}} | |') in lines  # fmt: skip
    kserve = peers_run.LABELS["kserve-1"]
    assert f"| digits | {kserve} | not measured | not installed: no wheel | |" in lines
    assert "| heavy | all servers | not measured | bnfold did not start: boom | |" in lines
    assert len(lines) == 2 + 3 + 2 + 1 + 1 + 1  # triton x3, mlserver x2, refused, missing, heavy
    columns = [len(re.findall(r"(?<!\\)\|", line)) for line in lines]  # escaped pipes aside
    assert set(columns) == {6}


def test_markdown_states_the_command_and_survives_json(tmp_path):
    result = _result()
    text = peers_run.markdown(result)
    assert text.startswith("# bnfold beside Triton, KServe and MLServer (digits, heavy, CPU)")
    assert "| command | `python -m bench.peers_run --model models/digits` |" in text
    assert "| digits: request bytes (every server) | V2 JSON: 9 bytes; V2 binary: 8 bytes;" in text
    absolute = peers_run.absolute_table(result).splitlines()
    assert absolute[0].startswith("| model | server | protocol | c | req/s |")
    assert len(absolute) == 2 + (3 + 3 + 2) * len(LEVELS)
    mlserver = peers_run.LABELS["mlserver-0"]
    assert f"| digits | {mlserver} | grpc | 16 | 50 | 1.00 | 20.00 | 0 | 50 |" in absolute
    paths = peers_run.write(result, tmp_path)
    assert peers_run.markdown(json.loads(paths[0].read_text())) == text == paths[1].read_text()


def test_model_option_takes_a_bundle_folder_or_heavy(tmp_path, monkeypatch):
    monkeypatch.setattr(peers_run, "missing_tools", lambda: [])
    seen = {}
    monkeypatch.setattr(peers_run, "run", lambda *a, **kw: seen.update(kw) or _result())
    assert peers_run.main(["--model", str(peers_run.DIGITS_DIR), "--model", "heavy"]) == 0
    assert seen["models"] == (peers_run.DIGITS_DIR, "heavy")
    with pytest.raises(SystemExit):
        peers_run.main(["--model", str(tmp_path)])
    assert Path(peers_run.DIGITS_DIR / "bundle.json").is_file()
