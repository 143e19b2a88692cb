"""The classification strings, BYTES on the wire, the statistics bookkeeping and the model
configuration, in-process (the end-to-end checks with tritonclient: tests/e2e/
test_triton_calls.py)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

from bnfold.errors import BadInput
from service.request import InferResponse, RequestedOutput, classify, output_array, raw_bytes
from service.statistics import Statistics
from service.v2codec import encode


def test_classify_orders_highest_first_ties_by_index_and_formats_like_printf():
    scores = np.array([[1.0, 5.0, 10.0, 4.0], [-0.5, 2.0, 2.0, 1e-7]], np.float32)
    top = classify(scores, 3, ["a", "b", "c", "d"])
    assert top.shape == (2, 3) and top.dtype == object
    assert top[0].tolist() == [b"10.000000:2:c", b"5.000000:1:b", b"4.000000:3:d"]
    assert top[1].tolist() == [b"2.000000:1:b", b"2.000000:2:c", b"0.000000:3:d"]
    assert classify(scores, 9, None)[0].tolist() == [b"10.000000:2", b"5.000000:1",
                                                     b"4.000000:3", b"1.000000:0"]  # fmt: skip


@pytest.mark.parametrize("count", [0, -1, "2", 1.0, True])
def test_a_class_count_must_be_a_whole_number_at_least_1(count):
    out = RequestedOutput("logits", {"classification": count})
    with pytest.raises(BadInput, match="parameters.classification must be a whole number"):
        output_array(out, np.zeros((1, 3), np.float32), ["a", "b", "c"])


def test_bytes_outputs_on_the_wire():
    top = classify(np.array([[0.25, 0.75]], np.float32), 2, ["no", "yes"])
    assert raw_bytes(top) == b"\x0e\0\0\x000.750000:1:yes\x0d\0\0\x000.250000:0:no"
    as_json = RequestedOutput("logits", {"classification": 2, "binary_data": False})
    body, length = encode(InferResponse("m", "1", None, "folded", [(as_json, top)]),
                          SimpleNamespace(parameters={}))  # fmt: skip
    assert length is None
    (tensor,) = json.loads(body)["outputs"]
    assert tensor == {"name": "logits", "datatype": "BYTES", "shape": [1, 2],
                      "data": ["0.750000:1:yes", "0.250000:0:no"]}  # fmt: skip


def model(name="digits", version="1"):
    return SimpleNamespace(name=name, version=version)


def test_statistics_count_successes_failures_and_runs():
    stats = Statistics()
    stats.runs_counted = True

    async def one(fail: bool) -> None:
        with stats.call(model()) as call:
            with call.timing("compute_input"):
                pass
            with call.in_runner(3):
                stats.executed(model(), requests=1, rows=3, seconds=0.002)
            if fail:
                raise BadInput("no")

    asyncio.run(one(False))
    with pytest.raises(BadInput):
        asyncio.run(one(True))
    (report,) = stats.report([("digits", "1")])["model_stats"]
    assert report["inference_count"] == 3 and report["execution_count"] == 2
    inference = report["inference_stats"]
    assert inference["success"]["count"] == inference["fail"]["count"] == 1
    assert inference["compute_input"]["count"] == inference["queue"]["count"] == 1
    assert inference["compute_infer"] == {"count": 2, "ns": 4_000_000}
    assert report["batch_stats"][0]["batch_size"] == 3
    assert report["batch_stats"][0]["compute_infer"] == {"count": 2, "ns": 4_000_000}
    unused = stats.report([("other", None)])["model_stats"][0]
    assert unused["name"] == "other" and unused["inference_count"] == 0


def test_without_a_counting_runner_each_call_is_one_run():
    stats = Statistics()  # a runner of a test's own: nothing reports the runs
    with stats.call(model()) as call, call.in_runner(2):
        pass
    (report,) = stats.report([("digits", "1")])["model_stats"]
    assert report["execution_count"] == 1 and report["inference_count"] == 2
    assert report["inference_stats"]["compute_infer"]["count"] == 1
    assert report["inference_stats"]["queue"] == {"count": 1, "ns": 0}
