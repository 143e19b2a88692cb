"""Training: determinism, safe checkpoints, resume, and the shipped model's accuracy."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bnfold.bundle import load_bundle
from training.model import ModelConfig
from training.train import TrainConfig, fit, load_checkpoint, random_shift

TINY = ModelConfig(widths=[4, 8], hidden=8)
REPO = Path(__file__).resolve().parents[2]


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["state_dict"]


def test_same_seed_same_weights_other_seed_other_weights(digits_splits, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        fit(digits_splits, TINY, TrainConfig(epochs=2, seed=seed), tmp_path / name)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_reproduces_an_uninterrupted_run(digits_splits, tmp_path):
    fit(digits_splits, TINY, TrainConfig(epochs=3, seed=0), tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    fit(
        digits_splits,
        TINY,
        TrainConfig(epochs=3, seed=0),
        resumed_dir,
        resume=_three_epoch_checkpoint_at_two(digits_splits, tmp_path),
    )
    full, resumed = _weights(tmp_path / "full"), _weights(resumed_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only epoch 3 was trained after resuming


def _three_epoch_checkpoint_at_two(splits, tmp_path):
    """Train the 3-epoch schedule, keep the checkpoint written after epoch 2."""
    import training.train as train_mod

    kept = tmp_path / "at2.pt"
    original = train_mod.save_checkpoint

    def spy(path, model, optimizer, scheduler, generator, epoch, *rest):
        original(path, model, optimizer, scheduler, generator, epoch, *rest)
        if epoch == 2:
            kept.write_bytes(Path(path).read_bytes())

    train_mod.save_checkpoint = spy
    try:
        fit(splits, TINY, TrainConfig(epochs=3, seed=0), tmp_path / "spy")
    finally:
        train_mod.save_checkpoint = original
    return kept


def test_checkpoint_loads_with_weights_only_and_has_config(small_run):
    ckpt = torch.load(small_run / "checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["widths"] == [8, 16]
    assert ckpt["classes"] == [str(i) for i in range(10)]
    assert (small_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((small_run / "metrics.jsonl").read_text().splitlines()) == 3


def test_random_shift_moves_pixels_and_keeps_shape():
    x = torch.zeros(4, 1, 5, 5)
    x[:, :, 2, 2] = 1.0
    g = torch.Generator().manual_seed(0)
    out = random_shift(x, 1, g)
    assert out.shape == x.shape and torch.all(out.sum((1, 2, 3)) == 1)
    ys, xs = torch.nonzero(out[:, 0], as_tuple=True)[1:]
    assert torch.all((ys - 2).abs() <= 1) and torch.all((xs - 2).abs() <= 1)


def test_shipped_digits_bundle_reaches_98_percent(digits_splits):
    """Re-measure the shipped folded model on the held-out split (independent of the manifest)."""
    bundle = REPO / "models" / "digits"
    m = load_bundle(bundle)
    sess = ort.InferenceSession(str(bundle / "folded.onnx"))
    logits = sess.run(None, {"input": digits_splits.test.x})[0]
    acc = float(np.mean(logits.argmax(1) == digits_splits.test.y))
    assert acc >= 0.98
    assert abs(acc - m.training["test_acc"]) < 0.01


def make_train_argv() -> list[str]:
    """The arguments `make train` passes to bnfold-train, read from the Makefile itself."""
    lines = (REPO / "Makefile").read_text().splitlines()
    recipe = lines[next(i for i, line in enumerate(lines) if line.startswith("train:")) + 1]
    return recipe.split("bnfold-train", 1)[1].split()


def test_shipped_bundle_is_what_make_train_makes(digits_splits):
    """models/digits was exported by today's code from `make train`'s own command line: same
    architecture, same training configuration, and metadata that matches the weights. (The
    weights themselves may differ in the last bits on another CPU or thread count.)"""
    import json
    from dataclasses import asdict

    from training.cli import build_parser, configs_from_args

    args = build_parser().parse_args(make_train_argv())
    model_cfg, train_cfg = configs_from_args(args, digits_splits)
    m = load_bundle(REPO / "models" / "digits")
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  tuples -> lists, as stored
    assert m.architecture == as_json(model_cfg.to_dict())
    assert m.training["config"] == as_json(asdict(train_cfg))
    assert m.training["epochs"] == train_cfg.epochs and m.training["seed"] == train_cfg.seed
    assert m.name == args.name and m.classes == list(digits_splits.test.classes)
