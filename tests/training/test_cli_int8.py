"""`bnfold-train export|train --quantize int8 ...` and `verify` of the result, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnfold.bundle import INT8_FILE, read_manifest
from training.cli import main


def test_export_with_int8_writes_measures_and_verifies(small_run, tmp_path, capsys):
    ckpt = str(small_run / "checkpoint.pt")
    args = ["export", ckpt, "--name", "q", "--models-dir", str(tmp_path), "--quantize", "int8"]
    code = main([*args, "--calibration-images", "64", "--calibration-method", "percentile"])
    out = capsys.readouterr().out
    assert code == 0, out
    m = read_manifest(tmp_path / "q")
    r = m.equivalence.int8
    assert r.settings.calibration_images == 64 and r.settings.calibration_method == "percentile"
    assert r.settings.calibration_source == "digits train split (64 images)"
    assert r.split == "test" and r.accuracy_int8 is not None
    line = next(s for s in out.splitlines() if s.startswith("int8: "))
    assert line.startswith("int8: wrote quantized.onnx; on 359 test inputs top-1 agreement")
    assert (tmp_path / "q" / INT8_FILE).is_file() == r.passed
    assert main(["verify", str(tmp_path / "q")]) == 0
    verified = capsys.readouterr().out
    assert "ok   int8 vs folded on 359 inputs" in verified and "accuracy drop" in verified


def run(argv: list[str]) -> int:
    """main's exit code, argparse's own refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--calibration-method", "entropy"], "--calibration-method only applies with --quantize"),
        (["--activations", "int8"], "--activations only applies with --quantize int8"),
        (["--quantize", "int8", "--calibration-images", "0"], "expected a positive integer"),
        (["--quantize", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_int8_flag_mistakes_are_one_line_and_write_nothing(
    small_run, tmp_path: Path, capsys, extra, fragment
):
    ckpt = str(small_run / "checkpoint.pt")
    assert run(["export", ckpt, "--name", "bad", "--models-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "bad").exists()


def test_train_refuses_a_bad_int8_flag_before_training(tmp_path, capsys):
    argv = ["train", "--epochs", "1", "--runs-dir", str(tmp_path / "runs")]
    argv += ["--models-dir", str(tmp_path / "models"), "--calibration-images", "9"]
    assert run(argv) == 2
    assert "--calibration-images only applies with --quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any training
