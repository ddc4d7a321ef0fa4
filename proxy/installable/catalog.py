"""What can be installed, from the Ollama library, the Hugging Face API and the shipped file.

One :class:`Installable` lives on the app (created and closed by its lifespan) with one pooled
httpx client. Each (source, query) answer is kept in memory for ``catalog.ttl`` seconds; a
source that fails, times out or answers nonsense is answered for by the shipped file instead,
marked ``offline`` with the reason, and asked again after ``catalog.offline_ttl`` seconds. A
request never waits longer than ``catalog.timeout`` for a source.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import httpx

from ..config import CatalogConfig, ConfigError, redact_url
from .entry import Entry
from .parse import SOURCES, SourceAnswerError, catalog_file, huggingface_models, ollama_library

log = logging.getLogger("llm_proxy")

# Largest answer read from a source; the library's search page is about 100 KB, the Hub's list less.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# Models asked of the Hub per query (its own limit is 1000); the catalog's limit= cuts further.
HUB_PAGE = 100
# Answers kept at most (one per source and query): typing in the dashboard's search box makes many.
MAX_KEPT = 256
# What is shown for a source's state.
LIVE, CACHED, OFFLINE = "live", "cached", "offline"


class Source(Protocol):
    """A place that knows installable models. ``fetch`` raises on any failure; the catalog falls back."""

    name: str

    async def fetch(self, client: httpx.AsyncClient, query: str) -> list[Entry]: ...


async def _get(client: httpx.AsyncClient, url: str, params: list[tuple[str, str]], headers: dict) -> bytes:
    async with client.stream("GET", url, params=params, headers=headers) as response:
        if response.status_code != 200:
            raise SourceAnswerError(f"HTTP {response.status_code} from {redact_url(url)}")
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > MAX_ANSWER_BYTES:
                raise SourceAnswerError(f"answer from {redact_url(url)} larger than {MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass
class OllamaLibrary:
    url: str
    known: dict[str, Entry]  # the shipped file's Ollama entries: exact sizes where it has them
    name: str = "ollama"

    async def fetch(self, client: httpx.AsyncClient, query: str) -> list[Entry]:
        # Hx-Request: the page's results fragment only, not the whole layout around it.
        body = await _get(client, f"{self.url.rstrip('/')}/search", [("q", query)],
                          {"Hx-Request": "true", "Accept": "text/html"})  # fmt: skip
        return ollama_library(body, self.known)


@dataclass
class HuggingFaceHub:
    url: str
    filter: str
    name: str = "huggingface"

    async def fetch(self, client: httpx.AsyncClient, query: str) -> list[Entry]:
        params = [("sort", "downloads"), ("direction", "-1"), ("limit", str(HUB_PAGE))]
        if query:
            params.append(("search", query))
        if self.filter:
            params.append(("filter", self.filter))
        # expand= selects the fields returned; safetensors carries the weight counts the size comes from.
        params += [("expand", f) for f in ("safetensors", "gguf", "tags", "pipeline_tag", "downloads")]
        body = await _get(client, f"{self.url.rstrip('/')}/api/models", params, {"Accept": "application/json"})
        return huggingface_models(body)


def load_file(path: str) -> list[Entry]:
    """The catalog file (``catalog.file``, or the one shipped in the package); a bad one is a config error."""
    if path:
        where = "catalog.file"
        try:
            body = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError([f"{where}: cannot read {path}: {exc.strerror}"]) from None
    else:
        where = "the shipped catalog (proxy/data/catalog.json)"
        body = resources.files("proxy").joinpath("data/catalog.json").read_bytes()
    try:
        return catalog_file(body)
    except SourceAnswerError as exc:
        raise ConfigError([f"{where}: {exc}"]) from None


@dataclass
class Answer:
    entries: list[Entry]
    state: str  # live, cached or offline
    error: str | None = None


@dataclass
class _Kept:
    answer: Answer
    until: float


class Installable:
    def __init__(self, config: CatalogConfig, *, sources: dict[str, Source] | None = None,
                 offline: list[Entry] | None = None) -> None:  # fmt: skip
        self.config = config
        shipped = load_file(config.file) if offline is None else offline
        self.offline = {s: [e for e in shipped if e.source == s] for s in SOURCES}
        if sources is None:
            sources = {}
            if config.ollama_url:
                known = {e.name: e for e in self.offline["ollama"]}
                sources["ollama"] = OllamaLibrary(config.ollama_url, known)
            if config.huggingface_url:
                sources["huggingface"] = HuggingFaceHub(config.huggingface_url, config.huggingface_filter)
        self.sources = sources
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(config.timeout), follow_redirects=True,
                                        limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
                                        headers={"User-Agent": "llm-proxy catalog"})  # fmt: skip
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @classmethod
    async def open(cls, config: CatalogConfig) -> Installable:
        """Read the catalog file off the event loop, then build the catalog."""
        return cls(config, offline=await asyncio.to_thread(load_file, config.file))

    async def aclose(self) -> None:
        await self.client.aclose()

    def _offline(self, source: str, error: str | None) -> Answer:
        return Answer(self.offline[source], OFFLINE, error)

    async def answer(self, source: str, query: str, *, refresh: bool = False) -> Answer:
        """The entries ``source`` has for ``query`` (unfiltered: the caller applies q), fresh or kept."""
        if source not in self.sources:
            return self._offline(source, None)
        key = (source, query.casefold())
        # One fetch per key at a time: requests arriving while it runs share its answer.
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            kept = self._kept.get(key)
            if kept is not None and not refresh and time.monotonic() < kept.until:
                a = kept.answer
                return Answer(a.entries, CACHED if a.state == LIVE else a.state, a.error)
            answer = await self._fetch(source, query)
            ttl = self.config.ttl if answer.state == LIVE else self.config.offline_ttl
            self._kept[key] = _Kept(answer, time.monotonic() + ttl)
            self._forget_expired()
            return answer

    async def _fetch(self, source: str, query: str) -> Answer:
        try:
            # httpx's timeout is per read; the whole answer gets a deadline too, so a source that
            # trickles bytes cannot hold the request.
            entries = await asyncio.wait_for(self.sources[source].fetch(self.client, query), self.config.timeout)
        except (TimeoutError, httpx.TimeoutException):
            reason = f"no answer within {self.config.timeout:g} s"
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except SourceAnswerError as exc:
            reason = str(exc)
        else:
            return Answer(entries, LIVE)
        log.warning("catalog: %s unavailable (%s); answering from the catalog file", source, reason)
        return self._offline(source, reason)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        stale = [k for k, kept in self._kept.items() if kept.until <= now]
        if len(self._kept) - len(stale) > MAX_KEPT:  # then those that would expire first
            by_expiry = sorted((k for k in self._kept if k not in stale), key=lambda k: self._kept[k].until)
            stale += by_expiry[: len(self._kept) - len(stale) - MAX_KEPT]
        for key in stale:
            del self._kept[key]
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
