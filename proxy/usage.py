"""Token usage for every stream, whether or not the client or the backend thought of it.

The proxy asks every backend for usage on every stream (Ollama always reports
it; OpenAI-compatible servers get ``stream_options.include_usage``), so history,
the token metrics and the cache have numbers for every request. Two steps on
the way to the client:

- :class:`UsageTap`, right after the backend, takes the usage chunk; when the
  backend sent none (llama.cpp's server does not), it adds one before
  ``data: [DONE]``, counted: one completion token per content chunk (true of
  vLLM and llama.cpp, which send a chunk per token) and the prompt by the
  server's tokenizer where it has one (the gateway asks it while the answer is
  generated), else estimated like the context window (:mod:`proxy.tokens`).
  The cache stores that stream, so a replay has usage too.
- :func:`relayed` runs the tap and, last, takes the usage chunk out again for a client that did
  not ask for it (``stream_options.include_usage``): it sees what it asked for.

Counting costs a byte search per chunk, so it only runs where a backend may
leave usage out. ``X-Proxy-Usage`` tells the client, before the stream starts,
where the numbers come from: ``backend``; ``counted`` (this backend has been
seen to send none); or ``backend-or-counted`` (not known yet for this backend).
No field inside the usage object says so: strict clients reject unknown fields.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import orjson

_USAGE = re.compile(rb'"usage": ?\{')
# A delta or text with at least one character: one per token for servers that stream token by token.
_PIECE = re.compile(rb'"(?:content|text|reasoning_content)": ?"(?!")')

BACKEND, COUNTED, EITHER = b"backend", b"counted", b"backend-or-counted"


def source(kind: str, sends_usage: bool | None) -> bytes:
    """The ``X-Proxy-Usage`` value for a stream from a backend of ``kind`` (what it did last time, if known)."""
    if kind in ("ollama", "vllm") or sends_usage:
        return BACKEND
    return COUNTED if sends_usage is False else EITHER


class UsageTap:
    """Watches one OpenAI-shaped SSE stream; see the module docs. Feed it frames, yield what it returns."""

    def __init__(self, count: bool, prompt_estimate: Callable[[], int]) -> None:
        self.count = count  # the backend may send no usage: count pieces as they pass
        self.prompt_estimate = prompt_estimate
        self.usage: dict | None = None  # the backend's
        self.counted: dict | None = None  # ours, when the backend sent none
        self.pieces = 0
        self._template: bytes | None = None  # a chunk's id/created/model, for the chunk we add
        self._pending = b""
        self.finished = False  # [DONE] went by: the backend had its chance to send usage

    @property
    def tokens(self) -> tuple[int | None, int | None]:
        usage = self.usage or self.counted
        if not isinstance(usage, dict):
            return None, None
        return usage.get("prompt_tokens"), usage.get("completion_tokens")

    def feed(self, frame: bytes) -> bytes:
        if self._pending:
            frame, self._pending = self._pending + frame, b""
        if not frame.endswith(b"\n\n"):  # a partial event waits for the rest (a client can't use half of one)
            if frame.find(b"\r") >= 0:
                frame = frame.replace(b"\r\n", b"\n")
            cut = frame.rfind(b"\n\n") + 2
            frame, self._pending = frame[:cut], frame[cut:]
            if not frame:
                return b""
        if self._template is None and frame.startswith(b"data: {"):
            self._template = frame
        # find() rather than `in`, on every chunk: CPython 3.11's bytes `in` first tries the needle as an
        # integer and formats a TypeError it then drops, several times the cost of the search itself.
        if frame.find(b"usage") < 0 and frame.find(b"[DONE]") < 0:
            if self.count:
                self.pieces += len(_PIECE.findall(frame))
            return frame
        # The end of the stream, or usage, is in this frame: work event by event.
        out = []
        for event in frame.split(b"\n\n"):
            if not event:
                continue
            if event.startswith(b"data: [DONE]"):
                self.finished = True
                if self.usage is None:
                    out.append(self._counted_chunk())
                out.append(event + b"\n\n")
                continue
            if _USAGE.search(event) and event.startswith(b"data: {"):
                usage = self._usage_of(event)
                if usage is not None:
                    self.usage = usage
            if self.count:
                self.pieces += len(_PIECE.findall(event))
            out.append(event + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    @staticmethod
    def _usage_of(event: bytes) -> dict | None:
        try:
            usage = orjson.loads(event[6:]).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return usage if isinstance(usage, dict) else None

    def _counted_chunk(self) -> bytes:
        prompt = self.prompt_estimate()
        self.counted = {"prompt_tokens": prompt, "completion_tokens": self.pieces,
                        "total_tokens": prompt + self.pieces}  # fmt: skip
        head: dict = {}
        if self._template is not None:
            try:
                chunk = orjson.loads(self._template.split(b"\n\n", 1)[0][6:])
                head = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                head = {}
        return b"data: " + orjson.dumps({**head, "choices": [], "usage": self.counted}) + b"\n\n"


class Store(Protocol):
    """Something that sees the stream with its usage chunk and keeps it if it ends cleanly (the cache)."""

    def feed(self, frame: bytes) -> None: ...

    def finish(self) -> None: ...


async def relayed(frames: AsyncIterator[bytes], tap: UsageTap, *, drop_usage: bool = False,
                  store: Store | None = None, keep: Callable[[bytes], None] | None = None,
                  on_end: Callable[[UsageTap], None] | None = None,
                  before_end: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:  # fmt: skip
    """The stream from the backend to the client in one layer: through ``tap``, to ``store`` with
    its usage chunk, without it when ``drop_usage`` (the client did not ask), then to ``keep`` as sent.

    One generator for what used to be four (tap, cache, drop, capture): every layer is one more
    frame that each chunk enters and leaves. ``before_end`` is awaited before the last event when
    usage is counted; ``on_end`` and ``store.finish`` run only when the stream ended cleanly.
    """
    try:
        async for frame in frames:
            if before_end is not None and frame.find(b"[DONE]") >= 0 and tap.usage is None:
                await before_end()
            out = tap.feed(frame)
            if out:
                if store is not None:
                    store.feed(out)
                if drop_usage and out.find(b"usage") >= 0:
                    out = without_usage(out)
                if out:
                    if keep is not None:
                        keep(out)
                    yield out
        rest = tap.flush()  # a partial event left at the end, as the chain before passed it on
        if rest and store is not None:
            store.feed(rest)
        if rest and drop_usage and b"usage" in rest:
            rest = without_usage(rest)
        if rest:
            if keep is not None:
                keep(rest)
            yield rest
    finally:
        await frames.aclose()  # type: ignore[attr-defined]
    if on_end is not None:
        on_end(tap)
    if store is not None:
        store.finish()


def _only_usage(event: bytes) -> bool:
    """The trailing usage chunk (``choices: []``), as opposed to usage riding on a content chunk."""
    if not (event.startswith(b"data: {") and _USAGE.search(event)):
        return False
    try:
        return not orjson.loads(event[6:]).get("choices")
    except (orjson.JSONDecodeError, AttributeError):
        return False


def without_usage(frame: bytes) -> bytes:
    """``frame`` without the trailing usage chunk, for a client that did not ask for one.

    Frames arrive whole events at a time (:class:`UsageTap` aligns them), so splitting on the
    blank line finds whole events.
    """
    return b"".join(e + b"\n\n" for e in frame.split(b"\n\n") if e and not _only_usage(e))
