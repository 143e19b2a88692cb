"""Service settings, read from the environment (prefix `BNFOLD_`) by pydantic-settings.

Every limit that protects the server lives here, documented, so the 413, 503 or 504 a client
gets is a number the operator chose and can read in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bnfold.preprocess import DEFAULT_MAX_PIXELS

Provider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]


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
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="TCP port of the gRPC Open Inference Protocol (inference."
        "GRPCInferenceService, grpc.health.v1, reflection), served by the same process on the "
        "same address; 0 turns gRPC off.",
    )
    provider: Provider = Field(
        "auto",
        description="onnxruntime execution provider: 'auto' (CUDA when onnxruntime offers it, "
        "else CPU), or 'cpu' / 'cuda' to force one ('cuda' fails start-up when unavailable).",
    )
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="What computes each variant: 'auto' (float32 and int8 in onnxruntime, the "
        "engine their proof was made with; bf16 in OpenVINO where the CPU computes bf16 "
        "natively), 'onnxruntime' (everything, no bf16), or 'openvino' (folded float32, always "
        "forced to float32, and int8 in OpenVINO too). The unfolded model always "
        "runs in onnxruntime with BN executed; the CUDA provider keeps everything in "
        "onnxruntime.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Server processes sharing the HTTP port (and the gRPC port), under one "
        "supervisor; 0: one per core this process may use (its CPU affinity and cgroup CPU "
        "quota, e.g. docker --cpus or a Kubernetes CPU limit, not the host's count); 1: a "
        "single process, no supervisor. Limits such as max_queue_size hold per worker.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads per onnxruntime session; 0: this worker's share of the "
        "cores (usable cores // workers, at least 1), so workers never oversubscribe them.",
    )
    idle_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of a run measured at 2 ms or more when the machine is "
        "otherwise idle (the other processes, this server's other workers included, used under "
        "half a core over the last 0.1 s): 0: every usable core; 1: off. Each worker then "
        "holds a second onnxruntime session of the folded and int8 variants (their weights "
        "twice in memory, so not for a file over 128 MiB); with one worker on every core none "
        "is needed.",
    )
    thread_spinning: bool = Field(
        False,
        description="Let onnxruntime's intra-op threads spin-wait for work between runs "
        "(onnxruntime's own default). Off here: the cores are shared with the event loop, the "
        "decoding threads and the other workers, and a spinning thread takes a core from them.",
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
    log_format: LogFormat = Field(
        "text",
        description="Log lines (access and errors): 'text', or 'json' for one JSON object per "
        "line. Access lines carry the request id sent back in the X-Request-ID header.",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM (or Ctrl+C) readiness answers 503 at once and the listening "
        "socket closes (new connections are refused); every request on a connection already "
        "open is served, with Connection: close. They get this long in all, then the server "
        "exits (0 when none was cut off, else 1). Keep it above request_timeout_s.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds a client has, from opening a connection (or from the first byte of "
        "a request on a kept-alive one), to send the request's complete headers; past it the "
        "connection is closed. Stops clients that hold connections open by sending nothing or a "
        "header a byte at a time (slowloris). The body's pace is bounded by "
        "min_body_rate_bytes_s.",
    )
    min_body_rate_bytes_s: int = Field(
        4096,
        ge=1,
        description="Slowest pace a request body may arrive at, in bytes per second on "
        "average after the first body_grace_s seconds; a slower body is cut off with 408 and "
        "its connection closed (counted as status 408 in bnfold_requests_total). A request's "
        "body is read whole before it takes a queue slot (max_queue_size), so bodies that "
        "trickle in hold connections, not the model's slots.",
    )
    body_grace_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds a request body may take before min_body_rate_bytes_s applies.",
    )
    max_pending_body_bytes: int = Field(
        0,
        ge=0,
        description="Most bytes of request bodies being received at once, per worker, before "
        "their requests are admitted; a body that would pass it gets 503 with Retry-After. "
        "0: max_queue_size x max_body_bytes (the most the admitted requests of one model may "
        "hold).",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Most open HTTP connections per worker; 0: derived from the open-files "
        "limit (RLIMIT_NOFILE, raised to its hard limit at start), leaving a reserve of "
        "descriptors for gRPC, model files and logs. At the cap, a new connection takes the "
        "place of the longest idle one (closed); when none is idle it is answered 503 and "
        "closed. Either is logged (at most one line per 10 s).",
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        description="Seconds an idle keep-alive HTTP connection stays open (uvicorn's "
        "timeout_keep_alive). While draining, a connection idle at SIGTERM is closed after this "
        "long unless a request arrives on it (that request is then served).",
    )

    # --- Dynamic batching and backpressure.
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Most images (tensor rows) merged into one onnxruntime run from concurrent "
        "requests for the same model and variant; 1 turns batching off. A request with more "
        "images than this runs alone, never split.",
    )
    max_delay_ms: float = Field(
        2.0,
        ge=0,
        description="How long a request that queued behind a running batch may wait for more "
        "requests to fill its batch. A request that finds the model idle runs at once.",
    )
    inline_run_us: float = Field(
        10_000.0,
        ge=0,
        le=1_000_000,
        description="A run whose size (rows) has measured under this many microseconds on the "
        "model's current sessions is done on the event loop, unbatched, when the model is idle, "
        "no inference thread is running and the worker holds no other request: nothing else "
        "waits for the loop then, and the trip to the inference thread and back (two thread "
        "wake-ups) would only delay the answer. The limit bounds how long a request arriving "
        "during the run (a health probe) waits for the loop. 0: every run goes to the "
        "inference thread.",
    )
    max_queue_size: int = Field(
        128,
        ge=1,
        description="Most requests per model inside one worker at once (decoding, "
        "queued for a batch or running); the next gets 503 with Retry-After at once. Bounds "
        "memory: about max_queue_size x max_body_bytes per model and worker at worst; the "
        "server admits up to workers x max_queue_size. Keep it above the number of clients "
        "expected at once per worker (a load balancer's connections per replica / workers): "
        "below it, a steady load is answered mostly 503 instead of waiting a few ms.",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a request may take once admitted (its body has arrived by then: "
        "decoding, queue and inference); past it the answer is 504 and its queued work is dropped.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Turns on the calls that change what is served (model repository load and "
        "unload, /v1 reload), for callers that send 'Authorization: Bearer <token>' (gRPC: "
        "'authorization' metadata). Unset: those calls answer 403. At least 16 characters; "
        "compared in constant time and never logged.",
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        description="Seconds sent in the Retry-After header of a 503 for a full queue or a "
        "server that is shutting down.",
    )

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError(
                "must be at least 16 characters; make one with python -c "
                "'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return token
