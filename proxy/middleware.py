"""ASGI middleware, as plain classes."""

from __future__ import annotations

import hmac

from .errors import Forbidden, Unauthorized, error_response


def bearer_token(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Compare against every key, in constant time for each, and without stopping at the first match."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class APIKeyAuth:
    """With ``server.api_keys`` set, every ``/v1`` request needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, keys: tuple[str, ...], prefix: str = "/v1") -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        if self.keys and scope["type"] == "http" and scope["path"].startswith(self.prefix):
            token = bearer_token(scope)
            if not key_matches(token, self.keys):
                if token is None:
                    message = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
                else:
                    message = "Incorrect API key provided."
                response = error_response(Unauthorized(message, headers={"www-authenticate": "Bearer"}))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class AdminAuth:
    """``/admin`` needs a key from ``server.admin_keys``; with none configured, only loopback clients get in.

    API keys never open ``/admin``: an application's key must not be able to pull
    models or repoint aliases.
    """

    def __init__(self, app, keys: tuple[str, ...], prefix: str = "/admin") -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            if self.keys:
                allowed = key_matches(bearer_token(scope), self.keys)
                problem = Unauthorized(
                    "The admin API needs a key from server.admin_keys as 'Authorization: Bearer KEY'.",
                    headers={"www-authenticate": "Bearer"},
                )
            else:
                client = scope.get("client")
                allowed = bool(client) and (client[0] in _LOOPBACK or client[0].startswith("127."))
                problem = Forbidden(
                    "The admin API answers only clients on this machine unless server.admin_keys is set."
                )
            if not allowed:
                await error_response(problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)
