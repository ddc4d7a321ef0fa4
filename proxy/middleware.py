"""ASGI middleware, as plain classes."""

from __future__ import annotations

import hmac

from .errors import Forbidden, Unauthorized, anthropic_error_response, error_response

# Anthropic's clients send their key as x-api-key (the anthropic SDK, coding agents), some as a bearer.
ANTHROPIC_PREFIX = "/v1/messages"


def bearer_token(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def api_key_header(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return value.strip() or None
    return None


def request_key(scope) -> bytes | None:
    """The key of an Anthropic-style request: ``Authorization: Bearer``, else ``x-api-key``."""
    token = bearer_token(scope)
    return token if token is not None else api_key_header(scope)


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Compare against every key, in constant time for each, and without stopping at the first match."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class APIKeyAuth:
    """With ``server.api_keys`` set, every ``/v1`` request needs ``Authorization: Bearer <key>``.

    ``/v1/messages*`` (the Anthropic API) also takes the key as ``x-api-key``, and
    refuses in Anthropic's error shape.
    """

    def __init__(self, app, keys: tuple[str, ...], prefix: str = "/v1") -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        if self.keys and scope["type"] == "http" and scope["path"].startswith(self.prefix):
            anthropic = scope["path"].startswith(ANTHROPIC_PREFIX)
            token = bearer_token(scope)
            allowed = key_matches(token, self.keys)
            if anthropic and not allowed:
                # The anthropic SDK sends both headers when given both an api_key and an auth_token.
                token = api_key_header(scope) or token
                allowed = key_matches(token, self.keys)
            if not allowed:
                if token is None:
                    how = "'x-api-key: YOUR_KEY' or " if anthropic else ""
                    message = f"You didn't provide an API key. Send it as {how}'Authorization: Bearer YOUR_KEY'."
                else:
                    message = "Incorrect API key provided."
                problem = Unauthorized(message, headers={"www-authenticate": "Bearer"})
                response = anthropic_error_response(problem) if anthropic else error_response(problem)
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
