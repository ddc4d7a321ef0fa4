"""Request translation for Ollama's /v1 layer: what ``openai/openai.go`` does before the native handler runs.

Each function turns an OpenAI-shaped body into the native body Ollama's
middleware would hand to /api/chat, /api/generate or /api/embed, raising
:class:`OpenAIRequestError` (a 400) where the middleware refuses the request,
with the middleware's own messages.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import orjson
from starlette.responses import Response

from .behavior import token_logprob
from .core import ORJSONResponse

# reasoning_effort -> native think (openai/openai.go)
_REASONING: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}
_IMAGE_PREFIXES = tuple(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")) + ("data:;base64,",)

_STR = ((str,), "string")
_BOOL = ((bool,), "bool")
_INT = ((int,), "int")
_FLOAT = ((int, float), "float64")
CHAT_FIELDS = {
    "model": _STR,
    "messages": ((list,), "[]openai.Message"),
    "stream": _BOOL,
    "stream_options": ((dict,), "openai.StreamOptions"),
    "max_tokens": _INT,
    "seed": _INT,
    "temperature": _FLOAT,
    "top_p": _FLOAT,
    "frequency_penalty": _FLOAT,
    "presence_penalty": _FLOAT,
    "response_format": ((dict,), "openai.ResponseFormat"),
    "tools": ((list,), "[]api.Tool"),
    "reasoning": ((dict,), "openai.Reasoning"),
    "reasoning_effort": _STR,
    "logprobs": _BOOL,
    "top_logprobs": _INT,
}
COMPLETION_FIELDS = {
    "model": _STR,
    "prompt": _STR,
    "suffix": _STR,
    "stream": _BOOL,
    "max_tokens": _INT,
    "seed": _INT,
    "stream_options": ((dict,), "openai.StreamOptions"),
    "temperature": _FLOAT,
    "top_p": _FLOAT,
    "frequency_penalty": _FLOAT,
    "presence_penalty": _FLOAT,
    "logprobs": _INT,
}
EMBED_FIELDS = {"model": _STR, "dimensions": _INT, "encoding_format": _STR}


class OpenAIRequestError(ValueError):
    """A request the middleware refuses before the native handler runs (always 400)."""


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def openai_error(status: int, message: str) -> Response:
    return ORJSONResponse(openai_error_body(status, message), status_code=status)


def _go_type(value: Any) -> str:
    """Go's ``%T`` of a decoded JSON value, as it appears in the middleware's messages."""
    if value is None:
        return "<nil>"
    return {bool: "bool", str: "string", dict: "map[string]interface {}", list: "[]interface {}"}.get(
        type(value), "float64"
    )


# --------------------------------------------------------------------------- request translation


def _native_calls(calls: Any) -> list[dict[str, Any]]:
    native = []
    for i, call in enumerate(calls or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise OpenAIRequestError("invalid tool call arguments")
        arguments = function.get("arguments")
        try:
            parsed = orjson.loads(arguments) if isinstance(arguments, str) else None
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise OpenAIRequestError("invalid tool call arguments")
        native.append(
            {
                "id": call.get("id", ""),
                "function": {"index": call.get("index", i), "name": function.get("name", ""), "arguments": parsed},
            }
        )
    return native


def _tool_name_for(messages: list, call_id: str) -> str:
    name = ""
    for message in messages:
        for call in message.get("tool_calls") or [] if isinstance(message, dict) else []:
            if isinstance(call, dict) and call.get("id") == call_id:
                name = (call.get("function") or {}).get("name", "")  # the last match wins, like Ollama
    return name


def _part_message(role: str, part: Any) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise OpenAIRequestError("invalid message format")
    if part.get("type") == "text":
        if not isinstance(part.get("text"), str):
            raise OpenAIRequestError("invalid message format")
        return {"role": role, "content": part["text"]}
    if part.get("type") != "image_url":
        raise OpenAIRequestError("invalid message format")
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise OpenAIRequestError("invalid message format")
    if url.startswith(("http://", "https://")):
        raise OpenAIRequestError("image URLs are not currently supported, please use base64 encoded data instead")
    prefix = next((p for p in _IMAGE_PREFIXES if url.startswith(p)), None)
    if prefix is None:
        raise OpenAIRequestError("invalid image input")
    data = url[len(prefix) :]
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIRequestError("invalid message format") from None
    return {"role": role, "content": "", "images": [data]}


def chat_to_native(body: dict) -> dict[str, Any]:
    """The native /api/chat body Ollama's ChatMiddleware builds from a /v1 request."""
    wire = body.get("messages") or []
    messages: list[dict[str, Any]] = []
    for message in wire:
        role = message.get("role") or ""
        tool_name = ""
        if role.lower() == "tool":
            tool_name = message.get("name") or ""
            if not tool_name and message.get("tool_call_id"):
                tool_name = _tool_name_for(wire, message["tool_call_id"])
        content, calls, reasoning = message.get("content"), message.get("tool_calls"), message.get("reasoning") or ""
        if isinstance(content, list):
            messages += [_part_message(role, part) for part in content]
            if messages and calls:  # parts may have become several messages: the calls go on the last one
                messages[-1].update(tool_calls=_native_calls(calls), thinking=reasoning)
                if tool_name:
                    messages[-1]["tool_name"] = tool_name
            continue
        if not isinstance(content, str) and calls is None:
            raise OpenAIRequestError(f"invalid message content type: {_go_type(content)}")
        native = {"role": role, "content": content if isinstance(content, str) else ""}
        if reasoning:
            native["thinking"] = reasoning
        if calls:
            native["tool_calls"] = _native_calls(calls)
        if tool_name:
            native["tool_name"] = tool_name
        messages.append(native)

    # Sampling options do not change what the sim generates, but the translation keeps Ollama's
    # defaults (temperature and top_p forced to 1.0) so the native body reads like the real one.
    options: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        options["stop"] = [s for s in stop if isinstance(s, str)]  # chat drops non-strings silently
    if body.get("max_tokens") is not None:  # max_completion_tokens is not read by Ollama at all
        options["num_predict"] = body["max_tokens"]
    for key in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
        if body.get(key) is not None:
            options[key] = body[key]
    native_body: dict[str, Any] = {
        "model": body.get("model") or "",
        "messages": messages,
        "options": options,
        "stream": bool(body.get("stream")),
        "tools": body.get("tools") or [],
    }
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        native_body["format"] = "json"
    elif (
        fmt.get("type") == "json_schema"
        and isinstance(fmt.get("json_schema"), dict)
        and fmt["json_schema"].get("schema") is not None
    ):
        native_body["format"] = fmt["json_schema"]["schema"]
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort = body["reasoning"].get("effort")
    if effort is not None:
        if effort not in _REASONING:
            raise OpenAIRequestError(f"invalid reasoning value: '{effort}'")
        native_body["think"] = _REASONING[effort]
    if body.get("logprobs") is not None:
        native_body["logprobs"] = body["logprobs"]
    if body.get("top_logprobs") is not None:
        native_body["top_logprobs"] = body["top_logprobs"]
    return native_body


def completion_to_native(body: dict) -> dict[str, Any]:
    """The native /api/generate body Ollama's CompletionsMiddleware builds."""
    options: dict[str, Any] = {
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": body.get("top_p") or 1.0,
    }
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        bad = [s for s in stop if not isinstance(s, str)]
        if bad:  # unlike chat, completions refuses the whole request
            raise OpenAIRequestError(f"invalid type for 'stop' field: {_go_type(bad[0])}")
        options["stop"] = list(stop)
    elif stop is not None:
        raise OpenAIRequestError(f"invalid type for 'stop' field: {_go_type(stop)}")
    if body.get("max_tokens") is not None:
        options["num_predict"] = body["max_tokens"]
    for key in ("seed", "frequency_penalty", "presence_penalty"):
        if body.get(key) is not None:
            options[key] = body[key]
    native: dict[str, Any] = {
        "model": body.get("model") or "",
        "prompt": body.get("prompt") or "",
        "suffix": body.get("suffix") or "",
        "options": options,
        "stream": bool(body.get("stream")),
    }
    if body.get("logprobs") is not None:  # an int on /v1/completions: "logprobs: 5" means on, top 5
        native.update(logprobs=True, top_logprobs=body["logprobs"])
    return native


def openai_call(native: dict[str, Any]) -> dict[str, Any]:
    function = native["function"]
    return {
        "id": native["id"],
        "index": function["index"],
        "type": "function",
        "function": {"name": function["name"], "arguments": orjson.dumps(function["arguments"]).decode()},
    }


def logprob_entry(token: str, top: int) -> dict[str, Any]:
    entry = token_logprob(token, top)
    if not entry["top_logprobs"]:
        del entry["top_logprobs"]  # omitempty, as on the native lines it is copied from
    return entry


def float32_le(vector: list[float]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)  # little-endian float32, what the SDK decodes
