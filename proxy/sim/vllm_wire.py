"""vLLM wire details: error bodies, pydantic-style validation errors, SSE frames, input parsing."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.responses import Response

from .behavior import count_words
from .core import ORJSONResponse

SSE = "text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"
ARG_PIECE = re.compile(r"[^,:]+[,:]?|[,:]")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default, unlike chat
MID_STREAM_ERROR = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def verror(status: int, message: str, err_type: str = "BadRequestError", param: str | None = None) -> Response:
    return ORJSONResponse({"error": error_info(status, message, err_type, param)}, status_code=status)


def error_info(status: int, message: str, err_type: str, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": err_type, "param": param, "code": status}


def validation_error(kind: str, loc: tuple, msg: str, value: Any) -> Response:
    # pydantic's error list, rendered the way vLLM puts str(exc) into the message
    return verror(400, str([{"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}]))


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def text_of(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def check_types(body: dict, expected: dict[str, tuple[tuple[type, ...], str, str]]) -> Response | None:
    for name, (kinds, kind, msg) in expected.items():
        value = body.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return validation_error(kind, (name,), msg, value)
    return None


_INT = ((int,), "int_type", "Input should be a valid integer")
_BOOL = ((bool,), "bool_type", "Input should be a valid boolean")
_NUMBER = ((int, float), "float_type", "Input should be a valid number")
_STOP = ((str, list), "list_type", "Input should be a valid list")
_COMMON_FIELDS = {
    "stream": _BOOL,
    "max_tokens": _INT,
    "n": _INT,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "stop": _STOP,
    "seed": _INT,
}
CHAT_FIELDS = {
    **_COMMON_FIELDS,
    "logprobs": _BOOL,
    "top_logprobs": _INT,
    "max_completion_tokens": _INT,
    "tools": ((list,), "list_type", "Input should be a valid list"),
}
COMPLETION_FIELDS = {**_COMMON_FIELDS, "logprobs": _INT, "echo": _BOOL}


def json_request(body: dict) -> tuple[dict | None, bool]:
    """(schema, json_mode) from response_format or vLLM's guided/structured extras."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            return (spec.get("schema") or spec.get("json_schema")), True
        if fmt.get("type") == "json_object":
            return None, True
    guided = body.get("guided_json") or (body.get("structured_outputs") or {}).get("json")
    if isinstance(guided, str):
        try:
            guided = orjson.loads(guided)
        except orjson.JSONDecodeError:
            guided = None
    if isinstance(guided, dict):
        return guided, True
    return None, False


def stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else []


def parse_prompts(prompt: Any) -> list[tuple[str, int]] | None:
    """(text, prompt token count) per prompt, or None when the prompt is malformed."""
    if isinstance(prompt, str):
        return [(prompt, count_words(prompt) + 1)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(p, count_words(p) + 1) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [(_token_text(prompt), len(prompt))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [(_token_text(p), len(p)) for p in prompt]
    return None


def embedding_inputs(value: Any) -> list[tuple[str, int]] | None:
    if isinstance(value, str):
        return [(value, count_words(value) + 2)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(v, count_words(v) + 2) for v in value]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [(_token_text(value), len(value))]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [(_token_text(v), len(v)) for v in value]
    return None


def _token_text(tokens: list[int]) -> str:
    return " ".join(f"<{t}>" for t in tokens)
