"""Running the app under uvicorn with a graceful shutdown that ends in exit code 0.

On SIGTERM (or Ctrl+C): readiness answers 503 at once and new requests are refused with 503
(the runtime's drain flag, read by the access middleware); uvicorn closes the listening socket,
lets requests in flight and queued finish for up to `drain_timeout_s`, runs the lifespan
shutdown, and `serve` returns 0, or 1 when the drain timeout cut requests off. Plain uvicorn
re-raises the signal after its shutdown, so the process would die of SIGTERM (exit -15) even
after a clean drain.
"""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from service.app import create_app
from service.config import Settings
from service.runtime import ModelRuntime


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals start the runtime's drain and are not re-raised."""

    def __init__(self, config: uvicorn.Config, runtime: ModelRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only set flags. The signal is not recorded in
        # uvicorn's captured signals, so it is not raised again once the drain is over.
        self.runtime.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting
        else:
            self.should_exit = True


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to ours (service.logs)
        access_log=False,  # the access middleware writes one line per request, with its id
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, drain, return the exit code."""
    config = uvicorn_config(settings)
    server = DrainingServer(config, config.app.state.runtime)
    server.run()
    return 1 if server.runtime.cut_off else 0
