"""OpenAI ``/v1/chat/completions`` <-> Ollama ``/api/chat``. Pure: no I/O.

The request is always sent to Ollama as a stream: the same line parser serves
streaming clients (:class:`ChatStream`, one native line in, SSE frames out) and
non-streaming ones (:class:`ChatAggregate`), and a long generation is bounded by
the idle timeout between lines instead of one timeout for the whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from ..errors import InvalidRequest, UnsupportedParameter
from .common import (
    DONE,
    IGNORED_FIELDS,
    ChunkFramer,
    finish_reason,
    new_id,
    now,
    ollama_options,
    refuse_if,
    refuse_unknown,
    usage,
)

_KNOWN = IGNORED_FIELDS | {
    "model", "messages", "stream", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "reasoning_effort", "functions", "function_call", "modalities", "audio", "prediction",
    "web_search_options", "verbosity",
    # Ollama-native fields a client may send as extra body fields
    "options", "keep_alive", "think", "top_k", "min_p", "typical_p", "repeat_penalty", "repetition_penalty",
}  # fmt: skip

# OpenAI reasoning_effort -> Ollama think
_THINK = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
    "xhigh": "max", "max": "max",
}  # fmt: skip

_IMAGE_PREFIXES = ("data:image/jpeg;base64,", "data:image/jpg;base64,", "data:image/png;base64,",
                   "data:image/webp;base64,", "data:image/gif;base64,", "data:;base64,")  # fmt: skip


@dataclass(frozen=True)
class ChatShape:
    """What the response translator needs to know about the request."""

    model: str  # the public name the client sent, echoed in every response
    include_usage: bool = False
    single_tool_call: bool = False  # parallel_tool_calls: false


def _text_and_images(content, path: str) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text") or "")
        elif kind == "refusal":
            texts.append(part.get("refusal") or "")
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(_image_data(url, f"{path}[{j}].image_url"))
        else:
            raise UnsupportedParameter(
                f"content part type {kind!r} is not supported by Ollama backends (use text or image_url)",
                param=f"{path}[{j}].type",
            )
    return "\n".join(texts), images


def _image_data(url, param: str) -> str:
    if not isinstance(url, str):
        raise InvalidRequest("image_url.url must be a string", param=param)
    for prefix in _IMAGE_PREFIXES:
        if url.startswith(prefix):
            return url[len(prefix) :]
    if url.startswith(("http://", "https://")):
        raise UnsupportedParameter(
            "image URLs are not supported by Ollama backends; send the image as a base64 data URL "
            "(data:image/png;base64,...)",
            param=param,
        )
    raise InvalidRequest("invalid image: expected a data:image/...;base64, URL", param=param)


def _tool_calls(calls: list, path: str) -> list[dict]:
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") or {}
        raw = fn.get("arguments")
        if raw is None or raw == "":
            args = {}
        elif isinstance(raw, dict):
            args = raw
        else:
            try:
                args = orjson.loads(raw)
            except (orjson.JSONDecodeError, TypeError):
                args = None
            if not isinstance(args, dict):
                raise InvalidRequest(
                    "tool call arguments must be a JSON object encoded as a string",
                    param=f"{path}[{k}].function.arguments",
                )
        native = {"function": {"index": k, "name": fn.get("name", ""), "arguments": args}}
        if call.get("id"):
            native["id"] = call["id"]
        out.append(native)
    return out


def _messages(messages: list) -> list[dict]:
    out: list[dict] = []
    tool_names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    for i, msg in enumerate(messages):
        role = msg["role"]
        path = f"messages[{i}]"
        if role == "function":
            raise UnsupportedParameter(
                "the legacy 'function' role is not supported; use tools and 'tool' messages", param=f"{path}.role"
            )
        text, images = _text_and_images(msg.get("content"), f"{path}.content")
        native: dict = {"role": "system" if role == "developer" else role, "content": text}
        if images:
            native["images"] = images
        if role == "assistant":
            if msg.get("tool_calls"):
                native["tool_calls"] = _tool_calls(msg["tool_calls"], f"{path}.tool_calls")
                for call in msg["tool_calls"]:
                    if call.get("id"):
                        tool_names[call["id"]] = (call.get("function") or {}).get("name", "")
            thinking = msg.get("reasoning_content") or msg.get("reasoning")
            if thinking:
                native["thinking"] = thinking
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = msg.get("name") or tool_names.get(call_id or "")
            if name:
                native["tool_name"] = name
            if call_id:
                native["tool_call_id"] = call_id
        out.append(native)
    return out


def _tools(body: dict) -> list | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        # A named tool: Ollama cannot force a call, so offer only that tool (documented as best effort).
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        return chosen
    return tools


def _format(response_format):
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                                 param="response_format.json_schema.schema")  # fmt: skip
        return schema
    return None  # "text"


def chat_request(body: dict, target: str) -> tuple[dict, ChatShape]:
    """Translate a validated OpenAI chat request into an Ollama ``/api/chat`` body."""
    refuse_unknown(body, _KNOWN)
    refuse_if((body.get("n") or 1) > 1, "n", "Ollama returns one choice per request")
    refuse_if(bool(body.get("logit_bias")), "logit_bias", "Ollama has no logit bias")
    refuse_if(bool(body.get("functions") or body.get("function_call")), "functions",
              "the legacy functions API is not translated; use tools")  # fmt: skip
    refuse_if(body.get("modalities") not in (None, ["text"]), "modalities", "only text output is available")
    for name in ("audio", "prediction", "web_search_options", "verbosity"):
        refuse_if(body.get(name) is not None, name, "no Ollama equivalent")

    native: dict = {"model": target, "messages": _messages(body["messages"]), "stream": True}
    options = ollama_options(body, ("max_completion_tokens", "max_tokens"))
    if options:
        native["options"] = options
    tools = _tools(body)
    if tools:
        native["tools"] = tools
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        native["format"] = fmt
    if body.get("think") is not None:  # null means absent, as for every optional field
        native["think"] = body["think"]
    elif body.get("reasoning_effort") is not None:
        effort = body["reasoning_effort"]
        if effort not in _THINK:
            raise InvalidRequest(f"invalid reasoning_effort {effort!r}; expected one of {', '.join(_THINK)}",
                                 param="reasoning_effort")  # fmt: skip
        native["think"] = _THINK[effort]
    if body.get("logprobs"):
        native["logprobs"] = True
        if body.get("top_logprobs"):
            native["top_logprobs"] = body["top_logprobs"]
    if body.get("keep_alive") is not None:
        native["keep_alive"] = body["keep_alive"]

    shape = ChatShape(
        model=body["model"],
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        single_tool_call=body.get("parallel_tool_calls") is False,
    )
    return native, shape


def _openai_tool_call(call: dict, index: int) -> dict:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    return {
        "index": index,
        # Older Ollama releases send no id; clients need one to answer the call.
        "id": call.get("id") or new_id("call_")[:29],
        "type": "function",
        "function": {
            "name": fn.get("name", ""),
            "arguments": args if isinstance(args, str) else orjson.dumps(args if args is not None else {}).decode(),
        },
    }


class ChatStream:
    """Turns Ollama ``/api/chat`` stream lines into OpenAI ``chat.completion.chunk`` SSE frames."""

    def __init__(self, shape: ChatShape) -> None:
        self.shape = shape
        self.framer = ChunkFramer("chatcmpl-", "chat.completion.chunk", shape.model, "delta")
        self.id = self.framer.id
        self.tool_calls = 0
        self.role_sent = False
        self.usage: dict | None = None
        self.finish_reason: str | None = None

    def _frame(self, delta: dict, logprobs=None, finish: str | None = None) -> bytes:
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        return self.framer.choice(delta, logprobs, finish)

    def feed(self, line: dict) -> bytes:
        """SSE bytes for one native line (possibly several frames, possibly none)."""
        msg = line.get("message") or {}
        if self.role_sent and len(msg) == 2 and "role" in msg and not line.get("done") and not line.get("logprobs"):
            # Nearly every line of an answer: a message of role and content only, what the rest below
            # would make of it without its checks.
            content = msg.get("content")
            if content is not None:
                return self.framer.choice({"content": content}) if content else b""
        out = b""
        logprobs = {"content": line["logprobs"]} if line.get("logprobs") else None
        thinking = msg.get("thinking")
        if thinking:
            out += self._frame({"reasoning_content": thinking}, logprobs)
            logprobs = None
        calls = msg.get("tool_calls")
        if calls and not (self.shape.single_tool_call and self.tool_calls):
            if self.shape.single_tool_call:
                calls = calls[:1]
            deltas = [_openai_tool_call(c, self.tool_calls + k) for k, c in enumerate(calls)]
            self.tool_calls += len(deltas)
            out += self._frame(
                {"content": None, "tool_calls": deltas} if not self.role_sent else {"tool_calls": deltas}
            )
        content = msg.get("content")
        if content:
            out += self._frame({"content": content}, logprobs)
        if line.get("done"):
            out += self.finish(line)
        return out

    def finish(self, line: dict) -> bytes:
        out = b"" if self.role_sent else self._frame({"content": ""})
        self.finish_reason = finish_reason(line.get("done_reason"), self.tool_calls > 0)
        self.usage = usage(line)
        out += self._frame({}, None, self.finish_reason)
        if self.shape.include_usage:
            out += self.framer.usage(self.usage)
        return out + DONE


class ChatAggregate:
    """Collects Ollama ``/api/chat`` stream lines into one OpenAI ``chat.completion``."""

    def __init__(self, shape: ChatShape) -> None:
        self.shape = shape
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list = []
        self.last: dict = {}

    def feed(self, line: dict) -> None:
        msg = line.get("message") or {}
        if msg.get("content"):
            self.content.append(msg["content"])
        if msg.get("thinking"):
            self.thinking.append(msg["thinking"])
        for call in msg.get("tool_calls") or ():
            self.calls.append(call)
        if line.get("logprobs"):
            self.logprobs.extend(line["logprobs"])
        if line.get("done"):
            self.last = line

    def result(self) -> dict:
        calls = self.calls[:1] if self.shape.single_tool_call else self.calls
        tool_calls = []
        for k, call in enumerate(calls):
            converted = _openai_tool_call(call, k)
            del converted["index"]  # non-stream tool calls carry no index in OpenAI's shape
            tool_calls.append(converted)
        content = "".join(self.content)
        message: dict = {"role": "assistant", "content": content if content or not tool_calls else None}
        if self.thinking:
            message["reasoning_content"] = "".join(self.thinking)
        if tool_calls:
            message["tool_calls"] = tool_calls
        message["refusal"] = None
        return {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": now(),
            "model": self.shape.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": {"content": self.logprobs} if self.logprobs else None,
                    "finish_reason": finish_reason(self.last.get("done_reason"), bool(tool_calls)),
                }
            ],
            "usage": usage(self.last),
            "system_fingerprint": None,
        }
