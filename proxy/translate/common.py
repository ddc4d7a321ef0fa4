"""Small pieces every translator shares: ids, SSE framing, sampling options, logprobs."""

from __future__ import annotations

import os
import time

import orjson

from ..errors import UnsupportedParameter

DONE = b"data: [DONE]\n\n"


class ChunkFramer:
    """SSE frames for one streamed answer, whose chunks all share ``id``, ``object``, ``created``, ``model``.

    The shared part is encoded once per stream and the per-token part spliced in,
    instead of encoding a whole chunk object for every token.
    """

    def __init__(self, id_prefix: str, obj: str, model: str, field: str) -> None:
        self.id = new_id(id_prefix)
        head = {"id": self.id, "object": obj, "created": now(), "model": model}
        self._head = b'data: {"choices":[{"index":0,"' + field.encode() + b'":'
        self._shared = orjson.dumps(head)[1:] + b"\n\n"  # '"id":...}' and the event end
        self._plain = b',"logprobs":null,"finish_reason":null}],' + self._shared  # most chunks end so

    def choice(self, value, logprobs=None, finish: str | None = None) -> bytes:
        if logprobs is None and finish is None:
            return self._head + orjson.dumps(value) + self._plain
        return (
            self._head
            + orjson.dumps(value)
            + b',"logprobs":'
            + orjson.dumps(logprobs)
            + b',"finish_reason":'
            + orjson.dumps(finish)
            + b"}],"
            + self._shared
        )

    def usage(self, usage: dict) -> bytes:
        """The final ``include_usage`` chunk: no choices, the token counts."""
        return b'data: {"choices":[],"usage":' + orjson.dumps(usage) + b"," + self._shared


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def now() -> int:
    return int(time.time())


def sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# OpenAI (and vLLM-style extra) sampling fields that become Ollama ``options`` under these names.
_OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repetition_penalty": "repeat_penalty",
}

# Fields that change nothing in the answer (bookkeeping for OpenAI's own platform): accepted, unused.
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "stream_options"}
)


def ollama_options(body: dict, max_tokens_fields: tuple[str, ...]) -> dict:
    """Build Ollama ``options`` from a request: the client's own ``options`` first, OpenAI fields over them."""
    # null means "absent" inside options too: Ollama would refuse it as a wrongly typed value
    options = {k: v for k, v in (body.get("options") or {}).items() if v is not None}
    for field, name in _OPTION_FIELDS.items():
        value = body.get(field)
        if value is not None:
            options[name] = value
    for field in max_tokens_fields:  # the first one present wins (max_completion_tokens over max_tokens)
        value = body.get(field)
        if value is not None:
            options["num_predict"] = value
            break
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return options


def refuse_unknown(body: dict, known: frozenset[str], backend_kind: str = "Ollama") -> None:
    for key in body:
        if key not in known:
            raise UnsupportedParameter(
                f"Unrecognized request argument supplied: {key} ({backend_kind} backends do not support it)",
                param=key,
            )


def refuse_if(condition: bool, param: str, why: str) -> None:
    if condition:
        raise UnsupportedParameter(f"'{param}' is not supported by Ollama backends: {why}", param=param)


def finish_reason(done_reason: str | None, saw_tool_calls: bool) -> str:
    # Ollama reports "stop" even when the model ended by calling a tool; OpenAI says "tool_calls".
    # "length" wins over tool calls: the answer was cut, whatever it contained.
    if done_reason == "length":
        return "length"
    if saw_tool_calls:
        return "tool_calls"
    return "stop"


def usage(line: dict) -> dict:
    prompt = line.get("prompt_eval_count") or 0
    completion = line.get("eval_count") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
