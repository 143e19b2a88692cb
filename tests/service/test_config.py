"""service/config.py: BNFOLD_* environment variables, defaults, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_defaults(monkeypatch):
    for name in ("MODELS_DIR", "HOST", "PORT", "PROVIDER"):
        monkeypatch.delenv(f"BNFOLD_{name}", raising=False)
    s = Settings()
    assert (s.models_dir, s.host, s.port, s.provider) == (Path("models"), "0.0.0.0", 8000, "auto")
    assert s.max_body_bytes == 10 * 1024 * 1024 and s.max_pixels == 4096 * 4096
    assert (s.max_batch_size, s.max_delay_ms, s.max_queue_size) == (32, 2.0, 128)
    # A drain must outlast the request timeout, so queued requests end with an answer.
    assert s.request_timeout_s < s.drain_timeout_s


def test_environment_with_the_bnfold_prefix(monkeypatch):
    monkeypatch.setenv("BNFOLD_PORT", "9001")
    monkeypatch.setenv("BNFOLD_MAX_IMAGES_PER_REQUEST", "5")
    monkeypatch.setenv("PORT", "1234")  # unprefixed: not ours
    s = Settings()
    assert s.port == 9001 and s.max_images_per_request == 5


def test_every_field_is_documented():
    assert all(field.description for field in Settings.model_fields.values())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("provider", "tpu", "Input should be 'auto', 'cpu' or 'cuda'"),
        ("port", "0", "Input should be greater than or equal to 1"),
        ("max_images_per_request", "0", "Input should be greater than or equal to 1"),
        ("max_batch_size", "0", "Input should be greater than or equal to 1"),
        ("max_queue_size", "0", "Input should be greater than or equal to 1"),
        ("request_timeout_s", "0", "Input should be greater than 0"),
        ("log_format", "xml", "Input should be 'text' or 'json'"),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(monkeypatch, field, value, message):
    monkeypatch.setenv(f"BNFOLD_{field.upper()}", value)
    with pytest.raises(ValidationError, match=message):
        Settings()
