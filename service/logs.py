"""Log lines as text or JSON, each stamped with the id of the request being served.

The request id lives in a context variable set by the access middleware, so any line logged
while a request is served (an error with its traceback included) names the request, and a
client's X-Request-ID header finds every line about its request.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# An incoming id is kept when it is short and plain (UUIDs, trace ids): it goes into log lines.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def request_id_for(incoming: str | None) -> str:
    """The client's request id (X-Request-ID header or gRPC metadata) when it is sane, else a
    new random one."""
    if incoming is not None and SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    # 128 random bits as 32 hex digits, like uuid4().hex: an id to find log lines by, not a
    # secret, so Python's generator serves; uuid4 reads os.urandom, a system call that costs
    # the event loop a GIL hand-off per request while decoding threads are busy.
    return f"{_ids.getrandbits(128):032x}"


_ids = random.Random()  # seeded from os.urandom once
os.register_at_fork(after_in_child=_ids.seed)  # forked workers must not repeat each other's ids


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`: the request being served, or '-' outside any request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """Control characters escaped ('\\n', '\\x1b'): a value from a client or a bundle (a
    version with a newline in it) cannot start a forged line in a text log, nor send terminal
    escape codes."""
    if not CONTROL.search(text):
        return text
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per message: control characters in the message are escaped (a
    traceback, added after it, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extra `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
            "pid": record.process,  # which worker process (BNFOLD_WORKERS > 1)
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def log_handler(fmt: str = "text", stream=None) -> logging.Handler:
    """A stream handler (stderr by default) with the request id filter and the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """The root logger for the whole process, uvicorn's loggers included (they propagate)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(log_handler(fmt))
    root.setLevel(level.upper())
