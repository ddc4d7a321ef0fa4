"""Client API formats other than OpenAI's, in front of the same :class:`~proxy.gateway.Gateway`.

An ingress has three jobs: turn the client's body into the OpenAI chat body
the chain works on (before validation, so cache keys, routing and the backend
translators see one format), turn the answer (JSON bytes or OpenAI SSE frames)
into the client's format, and render errors in the client's shape, before the
first byte and as a stream event after it. The OpenAI endpoints use no ingress
at all, so their path does no extra work. The pure translation lives in
``translate/anthropic_request.py`` and ``translate/anthropic_reply.py``; this
module is the thin part that touches requests and responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .errors import BackendError, ProxyError, anthropic_error_event
from .middleware import request_key
from .streaming import read_json
from .translate import anthropic_reply, anthropic_request

if TYPE_CHECKING:
    from .gateway import Gateway


class Ingress(Protocol):
    endpoint: str  # what history and metrics record as the request's endpoint

    def key(self, scope) -> bytes | None:
        """The caller's API key, for the history's key id."""

    def request(self, body: dict) -> dict:
        """The client's body as an OpenAI chat-completions body; raises :class:`ProxyError` if invalid."""

    def reply(self, body: bytes) -> bytes:
        """A complete OpenAI ``chat.completion`` as the client's answer."""

    def frames(self, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """OpenAI SSE frames as the client's stream, chunk in, chunk out."""

    def headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        """Response headers this API's clients look for."""

    def error_event(self, exc: ProxyError) -> bytes:
        """The event that ends a stream failing after it started."""


class AnthropicIngress:
    """``POST /v1/messages``: Anthropic's Messages API."""

    endpoint = "/v1/messages"

    def key(self, scope) -> bytes | None:
        return request_key(scope)

    def request(self, body: dict) -> dict:
        return anthropic_request.to_openai(body)

    def reply(self, body: bytes) -> bytes:
        try:
            completion = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BackendError("the backend's answer is not JSON") from None
        if not isinstance(completion, dict):
            raise BackendError("the backend's answer is not a JSON object")
        return orjson.dumps(anthropic_reply.to_message(completion))

    async def frames(self, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        stream = anthropic_reply.MessageStream()
        try:
            async for frame in frames:
                out = stream.feed(frame)
                if out:
                    yield out
            tail = stream.close()
            if tail:
                yield tail
        finally:
            await frames.aclose()  # type: ignore[attr-defined]

    def headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return [(b"request-id", request_id.encode())]  # the anthropic SDK's ._request_id

    def error_event(self, exc: ProxyError) -> bytes:
        return anthropic_error_event(exc)


ANTHROPIC = AnthropicIngress()  # stateless: one per process is enough


async def count_tokens(request: Request, gateway: Gateway) -> Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, a fast estimate (see the README).

    The model must resolve, as for a real request (404 otherwise), but no backend is
    asked: the estimate is characters / 4 plus a fixed figure per image, and the
    ``X-Proxy-Token-Estimate`` header says so.
    """
    body = await read_json(request.receive, request.scope["headers"], gateway.config.server.max_body_bytes)
    openai = anthropic_request.count_request(body)
    await gateway.resolver.resolve(openai["model"], "chat", openai, request.headers.get("x-task-type") or None)
    tokens = anthropic_request.estimate_tokens(openai)
    return Response(orjson.dumps({"input_tokens": tokens}), media_type="application/json",
                    headers={"x-proxy-token-estimate": "chars/4"})  # fmt: skip
