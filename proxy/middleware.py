"""ASGI middleware, as plain classes."""

from __future__ import annotations

import hmac
import ipaddress
import logging

from .errors import (
    Forbidden,
    ProxyError,
    Unauthorized,
    UnsupportedMediaType,
    anthropic_error_response,
    error_response,
    internal_error,
)

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


# Methods that change state: a browser sends them cross-site without a preflight when the body is
# form-like (text/plain, form encodings), so the Origin and Fetch-Metadata headers must be checked.
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON_TYPES = (b"application/json",)


def _header(scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value
    return None


def header(scope, wanted: bytes) -> str | None:
    """A request header's value as text (ASGI servers give names in lower case), None if absent."""
    for name, value in scope["headers"]:
        if name == wanted:
            return value.decode("latin-1")
    return None


def is_loopback(address: str | None) -> bool:
    """Whether a client address is this machine's loopback, compared as a parsed IP address.

    A string test would let ``127.0.0.1.evil.com`` (from a forwarded header) pass as loopback.
    """
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _host_name(host: bytes) -> str:
    """The name part of a Host header or an origin's netloc: ``[::1]:8080`` -> ``::1``."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _local_host(host: bytes | None, scope) -> bool:
    """A Host header naming this machine: loopback, ``localhost``, or the address the request came in on.

    Without admin keys this is what stops DNS rebinding: a page served by ``evil.example`` that
    resolves to 127.0.0.1 still sends ``Host: evil.example``.
    """
    if not host:
        return False
    name = _host_name(host)
    if name == "localhost" or name.endswith(".localhost") or is_loopback(name):
        return True
    server = scope.get("server")
    return bool(server) and name == str(server[0]).lower() and server[0] not in ("0.0.0.0", "::")


def cross_site(scope) -> bool:
    """A request a browser sent on behalf of another site (Fetch Metadata, else Origin against Host)."""
    site = _header(scope, b"sec-fetch-site")
    if site is not None and site.lower() in (b"cross-site", b"same-site"):
        return True
    origin = _header(scope, b"origin")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, scripts, same-origin GET)
    if origin.lower() == b"null":
        return True  # sandboxed frames and file:// pages
    netloc = origin.split(b"://", 1)[-1].rstrip(b"/").lower()
    host = (_header(scope, b"host") or b"").lower()
    return netloc != host


def _has_body(scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return _header(scope, b"transfer-encoding") is not None


def _json_body(scope) -> bool:
    kind = (_header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
    return kind in _JSON_TYPES or kind.endswith(b"+json")


class AdminAuth:
    """Guards ``/admin``: a key from ``server.admin_keys``, or with none configured, loopback only.

    Loopback-only means: the client address is a loopback address (parsed, not a prefix
    test), and the ``Host`` header names this machine (against DNS rebinding). Whatever the
    keys, a state-changing request a browser sends for another site is refused, and a body
    must be JSON (``415`` otherwise), since cross-site forms and ``text/plain`` posts need no
    CORS preflight. The dashboard calls the API from the same origin, which passes all of it.

    API keys never open ``/admin``: an application's key must not be able to pull
    models or repoint aliases.
    """

    def __init__(self, app, keys: tuple[str, ...], prefix: str = "/admin") -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.prefix = prefix

    def problem(self, scope) -> ProxyError | None:
        if scope["method"] in _UNSAFE and cross_site(scope):
            return Forbidden("Cross-site requests to the admin API are refused (Origin or Sec-Fetch-Site names "
                             "another site).", code="cross_site_request")  # fmt: skip
        if self.keys:
            if not key_matches(bearer_token(scope), self.keys):
                return Unauthorized(
                    "The admin API needs a key from server.admin_keys as 'Authorization: Bearer KEY'.",
                    headers={"www-authenticate": "Bearer"},
                )
        else:
            client = scope.get("client")
            if not (client and is_loopback(client[0])):
                return Forbidden("The admin API answers only clients on this machine unless server.admin_keys is set.")
            if not _local_host(_header(scope, b"host"), scope):
                return Forbidden("The admin API answers only requests addressed to this machine (Host: localhost or "
                                 "a loopback address) unless server.admin_keys is set.", code="forbidden_host")  # fmt: skip
        if _has_body(scope) and not _json_body(scope):
            return UnsupportedMediaType("Admin request bodies must be JSON: send 'Content-Type: application/json'.")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            problem = self.problem(scope)
            if problem is not None:
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
