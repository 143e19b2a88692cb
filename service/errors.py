"""The one table from data-plane errors to wire status: HTTP status for REST, gRPC status code.

Every `BnfoldError` carries its HTTP status; `wire_error` adds the gRPC code that means the same
to a gRPC client, so REST (service/app.py) and gRPC (service/grpc/servicer.py) translate the
same error the same way, with the same message. A client's mistake is never UNKNOWN or INTERNAL:
only 500 (the server's own failure) maps to INTERNAL.

The errors only serving raises (unknown model, not ready or busy, past the timeout, admin
calls refused) are defined here; those the contract raises too (bad input, too large, wrong
media type) come from bnfold.errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bnfold.errors import BnfoldError

MAX_SHOWN = 80  # characters of a client's value an error message repeats
MAX_SHOWN_ITEMS = 8  # items of a client's list (names, dimensions) an error message repeats

# HTTP status -> gRPC status code name (grpc.StatusCode[name]; grpc itself is not imported here).
GRPC_CODE = {
    400: "INVALID_ARGUMENT",  # bad tensor, image, variant or request
    401: "UNAUTHENTICATED",  # admin call without a token
    403: "PERMISSION_DENIED",  # admin call with the wrong token, or admin calls turned off
    404: "NOT_FOUND",  # unknown model or version
    413: "RESOURCE_EXHAUSTED",  # over a configured limit (message size, images per request)
    415: "INVALID_ARGUMENT",  # wrong Content-Type or image format
    503: "UNAVAILABLE",  # not ready, queue full, shutting down
    504: "DEADLINE_EXCEEDED",  # past the request timeout or the client's deadline
}


class NotFound(BnfoldError):
    """Unknown model or version (404 / NOT_FOUND)."""

    status_code = 404


class ServiceUnavailable(BnfoldError):
    """The server or a model cannot answer now: not loaded, failed to load, or busy (503)."""

    status_code = 503


class Overloaded(ServiceUnavailable):
    """Too many requests queued, or the server is draining: retry after a while (503)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class GatewayTimeout(BnfoldError):
    """The request outlived the per-request timeout; its queued work was dropped (504)."""

    status_code = 504


class Unauthorized(BnfoldError):
    """An admin call without credentials (401 / UNAUTHENTICATED)."""

    status_code = 401


class Forbidden(BnfoldError):
    """An admin call with a wrong token, or while admin calls are off (403 / PERMISSION_DENIED)."""

    status_code = 403


@dataclass(frozen=True)
class WireError:
    http_status: int
    grpc_code: str
    message: str
    headers: dict[str, str]


def wire_error(exc: BnfoldError) -> WireError:
    """How REST and gRPC answer `exc`."""
    status = exc.status_code
    code = GRPC_CODE.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    return WireError(status, code, exc.message, dict(exc.headers or {}))


def shown(value: object) -> str:
    """repr(value) for an error message, cut after MAX_SHOWN characters: a 10 kB model name
    must not come back 10 kB long (over gRPC, a status message past the client's 8 KiB metadata
    limit never arrives; the client sees RESOURCE_EXHAUSTED instead of the real code)."""
    text = repr(value)
    if len(text) <= MAX_SHOWN:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:MAX_SHOWN]}... ({size} characters)"


def shown_list(values: Sequence, item: Callable[[object], str] = shown) -> str:
    """'[a, b]' for an error message; a long list as its first items and its length."""
    head = ", ".join(item(v) for v in values[:MAX_SHOWN_ITEMS])
    more = f", ... ({len(values)} in all)" if len(values) > MAX_SHOWN_ITEMS else ""
    return f"[{head}{more}]"
