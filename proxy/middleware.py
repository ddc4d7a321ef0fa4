"""ASGI middleware, as plain classes."""

from __future__ import annotations

import hmac
import logging

from .errors import Forbidden, Unauthorized, error_response, internal_error


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


log = logging.getLogger("llm_proxy")


class UnexpectedErrors:
    """The outermost layer: an exception nothing else handled becomes one OpenAI-shaped 500 and one log line.

    Starlette's own last resort answers 500 and then re-raises, so uvicorn logs a traceback
    for every such request and drops the client's keep-alive connection. Here the
    exception stops: the client gets ``internal_error`` (with ``x-request-id`` when the
    gateway had opened the request), the connection stays usable, and the log gets one
    ERROR line naming the request; the traceback only at DEBUG, since a failing request
    repeated by a busy client would otherwise flood the log.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # the gateway puts the request id here
        started = finished = False

        async def tracking_send(message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - this is the place where every exception stops
            request_id = state.get("request_id")
            log.error("request %s (%s %s) failed: %s: %s", request_id or "-", scope.get("method"),
                      scope.get("path"), type(exc).__name__, exc)  # fmt: skip
            log.debug("traceback of request %s", request_id or "-", exc_info=exc)
            try:
                if not started:
                    problem = internal_error()
                    if request_id:
                        problem.headers = {"x-request-id": request_id}
                    await error_response(problem)(scope, receive, send)
                elif not finished:
                    # End the body where it is. For a chunked answer this keeps the connection; for one
                    # with a Content-Length the server refuses the short body and closes the connection,
                    # which is right: the client must not take a cut answer for a whole one.
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception as late:  # noqa: BLE001 - the client is gone or the server gave up on it
                log.debug("request %s: could not end the answer: %s", request_id or "-", late)
