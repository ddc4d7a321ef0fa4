"""OpenAI chat-completions answers -> Anthropic Messages answers, whole or streamed. Pure: no I/O.

The backends answer in OpenAI's shape (after their own translation); the
Anthropic ingress turns that into a ``message`` or into Anthropic's event
sequence. :class:`MessageStream` works chunk in, chunk out: each OpenAI SSE frame
becomes the Anthropic events it implies at once, opening and closing content
blocks as the deltas switch between reasoning, text and tool calls.
"""

from __future__ import annotations

import orjson

from ..errors import BackendError
from .common import new_id

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def message_id(openai_id: object) -> str:
    """``msg_...`` from the backend's ``chatcmpl-...`` id, so the two can be matched in logs."""
    if isinstance(openai_id, str) and openai_id:
        return "msg_" + openai_id.removeprefix("chatcmpl-")
    return new_id("msg_")


def stop_reason(finish_reason: object, matched: object, called_tools: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from OpenAI's ``finish_reason`` and vLLM's ``stop_reason``.

    vLLM reports the stop string that ended the answer; Ollama does not, so an
    answer cut by a stop sequence there reads ``end_turn``. An answer that called a
    tool is ``tool_use`` unless it was cut (vLLM says ``stop`` for a named tool choice).
    """
    if finish_reason == "length":
        return "max_tokens", None
    if called_tools:
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish_reason, "end_turn"), None  # type: ignore[arg-type]


def usage(openai_usage: object) -> dict:
    if not isinstance(openai_usage, dict):
        openai_usage = {}
    prompt = openai_usage.get("prompt_tokens") or 0
    details = openai_usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return {
        # Anthropic counts cached prompt tokens apart: input + cache_read is the whole prompt.
        "input_tokens": prompt - cached,
        "output_tokens": openai_usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: object) -> dict:
    """A tool call's ``input`` object from OpenAI's JSON-string ``arguments`` ({} when not an object)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _reasoning(message: dict) -> str | None:
    # vLLM and the Ollama translator say reasoning_content; newer vLLM and Ollama's own layer say reasoning.
    return message.get("reasoning_content") or message.get("reasoning")


def to_message(completion: dict) -> dict:
    """An Anthropic ``message`` from an OpenAI ``chat.completion``."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict] = []
    thinking = _reasoning(message)
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or ()
    for call in calls:
        function = call.get("function") or {}
        content.append({
            "type": "tool_use",
            "id": call.get("id") or new_id("toolu_"),
            "name": function.get("name") or "",
            "input": tool_input(function.get("arguments")),
        })  # fmt: skip
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), bool(calls))
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(completion.get("usage")),
    }


def event(kind: str, data: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_PING = event("ping", {"type": "ping"})
_STOP = event("message_stop", {"type": "message_stop"})


class MessageStream:
    """OpenAI ``chat.completion.chunk`` SSE bytes in, Anthropic stream events out.

    Feed it the frames as they come (they need not be aligned to events: a
    partial event waits for its end); :meth:`feed` returns the events each one
    completes. The OpenAI ``[DONE]`` becomes ``message_delta`` (stop reason and
    token counts) and ``message_stop``; it is not forwarded.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.started = False
        self.finished = False
        self.index = -1  # the open content block's index; blocks are numbered 0, 1, ... as they start
        self.block: str | None = None  # "thinking", "text" or "tool_use"
        self.tool_index: int | None = None  # the OpenAI index of the tool call the open block holds
        self.tool_id: str | None = None  # and its id
        self.finish_reason: str | None = None
        self.matched: str | None = None
        self.called_tools = False
        self.usage: dict | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending + chunk, b""
        if b"\r" in chunk:  # some servers frame events with CRLF (a CR may end the previous piece)
            chunk = chunk.replace(b"\r\n", b"\n")
        if not chunk.endswith(b"\n\n"):
            cut = chunk.rfind(b"\n\n") + 2  # 1 when no event ends in this chunk: all of it waits
            if cut == 1:
                cut = 0
            chunk, self._pending = chunk[:cut], chunk[cut:]
        out = []
        for raw in chunk.split(b"\n\n"):
            for line in raw.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(self._data(line[5:].strip()))
        return b"".join(out)

    def close(self) -> bytes:
        """The end of a stream that stopped without ``[DONE]`` after its finish chunk (a cache replay may)."""
        if self._pending:
            rest, self._pending = self._pending + b"\n\n", b""
            out = self.feed(rest)
        else:
            out = b""
        if self.finish_reason is not None and not self.finished:
            out += self._finish()
        return out

    # --- one OpenAI chunk ----------------------------------------------------------------------

    def _data(self, data: bytes) -> bytes:
        if data == b"[DONE]":
            return self._finish() if not self.finished else b""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BackendError("the backend sent a stream chunk that is not JSON") from None
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise BackendError(f"the backend failed mid-stream: {message}")
        out = b"" if self.started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            out += self._delta(delta)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.matched = choice.get("stop_reason") if isinstance(choice.get("stop_reason"), str) else None
        return out

    def _start(self, chunk: dict) -> bytes:
        self.started = True
        message = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The prompt's size comes with the last chunk; message_delta carries it.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return event("message_start", {"type": "message_start", "message": message}) + _PING

    def _delta(self, delta: dict) -> bytes:
        out = b""
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        if thinking:
            out += self._open("thinking")
            out += self._block_delta({"type": "thinking_delta", "thinking": thinking})
        text = delta.get("content")
        if text:
            out += self._open("text")
            out += self._block_delta({"type": "text_delta", "text": text})
        for call in delta.get("tool_calls") or ():
            out += self._tool_call(call)
        return out

    def _tool_call(self, call: dict) -> bytes:
        out = b""
        function = call.get("function") or {}
        position = call.get("index", 0)
        call_id = call.get("id") or None
        # A new call has a new index; servers that leave the index out at least give a new id.
        if self.block != "tool_use" or self.tool_index != position or (call_id and call_id != self.tool_id):
            call_id = call_id or new_id("toolu_")
            out += self._open("tool_use", {
                "type": "tool_use", "id": call_id, "name": function.get("name") or "", "input": {},
            })  # fmt: skip
            self.tool_index, self.tool_id = position, call_id
            self.called_tools = True
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # some servers send the object itself
            arguments = orjson.dumps(arguments).decode()
        if arguments:
            out += self._block_delta({"type": "input_json_delta", "partial_json": arguments})
        return out

    # --- content blocks ------------------------------------------------------------------------

    def _open(self, kind: str, block: dict | None = None) -> bytes:
        if self.block == kind and kind != "tool_use":
            return b""
        out = self._close_block()
        self.block = kind
        self.index += 1
        if block is None:
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {
                "type": "text", "text": ""}  # fmt: skip
        return out + event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                    "content_block": block})  # fmt: skip

    def _block_delta(self, delta: dict) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _close_block(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        self.tool_index = self.tool_id = None
        return event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _finish(self) -> bytes:
        self.finished = True
        out = b"" if self.started else self._start({})
        out += self._close_block()
        reason, sequence = stop_reason(self.finish_reason, self.matched, self.called_tools)
        counts = usage(self.usage)
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": counts}
        return out + event("message_delta", delta) + _STOP
