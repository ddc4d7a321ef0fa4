"""ASGI middleware, as plain classes."""

from __future__ import annotations

import hmac

from .errors import Unauthorized, error_response


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
