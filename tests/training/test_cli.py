"""bnfold-train: help, one-line errors, verify passing a good bundle and failing a tampered one."""

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


def test_bad_option_values_are_refused_by_the_parser(capsys):
    for argv, text in (
        (["train", "--bn-placement", "middle"], "invalid choice: 'middle'"),
        (["train", "--bn-momentum", "2"], "momentum must be in (0, 1]"),
        (["train", "--widths", "a,b"], "comma-separated ints"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert text in capsys.readouterr().err


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
