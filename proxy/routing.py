"""Send a request to one of a route's backends, moving on to the next while that is safe.

Safe means: the failure is one another backend may not share (unreachable,
busy, 5xx, timeout, model missing there) and nothing has reached the client
yet. Adapters only return a :class:`Stream` once its first frame has arrived,
so every failure seen here happened before the client got a byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from .backends import Backend, Reply, Stream
from .errors import ModelNotFound, ProxyError
from .resolve import Candidate, Route

Operation = Literal["chat", "completion", "embeddings"]


@dataclass
class Outcome:
    reply: Reply
    candidate: Candidate
    attempts: int


class Router:
    def __init__(self, backends: dict[str, Backend]) -> None:
        # max_concurrent caps requests in flight per backend; extra ones wait for a slot.
        self._slots = {
            name: asyncio.Semaphore(b.config.max_concurrent)
            for name, b in backends.items()
            if b.config.max_concurrent > 0
        }

    async def dispatch(self, route: Route, operation: Operation, body: dict) -> Outcome:
        failure: ProxyError | None = None
        for attempt, candidate in enumerate(route.candidates, 1):
            try:
                reply = await self._call(candidate, operation, body)
            except ProxyError as exc:
                if not (exc.retryable or isinstance(exc, ModelNotFound)):
                    raise
                failure = exc
                continue
            return Outcome(reply, candidate, attempt)
        assert failure is not None  # a route always has at least one candidate
        raise failure

    async def _call(self, candidate: Candidate, operation: Operation, body: dict) -> Reply:
        backend = candidate.backend
        slot = self._slots.get(backend.name)
        if slot is None:
            return await getattr(backend, operation)(body, candidate.model)
        await slot.acquire()
        try:
            reply = await getattr(backend, operation)(body, candidate.model)
        except BaseException:
            slot.release()
            raise
        if isinstance(reply, Stream):
            return Stream(_releasing(reply, slot))  # the slot is held until the stream ends
        slot.release()
        return reply


async def _releasing(stream: Stream, slot: asyncio.Semaphore) -> AsyncIterator[bytes]:
    try:
        async for frame in stream:
            yield frame
    finally:
        slot.release()
        await stream.aclose()
