"""Service settings, read from the environment (prefix `BNFOLD_`) by pydantic-settings.

Every limit that protects the server lives here, documented, so the 413 a client gets is a
number the operator chose and can read in one place. Settings for dynamic batching, queues and
shutdown (issue 7) belong in the marked section below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.preprocess import DEFAULT_MAX_PIXELS

Provider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """bnfold-serve configuration. Each field reads `BNFOLD_<FIELD>` from the environment."""

    model_config = SettingsConfigDict(env_prefix="BNFOLD_", extra="ignore")

    models_dir: Path = Field(
        Path("models"),
        description="Folder holding one bundle folder per model (models/<name>/bundle.json).",
    )
    host: str = Field(
        "0.0.0.0",
        description="Address uvicorn binds. 0.0.0.0 in a container; `make serve` uses 127.0.0.1.",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port uvicorn listens on.")
    provider: Provider = Field(
        "auto",
        description="onnxruntime execution provider: 'auto' (CUDA when onnxruntime offers it, "
        "else CPU), or 'cpu' / 'cuda' to force one ('cuda' fails start-up when unavailable).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads per onnxruntime session; 0: one per core (onnxruntime).",
    )
    max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; larger bodies get 413 (checked on the "
        "Content-Length header and again on the bytes actually received).",
    )
    max_images_per_request: int = Field(
        64,
        ge=1,
        description="Most images (or tensor rows) in one request; more get 413.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Largest decoded image size in pixels (width x height); bigger images, "
        "decompression bombs included, get 413 before they are decoded.",
    )
    log_level: LogLevel = Field("info", description="Log level of the service and uvicorn.")
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long requests in flight may take to finish before the "
        "server exits (uvicorn's graceful shutdown timeout).",
    )

    # --- Batching and backpressure (issue 7) go here: max_batch_size, max_delay_ms, queue
    # --- size per model, request timeout.
