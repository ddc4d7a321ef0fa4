"""Prefix affinity: one conversation keeps going to the replica that already holds its prefix.

vLLM (automatic prefix caching) and Ollama (the loaded context) answer a
conversation's next turn faster where its earlier turns were just processed.
A conversation is recognised by the request's ``user`` field, else by its first
two messages (the system prompt and the opening question stay the same while
the conversation grows). The table is bounded: least recently used entries go
first beyond ``routing.affinity_size``, and an entry unused for
``routing.affinity_ttl`` seconds is forgotten. The router only follows an entry
while that backend is healthy and not overloaded.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import orjson

_PREFIX_MESSAGES = 2


def conversation_key(public: str, body: dict) -> str | None:
    """What identifies the conversation of ``body`` sent to model ``public``; None when nothing does."""
    user = body.get("user")
    if isinstance(user, str) and user:
        material = orjson.dumps(["user", public, user])
    else:
        messages = body.get("messages")
        if isinstance(messages, list) and messages:
            material = orjson.dumps(["messages", public, messages[:_PREFIX_MESSAGES]], option=orjson.OPT_SORT_KEYS)
        elif isinstance(body.get("prompt"), str) and body["prompt"]:
            material = orjson.dumps(["prompt", public, body["prompt"][:2048]])
        else:
            return None
    return hashlib.blake2b(material, digest_size=12).hexdigest()


class AffinityTable:
    """Conversation key -> backend name, an LRU with a time-to-live. Lives on the router (app state)."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (backend, last use)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        backend, used = entry
        if time.monotonic() - used > self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)  # recently asked for: the last to go (its time runs from its last answer)
        return backend

    def remember(self, key: str, backend: str) -> None:
        self._entries[key] = (backend, time.monotonic())
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget_backend(self, backend: str) -> None:
        for key in [k for k, (b, _) in self._entries.items() if b == backend]:
            del self._entries[key]
