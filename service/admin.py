"""Who may change what the server serves: the admin token (BNFOLD_ADMIN_TOKEN).

Loading, unloading and reloading models are off unless the token is set. A caller then sends it
as `Authorization: Bearer <token>` (REST header, or gRPC metadata `authorization`); it is
compared in constant time and never logged or echoed. Inference, health and metadata stay open.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from service.errors import Forbidden, Unauthorized

BEARER = "bearer "


class AdminGuard:
    """`check(authorization)`: None when the caller holds the admin token, else 401/403."""

    def __init__(self, token: SecretStr | None) -> None:
        value = token.get_secret_value() if token is not None else ""
        self._token = value.encode() if value else None

    def check(self, authorization: str | None) -> None:
        if self._token is None:
            raise Forbidden(
                "model repository changes are off on this server: start it with "
                "BNFOLD_ADMIN_TOKEN set to allow load, unload and reload"
            )
        if not authorization:
            raise Unauthorized(
                "this call changes what the server serves: send the header "
                "'Authorization: Bearer <BNFOLD_ADMIN_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if authorization[: len(BEARER)].lower() != BEARER:
            raise Unauthorized(
                "the Authorization header must be 'Bearer <BNFOLD_ADMIN_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = authorization[len(BEARER) :].strip().encode()
        if not given:
            raise Unauthorized(
                "the Authorization header has no token after 'Bearer': send "
                "'Bearer <BNFOLD_ADMIN_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given, self._token):
            raise Forbidden("the admin token is not the one this server was given")
