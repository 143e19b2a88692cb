"""Domain errors carrying an HTTP status; one handler in the API turns them into {"error": ...}.

Plain Python on purpose: the contract modules raise these without importing the web stack.
"""


class BnfoldError(Exception):
    """An error whose message is safe and useful to show to the client."""

    status_code = 500

    def __init__(
        self, message: str, status_code: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers  # sent with the error response, e.g. Retry-After on a 503
        if status_code is not None:
            self.status_code = status_code


class BadInput(BnfoldError):
    """The client sent something we cannot use (400)."""

    status_code = 400


class UnsupportedMediaType(BnfoldError):
    """Wrong Content-Type or image format (415)."""

    status_code = 415


class PayloadTooLarge(BnfoldError):
    """Body or image over a configured limit (413)."""

    status_code = 413


class BundleError(BnfoldError):
    """A bundle on disk is missing, malformed, or fails verification."""

    status_code = 500


def validation_message(errors: list[dict], limit: int = 3) -> str:
    """pydantic's error list as one line a client can act on: 'where: what; where: what'."""
    parts = []
    for err in errors[:limit]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more
