"""Checks on OpenAI request bodies, common to every backend.

Each check raises :class:`InvalidRequest` naming the offending ``param`` the way
OpenAI does (``messages[2].role``), so a bad request fails the same way whichever
backend would have served it. Whether a backend can honour a valid field is the
adapter's business, not this module's.
"""

from __future__ import annotations

from .errors import InvalidRequest

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _fail(param: str, message: str) -> None:
    raise InvalidRequest(message, param=param)


def _type(body: dict, key: str, kinds: tuple[type, ...], what: str, optional: bool = True) -> None:
    value = body.get(key)
    if value is None:
        if not optional:
            _fail(key, f"Missing required parameter: '{key}'.")
        return
    # bool is an int subclass in Python but not a number in JSON terms
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        _fail(key, f"Invalid type for '{key}': expected {what}, but got {_json_type(value)}.")


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _range(body: dict, key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is not None and not (low <= value <= high):
        _fail(key, f"Invalid '{key}': {value} is not between {low:g} and {high:g}.")


def _sampling(body: dict) -> None:
    _type(body, "model", (str,), "a string", optional=False)
    if not body["model"]:
        _fail("model", "'model' must not be empty.")
    _type(body, "stream", (bool,), "a boolean")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _type(body, key, (int, float), "a number")
    _range(body, "temperature", 0, 2)
    _range(body, "top_p", 0, 1)
    _range(body, "presence_penalty", -2, 2)
    _range(body, "frequency_penalty", -2, 2)
    for key in ("max_tokens", "max_completion_tokens", "n", "seed"):
        _type(body, key, (int,), "an integer")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if body.get(key) is not None and body[key] < 1:
            _fail(key, f"Invalid '{key}': must be at least 1.")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            _fail("stop", "Invalid type for 'stop': expected a string or an array of strings.")
    _type(body, "stream_options", (dict,), "an object")
    if body.get("stream_options") is not None and not body.get("stream"):
        _fail("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")


def _content(content, path: str, role: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        _fail(path, f"Invalid type for '{path}': expected a string or an array of content parts.")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            _fail(f"{path}[{j}]", f"Invalid content part at '{path}[{j}]': expected an object with a 'type'.")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            _fail(f"{path}[{j}].text", f"Missing required parameter: '{path}[{j}].text'.")


def chat(body: dict) -> None:
    _sampling(body)
    messages = body.get("messages")
    if messages is None:
        _fail("messages", "Missing required parameter: 'messages'.")
    if not isinstance(messages, list):
        _fail("messages", f"Invalid type for 'messages': expected an array, but got {_json_type(messages)}.")
    if not messages:
        _fail("messages", "Invalid 'messages': empty array. Expected an array with minimum length 1.")
    for i, msg in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(msg, dict):
            _fail(path, f"Invalid type for '{path}': expected an object, but got {_json_type(msg)}.")
        role = msg.get("role")
        if role not in _ROLES:
            _fail(f"{path}.role", f"Invalid value for '{path}.role': expected one of {', '.join(_ROLES)}.")
        _content(msg.get("content"), f"{path}.content", role)
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            _fail(f"{path}.tool_call_id", f"Missing required parameter: '{path}.tool_call_id'.")
        calls = msg.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                _fail(f"{path}.tool_calls", f"Invalid '{path}.tool_calls': only assistant messages carry an array.")
            for k, call in enumerate(calls):
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                    _fail(f"{path}.tool_calls[{k}]", "Invalid tool call: expected an object with a 'function'.")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            _fail("tools", "Invalid type for 'tools': expected an array.")
        for k, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                _fail(f"tools[{k}].function.name", f"Missing required parameter: 'tools[{k}].function.name'.")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required"):
        if not isinstance(choice, dict) or not isinstance((choice.get("function") or {}).get("name"), str):
            _fail("tool_choice", "Invalid 'tool_choice': expected none, auto, required or a named function.")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in (
            "text", "json_object", "json_schema",
        ):  # fmt: skip
            _fail("response_format.type", "Invalid 'response_format.type': expected text, json_object or json_schema.")
    _type(body, "logprobs", (bool,), "a boolean")
    _type(body, "top_logprobs", (int,), "an integer")
    _range(body, "top_logprobs", 0, 20)
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        _fail("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")


def completion(body: dict) -> None:
    _sampling(body)
    prompt = body.get("prompt")
    if prompt is None:
        _fail("prompt", "Missing required parameter: 'prompt'.")
    if not isinstance(prompt, (str, list)):
        _fail("prompt", f"Invalid type for 'prompt': expected a string or an array, but got {_json_type(prompt)}.")
    _type(body, "logprobs", (int,), "an integer")
    _range(body, "logprobs", 0, 20)
    _type(body, "suffix", (str,), "a string")


def embeddings(body: dict) -> None:
    _type(body, "model", (str,), "a string", optional=False)
    inputs = body.get("input")
    if inputs is None:
        _fail("input", "Missing required parameter: 'input'.")
    if isinstance(inputs, str):
        if not inputs:
            _fail("input", "Invalid 'input': the string must not be empty.")
    elif isinstance(inputs, list):
        if not inputs:
            _fail("input", "Invalid 'input': empty array. Expected at least one item.")
        if any(isinstance(x, str) and not x for x in inputs):
            _fail("input", "Invalid 'input': strings in the array must not be empty.")
        if not all(isinstance(x, (str, int, list)) and not isinstance(x, bool) for x in inputs):
            _fail("input", "Invalid type for 'input': expected strings, or arrays of token ids.")
    else:
        _fail("input", f"Invalid type for 'input': expected a string or an array, but got {_json_type(inputs)}.")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        _fail("encoding_format", f"Invalid value for 'encoding_format' = {fmt!r}. Supported values: float, base64.")
    _type(body, "dimensions", (int,), "an integer")
    if body.get("dimensions") is not None and body["dimensions"] < 1:
        _fail("dimensions", "Invalid 'dimensions': must be at least 1.")
