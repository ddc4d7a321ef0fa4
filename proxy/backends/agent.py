"""The proxy's side of a node agent (``llm-proxy node``): status, manifest, Hugging Face pulls, runtime restarts.

I/O only, like :mod:`.ollama_admin`: its own pool, the node's token sent as
``Authorization: Bearer`` (kept in a ``repr=False`` field, never in a log line or
an error message), the agent's answers mapped to :class:`ProxyError`. A pull is an
async iterator of the agent's progress lines, in Ollama's shape (``status``,
``digest``, ``total``, ``completed``), so :mod:`proxy.operations.progress`
reads them as it reads Ollama's; closing it hangs up, which cancels the
download on the node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from urllib.parse import quote

import orjson

from ..config import BackendConfig, TimeoutConfig
from ..errors import BackendError, Conflict, DiskLimit, ModelNotFound, ProxyError
from ._http import Upstream, UpstreamStatus


class AgentClient:
    def __init__(self, name: str, url: str, token: str, timeouts: TimeoutConfig, *, pull_idle: float = 300.0) -> None:
        self.name = name
        self.url = url
        link = BackendConfig(name=name, kind="openai", url=url, api_key=token)
        self.http = Upstream(link, TimeoutConfig(connect=timeouts.connect, first_byte=max(timeouts.first_byte, 60.0),
                                                 idle=pull_idle))  # fmt: skip

    async def aclose(self) -> None:
        await self.http.aclose()

    def _failed(self, path: str, exc: UpstreamStatus) -> ProxyError:
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        if code == "disk_limit":
            return DiskLimit(f"{self.name}: {exc.message}", exc.body.get("disk") or {})
        if exc.status == 404:
            return ModelNotFound(f"{self.name}: {exc.message}", param="model")
        if exc.status in (400, 403, 409):
            return Conflict(f"{self.name}: {exc.message}")
        if exc.status == 401:
            return BackendError(f"the agent of {self.name!r} refused the node token (was it restarted with "
                                "another? it registers again within a heartbeat)")  # fmt: skip
        return BackendError(f"the agent of {self.name!r} answered {path} with {exc.status}: {exc.message}")

    async def _call(self, method: str, path: str, body: object = None, timeout: float | None = None) -> dict:
        try:
            answer = await self.http.small(method, path, body, timeout)
        except UpstreamStatus as exc:
            raise self._failed(path, exc) from None
        return answer if isinstance(answer, dict) else {}

    async def status(self, timeout: float | None = None) -> dict:
        """{hardware, runtime, alerts, agent}, measured now."""
        return await self._call("GET", "/status", timeout=timeout)

    async def manifest(self) -> list[dict]:
        return (await self._call("GET", "/manifest")).get("data", [])

    async def plan(self, model: str, revision: str, confirm: bool) -> dict:
        """Sizes, what is cached, the disk figures, and ``problem``: why it must not start (or None)."""
        return await self._call("POST", "/hf/plan", {"model": model, "revision": revision, "confirm": confirm},
                                timeout=60.0)  # fmt: skip

    async def pull(self, model: str, revision: str, confirm: bool) -> AsyncIterator[dict]:
        """Progress lines until ``success`` (its ``entry`` is the manifest entry); an error line raises."""
        body = orjson.dumps({"model": model, "revision": revision, "confirm": confirm})
        try:
            resp = await self.http.post("/hf/pull", body, stream=True)
        except UpstreamStatus as exc:
            raise self._failed("/hf/pull", exc) from None
        succeeded = False
        async with aclosing(self.http.lines(resp)) as lines:
            async for line in lines:
                if "error" in line:
                    status, message = line.get("status_code") or 502, f"{self.name}: {line['error']}"
                    if status == 502:
                        raise BackendError(message)  # retried: the next attempt continues from the cache
                    raise ProxyError(message, status=status, code="hub_error")
                yield line
                if line.get("status") == "success":
                    succeeded = True
                    break
        if not succeeded:
            raise BackendError(f"the agent of {self.name!r} ended the download of {model!r} before it succeeded")

    async def delete(self, model: str) -> bool:
        return bool((await self._call("DELETE", f"/hf/models/{quote(model, safe='/')}")).get("removed"))

    async def activate(self, model: str, served_name: str) -> dict:
        """Restart the supervised runtime with ``--model`` and ``--served-model-name``."""
        return await self._call("POST", "/runtime/activate", {"model": model, "served_name": served_name},
                                timeout=120.0)  # fmt: skip
