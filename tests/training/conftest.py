"""Shared fixtures: the digits splits and one small trained-and-exported bundle per session."""

from pathlib import Path

import pytest

from training.cli import load_splits
from training.export import export_bundle
from training.model import ModelConfig
from training.train import TrainConfig, fit, load_checkpoint, model_from_checkpoint

SMALL = ModelConfig(widths=[8, 16], hidden=16)


@pytest.fixture(scope="session")
def digits_splits():
    return load_splits("digits", 0, 8, "L")


@pytest.fixture(scope="session")
def small_run(digits_splits, tmp_path_factory) -> Path:
    """A 3-epoch small model: enough for real running statistics, fast enough for CI."""
    run_dir = tmp_path_factory.mktemp("run")
    fit(digits_splits, SMALL, TrainConfig(epochs=3, seed=0), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def small_model(small_run):
    return model_from_checkpoint(load_checkpoint(small_run / "checkpoint.pt"))


def export_small(model, splits, out: Path, int8=None) -> Path:
    """`model` exported as out/small, measured on the digits test split."""
    export_bundle(
        model,
        name="small",
        classes=splits.test.classes,
        spec=splits.test.spec,
        eval_x=splits.test.x,
        split="test",
        out_dir=out,
        training_metrics={"data": "digits", "seed": 0},
        int8=int8,
    )
    return out / "small"


@pytest.fixture(scope="session")
def small_bundle(small_model, digits_splits, tmp_path_factory) -> Path:
    return export_small(small_model, digits_splits, tmp_path_factory.mktemp("models"))
