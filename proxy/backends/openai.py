"""Adapter for OpenAI-compatible servers: vLLM, llama.cpp server, LM Studio.

Requests pass through with the model renamed; replies come back byte for byte
but for the model name. Stream chunks are forwarded as they arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from ..errors import BackendError, BackendRejected, BackendUnavailable, ModelNotFound, ProxyError
from ..translate.passthrough import ModelRenamer, request_body
from ._http import UpstreamStatus
from .base import HTTPBackend, Reply, ServedModel, primed


class OpenAIBackend(HTTPBackend):
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
            return BackendError(f"{where} refused the proxy's credentials ({exc.status}); check its api_key")
        if exc.status in (503, 429):
            return BackendUnavailable(f"{where} is busy: {msg}")
        if 400 <= exc.status < 500:
            return BackendRejected(f"{where} rejected the request: {msg}", param=param if isinstance(param, str) else None)
        return BackendError(f"{where} failed ({exc.status}): {msg}")

    async def _send(self, path: str, body: dict, target: str) -> Reply:
        renamer = ModelRenamer(target, body["model"])
        payload = request_body(body, target)
        try:
            resp = await self.http.post(path, payload, stream=bool(body.get("stream")))
        except UpstreamStatus as exc:
            raise self._error(exc, target) from None
        if not body.get("stream"):
            return renamer.body(resp.content)
        return await primed(self._frames(resp, renamer))

    async def _frames(self, resp, renamer: ModelRenamer) -> AsyncIterator[bytes]:
        finished = False
        async with aclosing(self.http.chunks(resp)) as chunks:
            async for chunk in chunks:
                if b"[DONE]" in chunk:
                    finished = True
                yield renamer.stream(chunk)
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
