"""Adapter for OpenAI-compatible servers: vLLM, llama.cpp server, LM Studio.

Requests pass through with the model renamed; replies come back byte for byte
but for the model name. Stream chunks are forwarded as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from ..errors import (
    BackendAuthFailed,
    BackendError,
    BackendRejected,
    BackendUnavailable,
    ModelNotFound,
    ProxyError,
    TemplateRejected,
)
from ..signals import Load, parse_vllm_metrics
from ..translate.model_info import ModelInfo, from_openai_card
from ..translate.passthrough import ModelRenamer, request_body
from ._http import UpstreamStatus, _error_message
from .base import HTTPBackend, Reply, ServedModel, primed

_ERROR_EVENT = b'data: {"error"'


def _event_message(event: bytes) -> str:
    """The message of an SSE error event (``data: {"error": {...}}``), as far as it arrived."""
    data = event[6:].split(b"\n", 1)[0].strip()  # after "data: "
    message, _ = _error_message(data)
    return message or "an error event without a message"


def _template_complaint(message: str) -> dict | None:
    """Which role rule a Jinja chat template raised about, from the text vLLM relays.

    Gemma: "System role not supported"; Mistral and Llama 2 style:
    "Conversation roles must alternate user/assistant/user/assistant/...".
    """
    text = message.lower()
    if "system role not supported" in text or "system role is not supported" in text:
        return {"system_role": True, "alternation": False}
    if "roles must alternate" in text:
        return {"system_role": False, "alternation": True}
    return None


class OpenAIBackend(HTTPBackend):
    _tokenizer: bool | None = None  # does the server have llama.cpp's /apply-template and /tokenize?

    def model_key(self, name: str) -> str:
        return name

    def _error(self, exc: UpstreamStatus, target: str) -> ProxyError:
        msg, where = exc.message, f"backend {self.name!r}"
        param = None
        if isinstance(exc.body, dict):
            err = exc.body.get("error")
            param = (err if isinstance(err, dict) else exc.body).get("param")
        if exc.status == 404 and ("model" in msg.lower() or param == "model"):
            return ModelNotFound(f"model {target!r} is not available on {where}: {msg}", param="model")
        if exc.status in (401, 403):  # the proxy's key for the backend is wrong: not the client's fault
            return BackendAuthFailed(f"{where} refused the proxy's credentials ({exc.status}); check its api_key")
        if exc.status in (503, 429):
            return BackendUnavailable(f"{where} is busy: {msg}")
        if exc.status == 400 and (template := _template_complaint(msg)):
            return TemplateRejected(f"{where}: the model's chat template refused the conversation: {msg}", **template)
        if 400 <= exc.status < 500:
            return BackendRejected(
                f"{where} rejected the request: {msg}", param=param if isinstance(param, str) else None
            )
        return BackendError(f"{where} failed ({exc.status}): {msg}")

    async def _send(self, path: str, body: dict, target: str) -> Reply:
        renamer = ModelRenamer(target, body["model"])
        if body.get("stream"):
            # Usage for every stream, so history and metrics have it; the gateway drops the usage
            # chunk again when the client did not ask (proxy/usage.py).
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            if not options.get("include_usage"):
                body = {**body, "stream_options": {**options, "include_usage": True}}
        payload = request_body(body, target)
        try:
            resp = await self.http.post(path, payload, stream=bool(body.get("stream")))
        except UpstreamStatus as exc:
            raise self._error(exc, target) from None
        if not body.get("stream"):
            return renamer.body(resp.content)
        return await primed(self._frames(resp, renamer))

    async def _frames(self, resp, renamer: ModelRenamer) -> AsyncIterator[bytes]:
        # No empty frame is yielded (a partial event waits in the renamer): whoever reads this counts on that.
        # find() rather than `in` on every chunk: CPython 3.11's bytes `in` first tries the needle as an
        # integer and formats a TypeError it then drops, several times the cost of the search itself.
        finished = False
        error = b""  # an in-band error event, once one began
        rename = renamer.stream
        async with aclosing(self.http.chunks(resp, sse=True)) as chunks:
            async for chunk in chunks:
                if error:
                    error += chunk
                elif chunk.find(b'"error"') >= 0 and (at := chunk.find(_ERROR_EVENT)) >= 0:
                    # vLLM and llama.cpp report a failure after the 200 as `data: {"error": ...}` and
                    # may then send [DONE], which would tell the client the answer is complete.
                    if at and (before := rename(chunk[:at])):
                        yield before
                    error = chunk[at:]
                else:
                    if chunk.find(b"[DONE]") >= 0:
                        finished = True
                    if out := rename(chunk):
                        yield out
                    continue
                if b"\n\n" in error or b"\n\r\n" in error:
                    break
        if error:
            raise BackendError(f"backend {self.name!r} failed mid-answer: {_event_message(error)}")
        rest = renamer.flush()
        if rest:
            yield rest
        if not finished:
            raise BackendError(f"backend {self.name!r} closed the stream before the answer was complete")

    async def chat(self, body: dict, target: str) -> Reply:
        return await self._send("/v1/chat/completions", body, target)

    async def completion(self, body: dict, target: str) -> Reply:
        return await self._send("/v1/completions", body, target)

    async def embeddings(self, body: dict, target: str) -> bytes:
        return await self._send("/v1/embeddings", {**body, "stream": False}, target)  # type: ignore[return-value]

    async def list_models(self) -> list[ServedModel]:
        try:
            listing = await self.http.get_json("/v1/models")
        except UpstreamStatus as exc:
            raise BackendError(f"backend {self.name!r} answered /v1/models with {exc.status}") from None
        models = []
        for card in (listing or {}).get("data") or ():
            if card.get("id"):
                models.append(ServedModel(card["id"], int(card.get("created") or 0), card))
        return models

    async def probe(self) -> str | None:
        # vLLM and llama.cpp answer /health; other OpenAI-compatible servers only prove
        # they are up by listing their models.
        path = "/health" if self.config.kind == "vllm" else "/v1/models"
        try:
            await self.http.get_json(path)
        except UpstreamStatus as exc:
            raise BackendError(f"backend {self.name!r} answered {path} with {exc.status}") from None
        return None

    async def load_signals(self) -> tuple[Load | None, dict[str, float] | None]:
        """vLLM's queue and KV cache from its Prometheus ``/metrics``; other servers report nothing we read."""
        if self.config.kind != "vllm":
            return None, None
        # A text answer, which Upstream.small (JSON only) does not read; its error mapping still applies.
        async with self.http._mapped("requesting /metrics"), asyncio.timeout(self.http.timeouts.connect * 2):
            resp = await self.http.client.get("/metrics")
        if resp.status_code >= 300:
            raise BackendError(f"backend {self.name!r} answered /metrics with {resp.status_code}")
        return parse_vllm_metrics(resp.text), None

    async def count_prompt(self, body: dict) -> int | None:
        """The prompt's tokens by the server's own tokenizer, chat template included; None where it has none.

        llama.cpp's server: ``/apply-template`` renders the messages, ``/tokenize`` counts them. Used
        for the usage of streams from servers that send none; never raises.
        """
        if self._tokenizer is False:
            return None
        try:
            if isinstance(body.get("messages"), list):
                rendered = await self.http.small("POST", "/apply-template", {"messages": body["messages"]})
                text = rendered.get("prompt") if isinstance(rendered, dict) else None
            else:
                text = body.get("prompt")
            if not isinstance(text, str):
                return None
            answer = await self.http.small("POST", "/tokenize", {"content": text, "add_special": True})
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            count = len(tokens) if isinstance(tokens, list) else None
        except UpstreamStatus as exc:
            if exc.status in (404, 405, 501):
                self._tokenizer = False  # no such endpoints: do not ask again
            return None
        except ProxyError:
            return None
        self._tokenizer = count is not None
        return count

    async def describe(self, model: ServedModel) -> ModelInfo:
        return from_openai_card(model.details)
