"""Checks on OpenAI request bodies, common to every backend: one schema per endpoint, one checker.

Each check raises :class:`~proxy.errors.InvalidRequest` naming the offending ``param``
the way OpenAI does (``messages[2].content[0].image_url``), so a bad request fails the
same way whichever backend would have served it, and before any translation runs:
after these checks the translators may rely on the shapes in :mod:`.schemas`.
Whether a backend can honour a valid field is the adapter's business, not this one's.
"""

from __future__ import annotations

from ..errors import InvalidRequest
from .checker import check
from .schemas import CHAT, COMPLETION, EMBEDDINGS

__all__ = ["chat", "completion", "embeddings"]


def _stream_options(body: dict) -> None:
    if body.get("stream_options") is not None and not body.get("stream"):
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )


def chat(body: dict) -> None:
    check(CHAT, body)
    _stream_options(body)
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")


def completion(body: dict) -> None:
    check(COMPLETION, body)
    _stream_options(body)


def embeddings(body: dict) -> None:
    check(EMBEDDINGS, body)
