"""`bnfold-serve` (or `python -m service`): serve the bundles in the models folder, REST with
uvicorn and gRPC with grpc.aio, in this one process.

Settings come from BNFOLD_* environment variables; --host, --port, --grpc-port,
--models-dir, --provider and --workers override them. With more than one worker, this process
supervises that many server processes (service/supervisor.py). A bad setting prints one line
and exits 2 instead of a traceback. SIGTERM drains the requests in flight and exits 0
(service/server.py).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from bnfold.errors import validation_message
from service.config import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bnfold-serve", description="Serve bnfold model bundles over HTTP (REST) and gRPC."
    )
    parser.add_argument("--host", help="bind address (BNFOLD_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="HTTP port (BNFOLD_PORT, default 8000)")
    parser.add_argument(
        "--grpc-port", type=int, help="gRPC port (BNFOLD_GRPC_PORT, default 8001; 0: off)"
    )
    parser.add_argument("--models-dir", help="bundle folder (BNFOLD_MODELS_DIR, default models)")
    parser.add_argument("--provider", help="auto, cpu or cuda (BNFOLD_PROVIDER, default auto)")
    parser.add_argument(
        "--workers", type=int, help="server processes (BNFOLD_WORKERS, default 0: one per core)"
    )
    return parser.parse_args(argv)


def load_settings(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags given on the command line."""
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as exc:
        print(f"bnfold-serve: invalid setting: {validation_message(exc.errors())}", file=sys.stderr)
        return 2
    from service.logs import configure_logging

    if settings.provider == "cuda":  # only a forced CUDA can be missing ('auto' falls back)
        # imports onnxruntime: not in a supervisor
        from bnfold.toolchain.sessions import resolve_providers

        try:
            resolve_providers(settings.provider)
        except RuntimeError as exc:
            print(f"bnfold-serve: {exc}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level, settings.log_format)
    settings = split_cores(settings)
    if settings.workers > 1:
        from service.supervisor import serve_workers  # the parent imports no web framework

        return serve_workers(settings)
    from service.server import serve

    return serve(settings)


def split_cores(settings: Settings) -> Settings:
    """Settings with `workers` and `threads` resolved from the cores this process may use."""
    from service.cpus import resolve_workers, threads_per_worker, usable_cpus

    cores = usable_cpus()
    workers = resolve_workers(settings.workers, cores)
    threads = threads_per_worker(settings.threads, cores, workers)
    return settings.model_copy(update={"workers": workers, "threads": threads})


if __name__ == "__main__":
    sys.exit(main())
