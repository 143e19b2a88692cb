"""service/__main__.py: `bnfold-serve` flags over environment, one-line errors, the server call."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from service.__main__ import load_settings, main, parse_args
from service.server import DrainingServer


def test_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BNFOLD_PORT", "9001")
    monkeypatch.setenv("BNFOLD_HOST", "127.0.0.1")
    s = load_settings(parse_args(["--port", "9100", "--models-dir", str(tmp_path)]))
    assert (s.host, s.port, s.models_dir) == ("127.0.0.1", 9100, tmp_path)


def test_main_runs_the_draining_server_with_the_settings(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(DrainingServer, "run", lambda self: calls.update(config=self.config))
    monkeypatch.setenv("BNFOLD_LOG_LEVEL", "warning")
    monkeypatch.setenv("BNFOLD_DRAIN_TIMEOUT_S", "12.5")
    monkeypatch.setenv("BNFOLD_WORKERS", "1")  # one process: no supervisor
    assert main(["--host", "127.0.0.1", "--port", "8123", "--models-dir", str(tmp_path)]) == 0
    config = calls["config"]
    assert (config.host, config.port, config.log_level) == ("127.0.0.1", 8123, "warning")
    assert config.timeout_graceful_shutdown == 12.5
    assert config.access_log is False  # the access middleware logs each request once
    assert config.app.state.core.settings.models_dir == tmp_path


def test_a_bad_setting_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("BNFOLD_PROVIDER", "tpu")
    assert main([]) == 2
    assert capsys.readouterr().err == (
        "bnfold-serve: invalid setting: provider: Input should be 'auto', 'cpu' or 'cuda'\n"
    )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_forcing_cuda_without_it_is_one_line_and_exit_2(capsys):
    assert main(["--provider", "cuda"]) == 2
    assert capsys.readouterr().err.startswith(
        "bnfold-serve: execution provider 'cuda' requested but this onnxruntime offers only"
    )


def test_a_short_admin_token_is_one_line_and_exit_2_without_echoing_it(monkeypatch, capsys):
    monkeypatch.setenv("BNFOLD_ADMIN_TOKEN", "hunter2")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnfold-serve: invalid setting: admin_token: Value error, must be at")
    assert "hunter2" not in err and err.count("\n") == 1
