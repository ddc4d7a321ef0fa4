"""A complete OpenAI answer <-> its SSE stream. Pure: no I/O.

The cache stores complete answers. :func:`completion_to_frames` replays one as a
stream shaped like OpenAI's and vLLM's (a role chunk first, then reasoning,
content and tool-call deltas, a finish chunk with an empty delta, an optional
usage chunk with ``choices: []``, then ``[DONE]``; every chunk with the answer's
``id``, ``created`` and ``model``). :class:`StreamAccumulator` goes the other way:
it reads a streamed answer, in whatever byte pieces it arrives, and rebuilds the
complete answer, or None when the stream did not end properly.

Round trip: ``accumulate(completion_to_frames(c, kind, include_usage=True)) == c``
for chat answers (content, reasoning, tool calls, refusal, logprobs, several
choices) and text completions. Message fields beyond role/content/tool_calls
(``reasoning_content``, ``reasoning``, ``refusal``, vendor extras) are carried as
deltas of the same name: strings are sent as their own delta and concatenated
back, other values (null included) ride on the role chunk. Choice fields beyond
the standard ones (vLLM's ``stop_reason``) ride on the finish chunk; top-level
extras other than ``system_fingerprint`` (which is on every chunk, as OpenAI
does) ride on the first chunk.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from .common import DONE

Kind = Literal["chat", "text"]

_CHUNK_OBJECT = {"chat": "chat.completion.chunk", "text": "text_completion"}
_COMPLETE_OBJECT = {"chat": "chat.completion", "text": "text_completion"}
_TOP_LEVEL = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint"})
_CHOICE_FIELDS = {"chat": frozenset({"index", "message", "logprobs", "finish_reason"}),
                  "text": frozenset({"index", "text", "logprobs", "finish_reason"})}  # fmt: skip
_DELTA_FIELDS = frozenset({"index", "delta", "text", "logprobs", "finish_reason"})


def _frame(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def completion_to_frames(completion: dict, kind: Kind, include_usage: bool) -> list[bytes]:
    """SSE frames replaying ``completion`` (a ``chat.completion`` or ``text_completion``), ``[DONE]`` last."""
    head: dict[str, Any] = {
        "id": completion.get("id"),
        "object": _CHUNK_OBJECT[kind],
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    if "system_fingerprint" in completion:
        head["system_fingerprint"] = completion["system_fingerprint"]
    extras = {k: v for k, v in completion.items() if k not in _TOP_LEVEL}
    chunks: list[dict] = []
    for choice in completion.get("choices") or ():
        if kind == "chat":
            chunks += _chat_choice(choice)
        else:
            chunks += _text_choice(choice)
    frames = []
    for i, choices in enumerate(chunks):
        chunk = {**head, "choices": [choices]}
        if i == 0 and extras:
            chunk.update(extras)
        frames.append(_frame(chunk))
    usage = completion.get("usage")
    if include_usage and usage is not None:
        frames.append(_frame({**head, "choices": [], "usage": usage}))
    frames.append(DONE)
    return frames


def _finish(choice: dict, kind: Kind, logprobs: Any) -> dict:
    out: dict[str, Any] = {"index": choice.get("index", 0)}
    if kind == "chat":
        out["delta"] = {}
    else:
        out["text"] = ""
    out["logprobs"] = logprobs
    out["finish_reason"] = choice.get("finish_reason")
    for name, value in choice.items():
        if name not in _CHOICE_FIELDS[kind]:
            out[name] = value  # e.g. vLLM's stop_reason, which it sends on the finishing chunk
    return out


def _chat_choice(choice: dict) -> list[dict]:
    index = choice.get("index", 0)
    message = choice.get("message") or {}
    content = message.get("content")
    logprobs = choice.get("logprobs")

    def delta(d: dict, lp: Any = None) -> dict:
        return {"index": index, "delta": d, "logprobs": lp, "finish_reason": None}

    # OpenAI's first delta: the role, content "" (null when the answer is tool calls only).
    first: dict[str, Any] = {"role": message.get("role", "assistant"), "content": None if content is None else ""}
    later: list[dict] = []
    for name, value in message.items():
        if name in ("role", "content", "tool_calls"):
            continue
        if isinstance(value, str) and value:
            later.append(delta({name: value}))  # reasoning_content, reasoning, refusal ...
        else:
            first[name] = value
    calls = message.get("tool_calls")
    if calls is not None and not calls:
        first["tool_calls"] = []  # vLLM's non-stream "tool_calls": [] survives the trip
    out = [delta(first)]
    out += later
    if content:
        out.append(delta({"content": content}, logprobs))
        logprobs = None
    for k, call in enumerate(calls or ()):
        fn = call.get("function") or {}
        piece = {
            "index": k,
            "id": call.get("id"),
            "type": call.get("type", "function"),
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments", "")},
        }
        out.append(delta({"tool_calls": [piece]}))
    out.append(_finish(choice, "chat", logprobs))
    return out


def _text_choice(choice: dict) -> list[dict]:
    index = choice.get("index", 0)
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs")
    out = []
    if text:
        out.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})
        logprobs = None
    out.append(_finish(choice, "text", logprobs))
    return out


# --- stream -> complete answer ------------------------------------------------------------------


class _Choice:
    __slots__ = ("index", "message", "parts", "text", "calls", "logprobs", "finish_reason", "extras")

    def __init__(self, index: int) -> None:
        self.index = index
        self.message: dict[str, Any] = {}
        # String fields arrive in pieces; joined once at the end (repeated += would be quadratic).
        self.parts: dict[str, list[str]] = {}
        self.text: list[str] = []
        self.calls: dict[int, dict] = {}
        self.logprobs: dict | None = None
        self.finish_reason: str | None = None
        self.extras: dict[str, Any] = {}


class StreamAccumulator:
    """Rebuilds the complete answer from an SSE stream fed in arbitrary byte pieces."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._buffer = b""
        self._head: dict[str, Any] | None = None
        self._extras: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: dict | None = None
        self.done = False  # [DONE] seen
        self.error: Any = None  # the error object of an error event

    def feed(self, data: bytes) -> None:
        if self.done or self.error is not None:
            return
        data = self._buffer + data if self._buffer else data
        tail = b""
        if b"\r" in data:
            # CRLF and bare CR are legal SSE line ends; a trailing CR may be half of a CRLF.
            if data.endswith(b"\r"):
                data, tail = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            self._event(data[start:end])
            start = end + 2
            if self.done or self.error is not None:
                return
        self._buffer = data[start:] + tail

    def _event(self, raw: bytes) -> None:
        if raw.startswith(b"data: {") and b"\n" not in raw:  # the usual one-line event
            try:
                chunk = orjson.loads(raw[6:])
            except orjson.JSONDecodeError:
                self.error = {"message": "malformed stream chunk"}
                return
            if "error" in chunk:
                self.error = chunk["error"]
                return
            self._chunk(chunk)
            return
        payload = []
        event_type = None
        for line in raw.split(b"\n"):
            if not line or line.startswith(b":"):
                continue  # comments keep connections alive
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                payload.append(value)
            elif name == b"event":
                event_type = value
        if not payload:
            return
        data = b"\n".join(payload)
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error = {"message": "malformed stream chunk"}
            return
        if event_type == b"error" or not isinstance(chunk, dict) or "error" in chunk:
            self.error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
            return
        self._chunk(chunk)

    def _chunk(self, chunk: dict) -> None:
        if self._head is None:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model")}
        for name, value in chunk.items():
            if name == "system_fingerprint":
                self._head["system_fingerprint"] = value
            elif name not in _TOP_LEVEL:
                self._extras.setdefault(name, value)
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]  # with continuous usage stats, the last one counts
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _Choice(index)
            if self.kind == "chat":
                self._chat_delta(choice, part.get("delta") or {})
            elif part.get("text"):
                choice.text.append(part["text"])
            if part.get("logprobs") is not None:
                choice.logprobs = _merge_logprobs(choice.logprobs, part["logprobs"])
            if part.get("finish_reason") is not None:
                choice.finish_reason = part["finish_reason"]
            for name, value in part.items():
                if name not in _DELTA_FIELDS:
                    choice.extras[name] = value

    @staticmethod
    def _chat_delta(choice: _Choice, delta: dict) -> None:
        message = choice.message
        for name, value in delta.items():
            if name == "tool_calls":
                message.setdefault("tool_calls", None)  # its place in the key order
                for piece in value or ():
                    _merge_call(choice.calls, piece)
            elif isinstance(value, str) and name != "role":
                parts = choice.parts.get(name)
                if parts is None:
                    choice.parts[name] = [value]
                    message.setdefault(name, None)  # its place in the key order
                else:
                    parts.append(value)
            elif name not in message or (value is not None and name not in choice.parts):
                message[name] = value

    def result(self) -> dict | None:
        """The complete answer, or None if the stream failed, did not finish, or held no chunk."""
        if self.error is not None or not self.done or self._head is None or not self._choices:
            return None
        if any(c.finish_reason is None for c in self._choices.values()):
            return None
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            out: dict[str, Any] = {"index": index}
            if self.kind == "chat":
                message = {"role": "assistant", "content": None, **choice.message}
                for name, parts in choice.parts.items():
                    message[name] = "".join(parts)
                if "tool_calls" in message:
                    message["tool_calls"] = [_call_result(choice.calls[k]) for k in sorted(choice.calls)]
                out["message"] = message
            else:
                out["text"] = "".join(choice.text)
            out["logprobs"] = choice.logprobs
            out["finish_reason"] = choice.finish_reason
            out.update(choice.extras)
            choices.append(out)
        head = self._head
        answer: dict[str, Any] = {
            "id": head["id"],
            "object": _COMPLETE_OBJECT[self.kind],
            "created": head["created"],
            "model": head["model"],
            "choices": choices,
            "usage": self._usage,
        }
        if "system_fingerprint" in head:
            answer["system_fingerprint"] = head["system_fingerprint"]
        answer.update(self._extras)
        return answer


def _merge_call(calls: dict[int, dict], piece: dict) -> None:
    # The first fragment of a call has id, type and name; later ones only argument text.
    k = piece.get("index", len(calls))
    call = calls.get(k)
    fn = piece.get("function") or {}
    if call is None:
        calls[k] = {
            "id": piece.get("id"),
            "type": piece.get("type") or "function",
            "name": fn.get("name") or "",
            "arguments": [fn.get("arguments") or ""],
        }
        return
    if piece.get("id"):
        call["id"] = piece["id"]
    if piece.get("type"):
        call["type"] = piece["type"]
    if fn.get("name"):
        call["name"] += fn["name"]
    if fn.get("arguments"):
        call["arguments"].append(fn["arguments"])


def _call_result(call: dict) -> dict:
    function = {"name": call["name"], "arguments": "".join(call["arguments"])}
    return {"id": call["id"], "type": call["type"], "function": function}


def _merge_logprobs(acc: dict | None, part: dict) -> dict:
    # Chat: {"content": [...], "refusal": [...] | null}; text: parallel lists (tokens, token_logprobs, ...).
    if acc is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in part.items()}
    for name, value in part.items():
        if isinstance(value, list):
            acc[name] = (acc.get(name) or []) + value
        elif name not in acc:
            acc[name] = value
    return acc


def accumulate(frames: list[bytes] | bytes, kind: Kind) -> dict | None:
    """Convenience: the complete answer of a whole stream (or None)."""
    acc = StreamAccumulator(kind)
    for frame in [frames] if isinstance(frames, bytes) else frames:
        acc.feed(frame)
    return acc.result()
