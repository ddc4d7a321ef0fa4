"""Anthropic Messages requests -> OpenAI chat-completions requests. Pure: no I/O.

The Anthropic ingress checks a ``POST /v1/messages`` body here and turns it into
the OpenAI body the rest of the proxy already knows (validation, resolution,
cache keys, routing, the backend translators). Errors name the offending field
the way Anthropic's API does (``messages.2.content.0.text: ...``) and carry the
OpenAI-style ``param`` (``messages[2].content[0].text``) for the history.

Rule, as on the OpenAI side: a field is honoured or refused with a 400, except
hints that change nothing in the answer (``cache_control``, ``service_tier`` and
the like, see ``_IGNORED``), which are accepted and unused. See docs/translation.md.
"""

from __future__ import annotations

import math

import orjson

from ..errors import InvalidRequest, UnsupportedParameter

# Accepted and unused: prompt-caching hints and platform bookkeeping that do not change the answer.
_IGNORED = frozenset({
    "cache_control", "service_tier", "inference_geo", "speed", "diagnostics", "user_profile_id", "workspace_id",
})  # fmt: skip
_KNOWN = frozenset({
    "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k",
    "stream", "metadata", "tools", "tool_choice", "thinking", "output_config",
}) | _IGNORED  # fmt: skip
# Fields of Anthropic's platform with no equivalent on a self-hosted backend: refused by name.
_REFUSED = {
    "container": "code-execution containers",
    "mcp_servers": "remote MCP servers",
    "context_management": "context management",
}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

# thinking.budget_tokens -> reasoning_effort: below 4k is a light think, 16k and up a long one.
_EFFORT_STEPS = ((4096, "low"), (16384, "medium"))

# count_tokens: an image counts as this many tokens (Anthropic's own figure for a ~1 megapixel image
# is about 1,300; the exact number depends on the image, which a fast estimate does not decode).
IMAGE_TOKENS = 1300


def _path(parts: tuple) -> tuple[str, str]:
    """(Anthropic's dotted path, OpenAI's bracketed param) for one location in the body."""
    dotted = ".".join(str(p) for p in parts)
    param = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))
    return dotted, param


def _fail(parts: tuple, message: str, unsupported: bool = False) -> None:
    dotted, param = _path(parts)
    cls = UnsupportedParameter if unsupported else InvalidRequest
    raise cls(f"{dotted}: {message}", param=param)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _expect(value, kinds: tuple[type, ...], what: str, parts: tuple) -> None:
    # bool is an int subclass in Python but not a number in JSON terms
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        _fail(parts, f"Input should be {what}, got {_kind(value)}")


def _optional(body: dict, key: str, kinds: tuple[type, ...], what: str) -> object:
    value = body.get(key)
    if value is not None:
        _expect(value, kinds, what, (key,))
    return value


def _number_between(body: dict, key: str, low: float, high: float) -> None:
    value = _optional(body, key, (int, float), "a number")
    if value is not None and not low <= value <= high:
        _fail((key,), f"Input should be between {low:g} and {high:g}, got {value}")


# --- content blocks -----------------------------------------------------------------------------


def _text(block: dict, parts: tuple) -> str:
    text = block.get("text")
    _expect(text, (str,), "a string", (*parts, "text"))
    return text


def _image(block: dict, parts: tuple) -> dict:
    source = block.get("source")
    _expect(source, (dict,), "an object", (*parts, "source"))
    kind = source.get("type")
    if kind == "base64":
        media = source.get("media_type")
        if media not in _IMAGE_TYPES:
            _fail((*parts, "source", "media_type"), f"Input should be one of {', '.join(_IMAGE_TYPES)}")
        data = source.get("data")
        _expect(data, (str,), "a string", (*parts, "source", "data"))
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = source.get("url")
        _expect(url, (str,), "a string", (*parts, "source", "url"))
    else:
        _fail((*parts, "source", "type"), "Input should be 'base64' or 'url' (file sources are not supported)",
              unsupported=kind == "file")  # fmt: skip
    return {"type": "image_url", "image_url": {"url": url}}


def _blocks(content, parts: tuple, allow_empty: bool = True) -> list[dict]:
    """``content`` as a list of blocks (a string is shorthand for one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _expect(content, (list,), "a string or an array of content blocks", parts)
    if not content and not allow_empty:
        _fail(parts, "List should have at least 1 item")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            _fail((*parts, j), "Input should be an object with a 'type'")
    return content


def _tool_result_text(block: dict, parts: tuple) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for j, inner in enumerate(_blocks(content, (*parts, "content"))):
            if inner["type"] != "text":
                _fail((*parts, "content", j, "type"),
                      f"'{inner['type']}' blocks inside tool_result are not supported (only text)",
                      unsupported=True)  # fmt: skip
            texts.append(_text(inner, (*parts, "content", j)))
        text = "\n".join(texts)
    is_error = block.get("is_error")
    if is_error is not None:
        _expect(is_error, (bool,), "a boolean", (*parts, "is_error"))
    # OpenAI tool messages have no error flag; the model reads it from the text.
    return f"Error: {text}" if is_error else text


def _content(parts_out: list[dict]) -> str | list[dict] | None:
    """OpenAI ``content``: a lone text stays a string (as most OpenAI clients send it), else parts."""
    if not parts_out:
        return None
    if len(parts_out) == 1 and parts_out[0]["type"] == "text":
        return parts_out[0]["text"]
    return parts_out


def _user(content, parts: tuple) -> list[dict]:
    tools: list[dict] = []
    out: list[dict] = []
    for j, block in enumerate(_blocks(content, parts, allow_empty=False)):
        kind, where = block["type"], (*parts, j)
        if kind == "text":
            text = _text(block, where)
            if text:  # an empty text block carries nothing (and would be refused by some templates)
                out.append({"type": "text", "text": text})
        elif kind == "image":
            out.append(_image(block, where))
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            _expect(call_id, (str,), "a string", (*where, "tool_use_id"))
            tools.append({"role": "tool", "tool_call_id": call_id, "content": _tool_result_text(block, where)})
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            _fail((*where, "type"), f"'{kind}' blocks belong in assistant messages")
        else:
            _fail((*where, "type"), f"'{kind}' blocks are not supported (text, image, tool_result)",
                  unsupported=True)  # fmt: skip
    # Tool results answer the previous assistant turn, so they come first whatever the block order.
    messages = tools
    if out or not tools:
        messages.append({"role": "user", "content": _content(out) if out else ""})
    return messages


def _assistant(content, parts: tuple) -> dict:
    texts: list[dict] = []
    calls: list[dict] = []
    for j, block in enumerate(_blocks(content, parts)):
        kind, where = block["type"], (*parts, j)
        if kind == "text":
            text = _text(block, where)
            if text:
                texts.append({"type": "text", "text": text})
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            _expect(call_id, (str,), "a string", (*where, "id"))
            _expect(name, (str,), "a string", (*where, "name"))
            _expect(arguments, (dict,), "an object", (*where, "input"))
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}})  # fmt: skip
        elif kind in ("thinking", "redacted_thinking"):
            # Earlier turns' reasoning is not part of the model's context (Anthropic strips it too).
            continue
        elif kind in ("image", "tool_result"):
            _fail((*where, "type"), f"'{kind}' blocks belong in user messages")
        else:
            _fail((*where, "type"), f"'{kind}' blocks are not supported (text, tool_use, thinking)",
                  unsupported=True)  # fmt: skip
    message: dict = {"role": "assistant", "content": _content(texts)}
    if message["content"] is None and not calls:
        message["content"] = ""
    if calls:
        message["tool_calls"] = calls
    return message


def _system(system) -> str | None:
    if isinstance(system, str):
        return system or None
    _expect(system, (list,), "a string or an array of text blocks", ("system",))
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            _fail(("system", j, "type"), "Input should be 'text'")
        texts.append(_text(block, ("system", j)))
    return "\n".join(t for t in texts if t) or None


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        _fail(("messages",), "Field required")
    _expect(messages, (list,), "an array", ("messages",))
    if not messages:
        _fail(("messages",), "List should have at least 1 item")
    out: list[dict] = []
    for i, msg in enumerate(messages):
        _expect(msg, (dict,), "an object", ("messages", i))
        role = msg.get("role")
        if role not in ("user", "assistant"):
            _fail(("messages", i, "role"), "Input should be 'user' or 'assistant'")
        if "content" not in msg:
            _fail(("messages", i, "content"), "Field required")
        if role == "user":
            out.extend(_user(msg["content"], ("messages", i, "content")))
        else:
            out.append(_assistant(msg["content"], ("messages", i, "content")))
    return out


# --- tools, thinking and the rest ---------------------------------------------------------------


def _tools(body: dict) -> list[dict] | None:
    tools = _optional(body, "tools", (list,), "an array")
    if not tools:
        return None
    out = []
    for k, tool in enumerate(tools):
        _expect(tool, (dict,), "an object", ("tools", k))
        kind = tool.get("type")
        if kind not in (None, "custom"):
            _fail(("tools", k, "type"), f"server tool {kind!r} is not available here; only custom tools are",
                  unsupported=True)  # fmt: skip
        name = tool.get("name")
        _expect(name, (str,), "a string", ("tools", k, "name"))
        if not name:
            _fail(("tools", k, "name"), "String should have at least 1 character")
        schema = tool.get("input_schema")
        _expect(schema, (dict,), "an object", ("tools", k, "input_schema"))
        function: dict = {"name": name, "parameters": schema}
        description = tool.get("description")
        if description is not None:
            _expect(description, (str,), "a string", ("tools", k, "description"))
            function["description"] = description
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(body: dict, tools: list[dict] | None, openai: dict) -> None:
    choice = _optional(body, "tool_choice", (dict,), "an object")
    if choice is None:
        return
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        _fail(("tool_choice", "type"), "Input should be 'auto', 'any', 'tool' or 'none'")
    if kind in ("any", "tool") and not tools:
        _fail(("tool_choice",), f"tool_choice '{kind}' needs tools")
    if kind == "tool":
        name = choice.get("name")
        _expect(name, (str,), "a string", ("tool_choice", "name"))
        if not any(t["function"]["name"] == name for t in tools or ()):
            _fail(("tool_choice", "name"), f"no tool named {name!r} in tools")
        openai["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif tools:
        openai["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None:
        _expect(disable, (bool,), "a boolean", ("tool_choice", "disable_parallel_tool_use"))
        if disable and tools:
            openai["parallel_tool_calls"] = False


def reasoning_effort(budget: int) -> str:
    for limit, effort in _EFFORT_STEPS:
        if budget < limit:
            return effort
    return "high"


def _thinking(body: dict, max_tokens: int | None) -> str | None:
    """The OpenAI ``reasoning_effort`` for ``thinking``; None leaves the model's default."""
    thinking = _optional(body, "thinking", (dict,), "an object")
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind == "disabled":
        return "none"
    if thinking.get("display") == "omitted":
        _fail(("thinking", "display"), "'omitted' is not supported: the reasoning is returned as the model wrote it",
              unsupported=True)  # fmt: skip
    if kind in ("adaptive", "between_tools"):
        return None  # the model decides when and how long to think: its default
    if kind != "enabled":
        _fail(("thinking", "type"), "Input should be 'enabled', 'disabled', 'adaptive' or 'between_tools'")
    budget = thinking.get("budget_tokens")
    _expect(budget, (int,), "an integer", ("thinking", "budget_tokens"))
    if budget < 1024:
        _fail(("thinking", "budget_tokens"), "Input should be greater than or equal to 1024")
    if max_tokens is not None and budget >= max_tokens:
        _fail(("max_tokens",), f"max_tokens must be greater than thinking.budget_tokens ({budget})")
    return reasoning_effort(budget)


_EFFORTS = ("low", "medium", "high", "xhigh", "max")


def _output_config(body: dict, openai: dict) -> None:
    """``output_config``: ``effort`` -> ``reasoning_effort``, ``format`` -> a JSON-schema ``response_format``."""
    config = _optional(body, "output_config", (dict,), "an object")
    if not config:
        return
    effort = config.get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            _fail(("output_config", "effort"), f"Input should be one of {', '.join(_EFFORTS)}")
        if openai.get("reasoning_effort") != "none":  # thinking: disabled still means no reasoning
            openai["reasoning_effort"] = effort
    fmt = config.get("format")
    if fmt is not None:
        _expect(fmt, (dict,), "an object", ("output_config", "format"))
        if fmt.get("type") != "json_schema":
            _fail(("output_config", "format", "type"), "Input should be 'json_schema'")
        schema = fmt.get("schema")
        _expect(schema, (dict,), "an object", ("output_config", "format", "schema"))
        openai["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def _check_fields(body: dict) -> None:
    for key in body:
        if key in _KNOWN:
            continue
        what = _REFUSED.get(key)
        if what is not None:
            _fail((key,), f"{what} are not available through this proxy", unsupported=True)
        _fail((key,), "Extra inputs are not permitted", unsupported=True)


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        _fail(("model",), "Field required")
    _expect(model, (str,), "a string", ("model",))
    if not model:
        _fail(("model",), "String should have at least 1 character")
    return model


def _prompt(body: dict, max_tokens: int | None) -> dict:
    """The parts of the OpenAI body that ``count_tokens`` also reads: model, messages, tools, thinking."""
    openai: dict = {"model": _model(body)}
    messages = _messages(body)
    system = _system(body["system"]) if body.get("system") is not None else None
    openai["messages"] = [{"role": "system", "content": system}, *messages] if system else messages
    tools = _tools(body)
    if tools:
        openai["tools"] = tools
    _tool_choice(body, tools, openai)
    effort = _thinking(body, max_tokens)
    if effort is not None:
        openai["reasoning_effort"] = effort
    _output_config(body, openai)
    return openai


def to_openai(body: dict) -> dict:
    """Check an Anthropic ``/v1/messages`` body and translate it to an OpenAI chat-completions body."""
    _check_fields(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        _fail(("max_tokens",), "Field required")
    _expect(max_tokens, (int,), "an integer", ("max_tokens",))
    if max_tokens < 1:
        _fail(("max_tokens",), "Input should be greater than or equal to 1")
    openai = _prompt(body, max_tokens)
    openai["max_tokens"] = max_tokens
    stops = _optional(body, "stop_sequences", (list,), "an array")
    if stops:
        for k, stop in enumerate(stops):
            _expect(stop, (str,), "a string", ("stop_sequences", k))
        openai["stop"] = list(stops)
    _number_between(body, "temperature", 0, 1)
    _number_between(body, "top_p", 0, 1)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            openai[key] = body[key]
    top_k = _optional(body, "top_k", (int,), "an integer")
    if top_k is not None:
        if top_k < 0:
            _fail(("top_k",), "Input should be greater than or equal to 0")
        openai["top_k"] = top_k  # vLLM reads it as an extra field, the Ollama translator as options.top_k
    metadata = _optional(body, "metadata", (dict,), "an object")
    if metadata and metadata.get("user_id") is not None:
        _expect(metadata["user_id"], (str,), "a string", ("metadata", "user_id"))
        openai["user"] = metadata["user_id"]
    if _optional(body, "stream", (bool,), "a boolean"):
        openai["stream"] = True
        # message_delta must carry the token counts, which OpenAI streams send only when asked.
        openai["stream_options"] = {"include_usage": True}
    return openai


# --- count_tokens -------------------------------------------------------------------------------


def count_request(body: dict) -> dict:
    """Check a ``/v1/messages/count_tokens`` body; the OpenAI body whose prompt is to be counted.

    Clients often send the very body they are about to post to ``/v1/messages``, so the
    generation fields (``max_tokens``, sampling, ``stream``) are accepted; they do not
    change the prompt's size.
    """
    _check_fields(body)
    return _prompt(body, None)


def estimate_tokens(openai: dict) -> int:
    """A fast estimate of the prompt's tokens: characters / 4, and a fixed figure per image.

    Four characters per token is the usual rule of thumb for English with BPE vocabularies;
    it is an estimate, and the answer says so in ``X-Proxy-Token-Estimate``.
    """
    chars = 0
    images = 0
    for message in openai["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part["type"] == "text":
                    chars += len(part["text"])
                else:
                    images += 1
        for call in message.get("tool_calls") or ():
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    for tool in openai.get("tools") or ():
        chars += len(orjson.dumps(tool["function"]))
    return math.ceil(chars / 4) + images * IMAGE_TOKENS
