"""The BN statistics check and recalibration on the shipped digits model (real data).

Bad statistics are made the way they arise: left at their initial values (mean 0, variance 1),
or estimated on per-process batches of 2. The healthy shipped model is never flagged on
random 64-image subsets of its held-out split (the false-alarm rate over seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.toolchain.bnstats import batchnorm_nodes, check_statistics, recalibrate
from bnfold.toolchain.sessions import make_session, run_session

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped() -> onnx.ModelProto:
    return onnx.load(str(REPO / "models" / "digits" / "unfolded.onnx"))


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    logits = run_session(make_session(model.SerializeToString(), "unfolded"), x)
    return float(np.mean(logits.argmax(1) == y))


def with_initial_statistics(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for bn in batchnorm_nodes(out):
        for k, value in ((3, 0.0), (4, 1.0)):
            t = inits[bn.node.input[k]]
            t.CopyFrom(
                numpy_helper.from_array(np.full_like(numpy_helper.to_array(t), value), t.name)
            )
    return out


def test_the_shipped_model_is_not_flagged_on_held_out_subsets(shipped, digits_splits):
    rng = np.random.default_rng(0)
    x = digits_splits.test.x
    flags = [
        check_statistics(shipped, "input", x[rng.choice(len(x), 64, replace=False)], "s").flagged
        for _ in range(10)
    ]
    assert flags == [[]] * 10


def test_initial_statistics_are_flagged_and_recalibration_restores_accuracy(shipped, digits_splits):
    test, train = digits_splits.test, digits_splits.train
    healthy = accuracy(shipped, test.x, test.y)
    broken = with_initial_statistics(shipped)
    assert accuracy(broken, test.x, test.y) < healthy - 0.3
    check = check_statistics(broken, "input", test.x, "test split")
    assert check.flagged and "initial statistics" in check.causes[0]
    fixed = recalibrate(broken, "input", train.x[:256])
    # 256 training images re-estimate what training's running averages estimated: within a
    # point of the healthy model's held-out accuracy (one point is ~4 of 359 images).
    assert accuracy(fixed, test.x, test.y) >= healthy - 0.01
    assert check_statistics(fixed, "input", test.x, "test split").flagged == []
