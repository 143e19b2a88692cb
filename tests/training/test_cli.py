"""bnfold-train: help, one-line errors for every verb, no export without training, verify passing
a good bundle and failing a tampered one."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_help_on_each_subcommand(capsys):
    for argv in (["--help"], ["train", "--help"], ["export", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--data", "/nonexistent/folder"],
            "data folder /nonexistent/folder does not exist or is not a folder",
        ),
        (["verify", "/nonexistent/bundle"], "bundle folder /nonexistent/bundle does not exist"),
        (["export", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
    ],
)
def test_user_errors_are_one_line_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"bnfold-train: error: {message}"


BAD_FLAGS = [
    (["train", "--bn-placement", "middle"], "invalid choice: 'middle'"),
    (["train", "--bn-momentum", "2"], "momentum must be in (0, 1]"),
    (["train", "--widths", "a,b"], "comma-separated ints"),
    (["train", "--epochs", "-1"], "argument --epochs: must be >= 1, got -1"),
    (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train", "--epochs", "two"], "argument --epochs: expected int, got 'two'"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["train", "--lr", "0"], "argument --lr: must be > 0"),
    (["train", "--lr", "nan"], "argument --lr: must be > 0"),
    (["train", "--seed", "-3"], "argument --seed: must be >= 0"),
    (["train", "--bn-eps=-1e-5"], "argument --bn-eps: must be > 0"),
    (["train", "--hidden", "0"], "argument --hidden: must be >= 1"),
    (["train", "--blocks-per-stage", "0"], "argument --blocks-per-stage: must be >= 1"),
    (["train", "--image-size", "0"], "argument --image-size: must be >= 1"),
    (["train", "--name", "../escape"], "'../escape' is not a bundle name"),
    (["export", "x.pt", "--name", ""], "'' is not a bundle name"),
    (["train", "--unknown"], "unrecognized arguments: --unknown"),
    ([], "the following arguments are required: command"),
    (["verify"], "the following arguments are required: bundle"),
    (["fly"], "invalid choice: 'fly'"),
]


@pytest.mark.parametrize(("argv", "text"), BAD_FLAGS)
def test_bad_flags_are_one_line_exit_2_before_anything_runs(argv, text, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1, err


def bundle_snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_mistakes_never_touch_an_existing_bundle(tmp_path, small_run, capsys):
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "digits", models / "digits")
    before = bundle_snapshot(models)
    ckpt = str(small_run / "checkpoint.pt")
    runs = str(tmp_path / "runs")
    resume = ["train", "--models-dir", str(models), "--name", "other", "--resume", ckpt]
    resume += ["--runs-dir", runs]
    cases = [
        # The default name would replace the shipped bundle: refused before training starts.
        (["train", "--models-dir", str(models), "--epochs", "1"], "pass --force to replace it"),
        (["export", ckpt, "--models-dir", str(models)], "pass --force to replace it"),
        # A resume with nothing left to train would export weights the metadata does not describe.
        (
            [*resume, "--epochs", "3", "--widths", "8,16", "--hidden", "16"],
            "already trained 3 epochs: pass --epochs greater than 3",
        ),
        (
            [*resume, "--epochs", "5"],
            "was trained with widths=[8, 16] (this run [32, 64]), hidden=16 (this run 64)",
        ),
        (
            ["export", str(REPO / "README.md"), "--models-dir", str(models), "--name", "x"],
            "is not a bnfold checkpoint",
        ),
        (["export", ckpt, "--models-dir", str(REPO / "README.md"), "--name", "x"], "is a file"),
    ]
    for argv, text in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
    assert bundle_snapshot(models) == before
    assert not (models / "other").exists() and not (models / "x").exists()


def test_export_metadata_describes_the_checkpoint_it_exports(tmp_path, small_run, digits_splits):
    """Epochs and accuracy come from the checkpoint's own weights, not a stale summary.json."""
    import json

    from bnfold.bundle import read_manifest
    from training.train import evaluate, load_checkpoint, model_from_checkpoint

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "summary.json").write_text(json.dumps({"epochs": -1, "test_acc": 0.1}))
    assert main(["export", str(run / "checkpoint.pt"), "--name", "s", "--models-dir",
                 str(tmp_path / "m")]) == 0  # fmt: skip
    training = read_manifest(tmp_path / "m" / "s").training
    ckpt = load_checkpoint(run / "checkpoint.pt")
    measured = evaluate(model_from_checkpoint(ckpt), digits_splits.test.x, digits_splits.test.y)
    assert training["epochs"] == ckpt["epoch"] == 3
    assert training["test_acc"] == measured["acc"] and training["seed"] == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "-1"],
        ["verify", "examples"],
        ["verify", "models/digits/bundle.json"],
        ["export", "models/digits/folded.onnx", "--name", "x", "--models-dir", "/tmp/nowhere"],
    ],
)
def test_real_command_prints_no_traceback(argv):
    res = subprocess.run([sys.executable, "-m", "training.cli", *argv], capture_output=True,
                         text=True, cwd=REPO)  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_verify_without_bundle_json_is_one_line(tmp_path, capsys):
    bundle = tmp_path / "digits"
    shutil.copytree(REPO / "models" / "digits", bundle)
    (bundle / "bundle.json").unlink()
    assert main(["verify", str(bundle)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"bnfold-train: error: {bundle} is not a bundle: it has no bundle.json"
    )
    (bundle / "bundle.json").write_text("{not json")
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnfold-train: error: ") and len(err.strip().splitlines()) == 1


def test_verify_shipped_bundle_passes_and_tampered_copy_fails(tmp_path):
    cmd = [sys.executable, "-m", "training.cli", "verify"]
    ok = subprocess.run([*cmd, str(REPO / "models" / "digits")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verified" in ok.stdout and "0 BatchNormalization nodes" in ok.stdout
    bad = tmp_path / "digits"
    shutil.copytree(REPO / "models" / "digits", bad)
    data = bytearray((bad / "unfolded.onnx").read_bytes())
    data[-100] ^= 0xFF
    (bad / "unfolded.onnx").write_bytes(bytes(data))
    res = subprocess.run([*cmd, str(bad)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "sha256 mismatch for the unfolded model" in res.stdout
    assert "VERIFICATION FAILED" in res.stdout and "Traceback" not in res.stderr
