"""What every backend adapter offers the router, and the shapes it answers with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from ..config import BackendConfig, TimeoutConfig
from ..translate.model_info import ModelInfo
from ._http import Upstream


@dataclass
class Stream:
    """An answer being streamed as SSE frames.

    The adapter has already read the first frame before returning one of these,
    so any failure to start surfaces as an exception while the router can still
    try another backend; after that, bytes go to the client as they arrive.
    """

    frames: AsyncIterator[bytes]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.frames

    async def aclose(self) -> None:
        await self.frames.aclose()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ServedModel:
    """A model as a backend lists it (Ollama /api/tags, OpenAI /v1/models)."""

    name: str
    created: int = 0
    details: dict = field(default_factory=dict, compare=False)


Reply = bytes | Stream  # a whole JSON body, or a stream of SSE frames


class Backend(Protocol):
    config: BackendConfig

    @property
    def name(self) -> str: ...

    async def chat(self, body: dict, target: str) -> Reply:
        """``body`` is a validated OpenAI chat request; ``target`` the backend's model name."""

    async def completion(self, body: dict, target: str) -> Reply: ...

    async def embeddings(self, body: dict, target: str) -> bytes: ...

    async def list_models(self) -> list[ServedModel]: ...

    async def probe(self) -> str | None:
        """Raise :class:`ProxyError` unless the backend is up; return its version when it tells."""

    async def describe(self, model: ServedModel) -> ModelInfo:
        """What the backend says about one of its models (template, capabilities, context)."""

    def model_key(self, name: str) -> str:
        """The form two names that mean the same model share (Ollama: ``llama3`` is ``llama3:latest``)."""

    async def aclose(self) -> None: ...


class HTTPBackend:
    """What every adapter over HTTP shares: its config, one pooled upstream client, its name."""

    def __init__(self, config: BackendConfig, timeouts: TimeoutConfig) -> None:
        self.config = config
        self.http = Upstream(config, timeouts)

    @property
    def name(self) -> str:
        return self.config.name

    async def aclose(self) -> None:
        await self.http.aclose()


async def primed(frames: AsyncIterator[bytes]) -> Stream:
    """Read until the first non-empty frame, so start-up failures raise here, then hand over the rest.

    The adapters' generators yield no empty frames after the first, so what follows is theirs as it is.
    """
    first = b""
    try:
        while not first:
            first = await frames.__anext__()
    except StopAsyncIteration:
        pass
    except BaseException:
        await frames.aclose()  # type: ignore[attr-defined]
        raise
    return Stream(_Primed(first, frames))


class _Primed:
    """The first frame, then the adapter's own generator: an iterator, not one more async generator.

    Every chunk of a stream climbs each generator it passes through, and each layer is one more frame
    to leave and re-enter at every suspension; handing out the adapter's own ``__anext__`` costs none.
    """

    __slots__ = ("first", "frames")

    def __init__(self, first: bytes, frames: AsyncIterator[bytes]) -> None:
        self.first = first
        self.frames = frames

    def __aiter__(self) -> _Primed:
        return self

    def __anext__(self):
        if self.first:
            return self._first()
        return self.frames.__anext__()

    async def _first(self) -> bytes:
        first, self.first = self.first, b""
        return first

    async def aclose(self) -> None:
        self.first = b""
        await self.frames.aclose()  # type: ignore[attr-defined]
