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


@pytest.fixture(scope="session")
def small_bundle(small_model, digits_splits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models")
    export_bundle(
        small_model,
        name="small",
        classes=digits_splits.test.classes,
        spec=digits_splits.test.spec,
        eval_x=digits_splits.test.x,
        split="test",
        out_dir=out,
        training_metrics={"data": "digits", "seed": 0},
    )
    return out / "small"
