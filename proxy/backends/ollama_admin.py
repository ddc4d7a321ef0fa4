"""Ollama's model management, for the admin side: pull, delete, list, load and unload.

Kept apart from :mod:`.ollama`, which serves requests: this client has its own
connection pool (a long pull never takes a connection a chat request wants) and
its own idle timeout (Ollama says nothing while it verifies a large blob). I/O
only: a pull is an async iterator of Ollama's status dicts; what they mean for
progress is :mod:`proxy.operations.progress`'s business.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import aclosing

import orjson

from ..config import BackendConfig, TimeoutConfig
from ..errors import BackendError, ModelNotFound, ProxyError
from ._http import Upstream, UpstreamStatus

# What Ollama says when the registry has no such model (or tag).
_UNKNOWN = ("file does not exist", "manifest unknown", "not found")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def keep_alive_value(keep_alive: str | float) -> str | float:
    """Ollama reads a JSON number as seconds and a string as a Go duration, where "-1" has no unit."""
    if isinstance(keep_alive, str) and _NUMBER.fullmatch(keep_alive.strip()):
        return float(keep_alive)
    return keep_alive


class OllamaAdmin:
    def __init__(self, config: BackendConfig, timeouts: TimeoutConfig, *, pull_idle: float = 300.0) -> None:
        self.name = config.name
        self.timeouts = timeouts
        self.http = Upstream(config, TimeoutConfig(connect=timeouts.connect, first_byte=timeouts.first_byte,
                                                   idle=pull_idle))  # fmt: skip

    async def aclose(self) -> None:
        await self.http.aclose()

    def _failed(self, path: str, exc: UpstreamStatus) -> ProxyError:
        return BackendError(f"backend {self.name!r} answered {path} with {exc.status}: {exc.message}")

    async def version(self) -> str | None:
        try:
            answer = await self.http.get_json("/api/version")
        except UpstreamStatus as exc:
            raise self._failed("/api/version", exc) from None
        return answer.get("version") if isinstance(answer, dict) else None

    async def tags(self) -> list[dict]:
        """Installed models as Ollama lists them: name, model, size, digest, modified_at, details."""
        return await self._models("/api/tags")

    async def ps(self) -> list[dict]:
        """Loaded models: name, size, size_vram, digest, expires_at."""
        return await self._models("/api/ps")

    async def _models(self, path: str) -> list[dict]:
        try:
            answer = await self.http.get_json(path)
        except UpstreamStatus as exc:
            raise self._failed(path, exc) from None
        entries = (answer or {}).get("models") if isinstance(answer, dict) else None
        return [e for e in entries or () if isinstance(e, dict) and (e.get("model") or e.get("name"))]

    def _pull_error(self, model: str, message: str, status: int | None = None) -> ProxyError:
        if status == 404 or any(marker in message for marker in _UNKNOWN):
            return ModelNotFound(f"{model!r} cannot be pulled on {self.name!r}: {message}", param="model")
        return BackendError(f"pull of {model!r} on {self.name!r} failed: {message}")

    async def pull(self, model: str, *, insecure: bool = False) -> AsyncIterator[dict]:
        """Ollama's status lines until ``success``; an error line or an early end raises.

        Close the iterator (``aclosing``) to stop: closing the connection is what
        makes Ollama stop downloading (it keeps the partial layers for next time).
        """
        body: dict = {"model": model, "stream": True}
        if insecure:
            body["insecure"] = True
        try:
            resp = await self.http.post("/api/pull", orjson.dumps(body), stream=True)
        except UpstreamStatus as exc:
            raise self._pull_error(model, exc.message, exc.status) from None
        succeeded = False
        async with aclosing(self.http.lines(resp)) as lines:
            async for line in lines:
                if "error" in line:
                    raise self._pull_error(model, str(line["error"]))
                yield line
                if line.get("status") == "success":
                    succeeded = True
                    break
        if not succeeded:
            raise BackendError(f"backend {self.name!r} ended the pull of {model!r} before it succeeded")

    async def delete(self, model: str) -> bool:
        """True when the model was removed, False when the node did not have it."""
        try:
            await self.http.small("DELETE", "/api/delete", {"model": model})
        except UpstreamStatus as exc:
            if exc.status == 404:
                return False
            raise self._failed("/api/delete", exc) from None
        return True

    async def load(self, model: str, keep_alive: str | float) -> None:
        """Load ``model`` into memory now (a generate request without a prompt), for ``keep_alive``."""
        await self._generate(model, keep_alive_value(keep_alive))

    async def unload(self, model: str) -> None:
        """Ask Ollama to unload ``model``; requests it is serving finish first."""
        await self._generate(model, 0)

    async def _generate(self, model: str, keep_alive: str | float) -> None:
        # A generate request without a prompt only loads (or, with keep_alive 0, unloads). An embedding
        # model refuses generate; an embed request with no input does the same for it.
        try:
            await self._post("/api/generate", {"model": model, "keep_alive": keep_alive})
        except UpstreamStatus as exc:
            if exc.status != 400 or "does not support generate" not in exc.message:
                raise self._load_error(model, "/api/generate", exc) from None
        else:
            return
        try:
            await self._post("/api/embed", {"model": model, "input": [], "keep_alive": keep_alive})
        except UpstreamStatus as exc:
            raise self._load_error(model, "/api/embed", exc) from None

    async def _post(self, path: str, body: dict) -> None:
        await self.http.post(path, orjson.dumps(body), stream=False)  # waits up to first_byte: loading is slow

    def _load_error(self, model: str, path: str, exc: UpstreamStatus) -> ProxyError:
        if exc.status == 404:
            return ModelNotFound(f"model {model!r} is not installed on {self.name!r}", param="model")
        return self._failed(path, exc)
