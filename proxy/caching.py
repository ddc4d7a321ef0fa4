"""The response cache as the request path uses it: decide, look up, replay, store.

Answers are stored in their complete, non-streaming form (a streamed answer is
accumulated as it passes through and stored only if it finished cleanly), so
either kind of request can be served from either kind of answer: a stream is
replayed as SSE frames. The key is the resolved model plus the canonical request
(see :mod:`proxy.cache`); only answers from the model the request resolved to
are stored, never a fallback's, so a key always means one model's answer.

Embeddings are cached per input string: a request whose inputs are partly known
sends only the rest to the backend.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson

from .cache import ResponseCache, cache_key, embedding_keys, policy
from .config import CacheConfig
from .resolve import Route
from .routing import Outcome
from .translate.ollama_text import float32_base64
from .translate.replay import StreamAccumulator, completion_to_frames

_KIND = {"chat": "chat", "completion": "text"}
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}


def _key_model(route: Route) -> str:
    # The alias is part of the key when it adapts requests (system_prompt, defaults): two aliases
    # for one target may then answer the same request differently.
    alias = route.alias
    if alias is not None and (alias.system_prompt or alias.defaults):
        return f"{route.target}\0{alias.name}"
    return route.target


class Lookup:
    """One request's dealings with the cache."""

    __slots__ = ("read", "write", "key", "operation")

    def __init__(self, read: bool, write: bool, key: str | None, operation: str) -> None:
        self.read, self.write, self.key, self.operation = read, write, key, operation


class StoredStream:
    """A stream on its way to the client, accumulated so its whole answer can be stored at the end."""

    __slots__ = ("caching", "lookup", "route", "accumulator", "feed")

    def __init__(self, caching: Caching, lookup: Lookup, route: Route) -> None:
        self.caching, self.lookup, self.route = caching, lookup, route
        self.accumulator = StreamAccumulator(_KIND[lookup.operation])  # type: ignore[arg-type]
        self.feed = self.accumulator.feed  # the accumulator's own method: no call in between per chunk

    def finish(self) -> None:
        answer = self.accumulator.result()
        if answer is not None:
            self.caching.cache.put(self.lookup.key, self.route.target, orjson.dumps(answer))  # type: ignore[arg-type]


class Caching:
    def __init__(self, cache: ResponseCache, config: CacheConfig) -> None:
        self.cache = cache
        self.config = config
        self.enabled = config.mode != "off"

    def lookup(self, operation: str, route: Route, body: dict, cache_control: str | None) -> Lookup:
        read, write = policy(self.config.mode, body, cache_control, operation=operation)
        key = cache_key(operation, _key_model(route), body) if (read or write) else None
        return Lookup(read, write, key, operation)

    async def get(self, lookup: Lookup) -> bytes | None:
        if not lookup.read or lookup.key is None:
            return None
        return await self.cache.get(lookup.key)

    # --- serving a stored answer ---------------------------------------------------------------

    @staticmethod
    def replay_body(stored: bytes, operation: str, public: str) -> bytes:
        answer = orjson.loads(stored)
        answer["model"] = public
        answer["id"] = _ID_PREFIX[operation] + secrets.token_hex(12)
        answer["created"] = int(time.time())
        return orjson.dumps(answer)

    @staticmethod
    def replay_frames(stored: bytes, operation: str, public: str, include_usage: bool) -> AsyncIterator[bytes]:
        answer = orjson.loads(Caching.replay_body(stored, operation, public))
        frames = completion_to_frames(answer, _KIND[operation], include_usage)  # type: ignore[arg-type]

        async def replay() -> AsyncIterator[bytes]:
            for frame in frames:
                yield frame

        return replay()

    # --- storing a fresh answer ----------------------------------------------------------------

    def storable(self, lookup: Lookup, route: Route, outcome: Outcome) -> bool:
        # Only the model the request resolved to: a fallback's answer must not sit under its key.
        return lookup.write and lookup.key is not None and outcome.candidate in route.groups[0]

    def store_body(self, lookup: Lookup, route: Route, body: bytes) -> None:
        self.cache.put(lookup.key, route.target, body)  # type: ignore[arg-type]

    def storing(self, lookup: Lookup, route: Route) -> StoredStream:
        """What to feed a stream's frames to (:func:`proxy.usage.relayed`): stores the whole answer
        if the stream ends cleanly."""
        return StoredStream(self, lookup, route)

    # --- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, route: Route, body: dict, cache_control: str | None,
                         fetch: Callable[[dict], Awaitable[tuple[bytes, Outcome]]]) -> tuple[bytes, Outcome | None, int]:  # fmt: skip
        """The answer, the outcome of the backend call (None when every input was cached), and the hits."""
        read, write = policy(self.config.mode, body, cache_control, operation="embeddings")
        if not (read or write):
            answer, outcome = await fetch(body)
            return answer, outcome, 0
        model = _key_model(route)
        keys = embedding_keys(model, body)
        inputs = body["input"]
        items = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else list(inputs)
        known = await self.cache.get_embeddings(keys) if read else {}
        missing = [i for i, key in enumerate(keys) if key not in known]
        vectors: dict[str, list[float]] = dict(known)
        outcome = None
        tokens = 0
        if missing:
            wanted = [items[i] for i in dict.fromkeys(missing)]
            request = {**body, "input": wanted, "encoding_format": "float"}
            raw, outcome = await fetch(request)
            answer = orjson.loads(raw)
            fresh = {}
            for row in answer.get("data") or ():
                fresh[keys[missing[row["index"]]]] = row["embedding"]
            tokens = (answer.get("usage") or {}).get("prompt_tokens") or 0
            vectors.update(fresh)
            if write:
                self.cache.put_embeddings(route.target, fresh)
        encode = float32_base64 if body.get("encoding_format") == "base64" else None
        data = [{"object": "embedding", "index": i, "embedding": encode(vectors[k]) if encode else vectors[k]}
                for i, k in enumerate(keys)]  # fmt: skip
        out = {"object": "list", "data": data, "model": body["model"],
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
        return orjson.dumps(out), outcome, len(keys) - len(missing)
