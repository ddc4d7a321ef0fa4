"""Adapter for Ollama's native API. I/O only: the translation lives in ``proxy.translate``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime

import orjson

from ..errors import BackendAuthFailed, BackendError, BackendRejected, BackendUnavailable, ModelNotFound, ProxyError
from ..signals import Load, parse_ollama_ps
from ..translate import ollama_chat, ollama_text
from ..translate.model_info import ModelInfo, from_ollama_show
from ._http import UpstreamStatus
from .base import HTTPBackend, Reply, ServedModel, primed

# Ollama's 400 messages that point at one request field, so the client's error can name it.
_PARAM_HINTS = (("support tools", "tools"), ("support thinking", "reasoning_effort"),
                ("think value", "think"), ("top_logprobs", "top_logprobs"), ("image", "messages"),
                ("context length", "messages"))  # fmt: skip


_NANOS = re.compile(r"(\.\d{6})\d+")


def normalize(name: str) -> str:
    """Ollama's canonical form: ``library/`` dropped, ``:latest`` added when there is no tag."""
    if name.startswith("library/"):
        name = name[len("library/") :]
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def _created(modified_at: str | None) -> int:
    if not modified_at:
        return 0
    try:  # Go writes nanoseconds; fromisoformat takes at most microseconds
        return int(datetime.fromisoformat(_NANOS.sub(r"\1", modified_at)).timestamp())
    except ValueError:
        return 0


class OllamaBackend(HTTPBackend):
    def model_key(self, name: str) -> str:
        return normalize(name)

    def _error(self, exc: UpstreamStatus, target: str) -> ProxyError:
        msg, where = exc.message, f"backend {self.name!r}"
        if exc.status == 404:
            return ModelNotFound(f"model {target!r} is not available on {where}: {msg}", param="model")
        if exc.status in (503, 429):  # Ollama's queue is full: another node may take it
            return BackendUnavailable(f"{where} is busy: {msg}")
        if exc.status in (401, 403):
            return BackendAuthFailed(f"{where} refused the proxy's credentials ({exc.status})")
        if 400 <= exc.status < 500:
            param = next((p for hint, p in _PARAM_HINTS if hint in msg), None)
            return BackendRejected(f"{where} rejected the request: {msg}", param=param)
        return BackendError(f"{where} failed ({exc.status}): {msg}")

    async def _open(self, path: str, native: dict, target: str) -> AsyncIterator[list[dict]]:
        """Send the request; the answer's NDJSON lines, in lists (those that arrived together:
        see ``Upstream.batches``). The caller checks each list with :meth:`_check`."""
        try:
            resp = await self.http.post(path, orjson.dumps(native), stream=True)
        except UpstreamStatus as exc:
            raise self._error(exc, target) from None
        return self.http.batches(resp)

    def _check(self, batch: list[dict]) -> tuple[int, bool]:
        """How many lines of ``batch`` are good (all, unless one reports a failure), and whether one ends
        the answer. Once streaming has begun, Ollama reports failures in-band, as a line with ``error``."""
        done = False
        for i, line in enumerate(batch):
            if "error" in line:
                return i, done
            if line.get("done"):
                done = True
        return len(batch), done

    def _failed(self, line: dict) -> BackendError:
        return BackendError(f"backend {self.name!r} failed mid-answer: {line['error']}")

    def _cut(self) -> BackendError:
        return BackendError(f"backend {self.name!r} closed the stream before the answer was complete")

    # After the line with "done" the loops below read on to the end of the body (its last bytes are
    # already here) rather than stop: a response read to the end lets the pool reuse the connection.
    # aclosing: a client that leaves must close the upstream connection now, not at GC time, because
    # closing it is what makes Ollama stop generating.

    async def _frames(self, batches: AsyncIterator[list[dict]], translator) -> AsyncIterator[bytes]:
        # The events of lines that arrived together go out together: one write to the client, not one each.
        # No empty frame is yielded (a line may translate to nothing): whoever reads this counts on that.
        done = False
        feed = translator.feed
        async with aclosing(batches):
            async for batch in batches:
                good, ends = self._check(batch)
                done = done or ends
                if good:
                    if len(batch) == 1:  # paced tokens arrive a line per read
                        out = feed(batch[0])
                    else:
                        out = b"".join([feed(line) for line in batch[:good]])
                    if out:
                        yield out
                if good < len(batch):
                    raise self._failed(batch[good])  # what came before the failure reached the client
        if not done:
            raise self._cut()

    async def _collect(self, batches: AsyncIterator[list[dict]], aggregate) -> bytes:
        done = False
        async with aclosing(batches):
            async for batch in batches:
                good, ends = self._check(batch)
                if good < len(batch):
                    raise self._failed(batch[good])
                done = done or ends
                for line in batch:
                    aggregate.feed(line)
        if not done:
            raise self._cut()
        return orjson.dumps(aggregate.result())

    async def chat(self, body: dict, target: str) -> Reply:
        native, shape = ollama_chat.chat_request(body, target)
        lines = await self._open("/api/chat", native, target)
        if body.get("stream"):
            # Ollama always reports usage: frame it always, the gateway drops it if the client did not ask.
            shape = dataclasses.replace(shape, include_usage=True)
            return await primed(self._frames(lines, ollama_chat.ChatStream(shape)))
        return await self._collect(lines, ollama_chat.ChatAggregate(shape))

    async def completion(self, body: dict, target: str) -> Reply:
        native, shape = ollama_text.completion_request(body, target)
        lines = await self._open("/api/generate", native, target)
        if body.get("stream"):
            shape = dataclasses.replace(shape, include_usage=True)
            return await primed(self._frames(lines, ollama_text.TextStream(shape)))
        return await self._collect(lines, ollama_text.TextAggregate(shape))

    async def embeddings(self, body: dict, target: str) -> bytes:
        native = ollama_text.embed_request(body, target)
        try:
            resp = await self.http.post("/api/embed", orjson.dumps(native), stream=False)
        except UpstreamStatus as exc:
            raise self._error(exc, target) from None
        try:
            answer = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise BackendError(f"backend {self.name!r} answered /api/embed with invalid JSON") from None
        return orjson.dumps(ollama_text.embed_response(answer, body["model"], body.get("encoding_format")))

    async def list_models(self) -> list[ServedModel]:
        try:
            tags = await self.http.get_json("/api/tags")
        except UpstreamStatus as exc:
            raise BackendError(f"backend {self.name!r} answered /api/tags with {exc.status}") from None
        models = []
        for entry in (tags or {}).get("models") or ():
            name = entry.get("model") or entry.get("name")
            if name:
                models.append(ServedModel(name, _created(entry.get("modified_at")), entry))
        return models

    async def probe(self) -> str | None:
        try:
            answer = await self.http.get_json("/api/version")
        except UpstreamStatus as exc:
            raise BackendError(f"backend {self.name!r} answered /api/version with {exc.status}") from None
        return answer.get("version") if isinstance(answer, dict) else None

    async def load_signals(self) -> tuple[Load | None, dict[str, float] | None]:
        """Which models are loaded here, until when (``/api/ps``); Ollama reports no queue."""
        try:
            ps = await self.http.get_json("/api/ps")
        except UpstreamStatus as exc:
            raise BackendError(f"backend {self.name!r} answered /api/ps with {exc.status}") from None
        return None, {normalize(name): until for name, until in parse_ollama_ps(ps).items()}

    async def describe(self, model: ServedModel) -> ModelInfo:
        try:
            show = await self.http.small("POST", "/api/show", {"model": model.name})
        except UpstreamStatus as exc:
            raise BackendError(f"backend {self.name!r} answered /api/show with {exc.status}") from None
        return from_ollama_show(show) if isinstance(show, dict) else ModelInfo()
