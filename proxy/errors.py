"""Every error the proxy answers, and the one place its OpenAI-shaped body is built.

Code anywhere in the request path raises a :class:`ProxyError` subclass; the HTTP
layer turns it into ``{"error": {"message", "type", "param", "code"}}`` with the
matching status, or into an SSE error event once a stream has started. Backend
adapters map foreign exceptions (httpx, backend error bodies) to these classes at
their boundary, so nothing above them sees a wire format or a raw backend body.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response


class ProxyError(Exception):
    """An error with an HTTP status and an OpenAI error ``type``/``code``.

    ``retryable`` marks failures where trying another backend may succeed
    (connection refused, busy, 5xx, timeout); routing uses it, clients never see it.
    """

    status = 500
    type = "api_error"
    code: str | None = None
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the client's fault -------------------------------------------------------------------------


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientGone(ProxyError):
    """The client disconnected before the request was read; the answer goes nowhere."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus the answer asked for) does not fit the model's context window.

    Retryable in the routing sense only: another backend's copy of the model may have a larger window.
    """

    code = "context_length_exceeded"
    retryable = True


class RequestTimeout(ProxyError):
    """The client did not send its whole request in time (``server.header_timeout``/``body_timeout``)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UnsupportedParameter(InvalidRequest):
    """A parameter the chosen backend cannot honour: refused rather than silently dropped."""

    code = "unsupported_parameter"


class Overloaded(ProxyError):
    """Every backend that could answer is at ``max_concurrent`` with a full queue.

    Retryable in the routing sense: another backend may have room.
    """

    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    retryable = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, headers={"retry-after": str(max(1, round(retry_after)))})


# --- the backend's fault ------------------------------------------------------------------------


class BackendError(ProxyError):
    """The backend answered, but with something that is not a usable reply."""

    status = 502
    type = "api_error"
    code = "backend_error"
    retryable = True


class BackendUnavailable(BackendError):
    """Connection refused or reset, DNS failure, or the backend said it is busy."""

    status = 503
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"


class BackendAuthFailed(BackendError):
    """The backend refused the proxy's own credentials (its 401/403): another backend may do, asking again will not."""


class BackendRejected(ProxyError):
    """The backend refused the request as invalid (its 4xx): the client's input, so not retryable."""

    status = 400
    type = "invalid_request_error"


class TemplateRejected(BackendRejected):
    """The model's chat template refused the conversation's roles (no system role, or no alternation).

    The gateway adapts the conversation, retries once and remembers the model's limitation.
    """

    def __init__(self, message: str, *, system_role: bool, alternation: bool) -> None:
        super().__init__(message, param="messages")
        self.system_role = system_role  # the template rejected a system message
        self.alternation = alternation  # the template requires user/assistant alternation
        self.candidate = None  # set by the router: which backend and model refused


# --- rendering ----------------------------------------------------------------------------------


def error_response(exc: ProxyError) -> Response:
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def sse_error_event(exc: ProxyError) -> bytes:
    """The SSE frame that ends a stream which fails after it has started."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"


def internal_error() -> ProxyError:
    # The message stays generic on purpose: an unexpected exception's text may carry secrets.
    return ProxyError("internal error in llm-proxy; see the proxy's log for details", code="internal_error")


class StoreUnavailable(ProxyError):
    """The database that holds the proxy's shared state (PostgreSQL) is not answering.

    Requests to models keep being served (history is buffered, the cache answers
    misses); what needs the database, admin writes above all, answers this instead
    of an internal error, so a script knows to try again.
    """

    status = 503
    type = "api_error"
    code = "store_unavailable"

    def __init__(self, message: str = "the proxy's database is unavailable; nothing was changed, try again shortly",
                 retry_after: float = 5.0) -> None:  # fmt: skip
        super().__init__(message, headers={"retry-after": str(max(1, round(retry_after)))})


# --- the admin API ------------------------------------------------------------------------------


class NotInstalled(Conflict):
    """An activation needs a model that some of the alias's nodes do not have (and no pull was asked for).

    The body's error object also lists those nodes under ``missing_nodes``, so a script can pull there.
    """

    code = "model_not_installed"

    def __init__(self, message: str, missing_nodes: list[str]) -> None:
        super().__init__(message, param="model")
        self.missing_nodes = missing_nodes

    def body(self) -> dict:
        body = super().body()
        body["error"]["missing_nodes"] = self.missing_nodes
        return body


class DiskLimit(Conflict):
    """A download that would cross a node's disk limits, or needs ``"confirm": true``: refused before it starts.

    The body's error object carries the figures under ``disk`` (bytes: needed, free, limits).
    """

    code = "disk_limit"

    def __init__(self, message: str, disk: dict, *, code: str | None = None) -> None:
        super().__init__(message, param="model", code=code)
        self.disk = disk

    def body(self) -> dict:
        body = super().body()
        body["error"]["disk"] = self.disk
        return body


# --- the Anthropic Messages ingress -------------------------------------------------------------

# Anthropic's error type per status. The status itself stays the proxy's (a 503 is still a 503,
# so history and metrics read the same whichever API the client spoke); the SDK picks its
# exception class from the status and reads the type from the body.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(exc: ProxyError, request_id: str | None = None) -> dict:
    kind = _ANTHROPIC_TYPES.get(exc.status) or ("api_error" if exc.status >= 500 else "invalid_request_error")
    body: dict = {"type": "error", "error": {"type": kind, "message": exc.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def anthropic_error_response(exc: ProxyError) -> Response:
    """``{"type": "error", "error": {"type", "message"}}`` with the error's status and headers."""
    headers = dict(exc.headers or {})
    request_id = headers.get("x-request-id")
    if request_id:
        headers["request-id"] = request_id  # where the anthropic SDK looks for it (err.request_id)
    return Response(
        orjson.dumps(anthropic_error_body(exc, request_id)),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def anthropic_error_event(exc: ProxyError) -> bytes:
    """The ``event: error`` that ends an Anthropic stream which fails after it has started."""
    return b"event: error\ndata: " + orjson.dumps(anthropic_error_body(exc)) + b"\n\n"
