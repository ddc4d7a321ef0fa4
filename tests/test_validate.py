"""The request checker on its own: pure, no server. Paths, wording and null semantics."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import validate
from proxy.adapt import adapt_request
from proxy.cache import cache_key, deterministic, embedding_keys
from proxy.config import ModelConfig
from proxy.errors import InvalidRequest, ProxyError
from proxy.resolve import requirements
from proxy.translate import ollama_chat, ollama_text, passthrough
from proxy.validate import checker, schemas

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": "chat", "messages": MSG, **fields}


def problem(check, body: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check(body)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    assert info.value.code is None
    return info.value


# --- the examples -----------------------------------------------------------------------


def test_options_as_a_string():
    error = problem(validate.chat, chat(options="x"))
    assert error.param == "options"
    assert error.message == "Invalid type for 'options': expected an object, but got a string."


def test_mixed_embedding_input():
    error = problem(validate.embeddings, {"model": "embed", "input": [1, "a"]})
    assert error.param == "input[1]"
    assert error.message == "Invalid type for 'input[1]': expected an integer, but got a string."


# --- nested paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,param,got",
    [
        ({"tool_choice": {"type": "function", "function": "f"}}, "tool_choice.function", "a string"),
        ({"tool_choice": {"type": "function", "function": {"name": 3}}}, "tool_choice.function.name",
         "an integer"),
        ({"options": {"num_ctx": "8k"}}, "options.num_ctx", "a string"),
        ({"options": {"num_ctx": 8192.5}}, "options.num_ctx", "a decimal number"),
        ({"options": {"temperature": True}}, "options.temperature", "a boolean"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "a string"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
         "tools[0].function.parameters", "an array"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
         "response_format.json_schema.schema", "a string"),
        ({"metadata": {"k": 1}}, "metadata.k", "an integer"),
        ({"logit_bias": {"50256": "-100"}}, "logit_bias.50256", "a string"),
        ({"keep_alive": []}, "keep_alive", "an array"),
        ({"max_tokens": 10.0}, "max_tokens", "a decimal number"),
        ({"stop": ["a", 1]}, "stop[1]", "an integer"),
    ],
)  # fmt: skip
def test_nested_type_errors_name_the_path(fields, param, got):
    error = problem(validate.chat, chat(**fields))
    assert error.param == param
    assert error.message.startswith(f"Invalid type for '{param}': expected ")
    assert error.message.endswith(f"but got {got}.")


def test_content_part_path():
    image = {"type": "image_url", "image_url": ["data:image/png;base64,AAAA"]}
    messages = [*MSG, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [image]}]
    error = problem(validate.chat, chat(messages=messages))
    assert error.param == "messages[2].content[0].image_url"


@pytest.mark.parametrize(
    "message,param",
    [
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text"),
        ({"role": "user", "content": [{"text": "x"}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": ["x"]}, "messages[0].content[0]"),
        ({"role": "user", "content": []}, "messages[0].content"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]},
         "messages[0].content[0].image_url.url"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]},
         "messages[0].content[0].input_audio.format"),
        ({"role": "assistant", "content": [{"type": "refusal", "refusal": None}]}, "messages[0].content[0].refusal"),
        ({"role": "user", "content": [{"type": "file", "file": "abc"}]}, "messages[0].content[0].file"),
        ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"role": "assistant", "tool_calls": [{"id": "c"}]}, "messages[0].tool_calls[0].function"),
        ({"role": "assistant", "tool_calls": {"id": "c"}}, "messages[0].tool_calls"),
        ({"role": "tool", "content": "r"}, "messages[0].tool_call_id"),
        ({"role": "tool", "content": "r", "tool_call_id": 7}, "messages[0].tool_call_id"),
        ({"role": "user", "content": "x", "name": ["n"]}, "messages[0].name"),
        ({"role": "robot", "content": "x"}, "messages[0].role"),
        ({"role": 1, "content": "x"}, "messages[0].role"),
        ({"content": "x"}, "messages[0].role"),
        ("hello", "messages[0]"),
    ],
)  # fmt: skip
def test_message_paths(message, param):
    assert problem(validate.chat, chat(messages=[message])).param == param


def test_unknown_content_part_types_pass_for_the_adapter_to_decide():
    validate.chat(chat(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]))


def test_legacy_string_image_url_passes():
    validate.chat(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "data:;base64,AA"}]}]))


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "c", "prompt": {"text": "x"}}, "prompt"),
        ({"model": "c", "prompt": ["a", 1]}, "prompt[1]"),
        ({"model": "c", "prompt": [[1, 2], [3, "x"]]}, "prompt[1][1]"),
        ({"model": "c", "prompt": [None]}, "prompt[0]"),
        ({"model": "c", "prompt": "x", "suffix": 1}, "suffix"),
        ({"model": "c", "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": "c", "prompt": "x", "echo": "no"}, "echo"),
        ({"model": "c", "prompt": "x", "raw": "yes"}, "raw"),
        ({"model": "c", "prompt": "x", "system": {}}, "system"),
        ({"model": "c", "prompt": "x", "best_of": 0}, "best_of"),
        ({"model": "c", "prompt": "x", "options": {"num_predict": "10"}}, "options.num_predict"),
    ],
)
def test_completion_paths(body, param):
    assert problem(validate.completion, body).param == param


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "e", "input": [["a"]]}, "input[0][0]"),
        ({"model": "e", "input": [[]]}, "input[0]"),
        ({"model": "e", "input": ["a", ""]}, "input[1]"),
        ({"model": "e", "input": [True]}, "input[0]"),
        ({"model": "e", "input": {"a": 1}}, "input"),
        ({"model": "e", "input": "x", "dimensions": "8"}, "dimensions"),
        ({"model": "e", "input": "x", "truncate": 1}, "truncate"),
        ({"model": "e", "input": "x", "options": {"num_ctx": []}}, "options.num_ctx"),
        ({"model": "e", "input": "x", "user": 1}, "user"),
    ],
)
def test_embedding_paths(body, param):
    assert problem(validate.embeddings, body).param == param


@pytest.mark.parametrize(
    "inputs",
    ["x", ["a", "b"], [1, 2, 3], [[1, 2], [3]]],
)
def test_embedding_input_shapes_that_pass(inputs):
    validate.embeddings({"model": "e", "input": inputs})


# --- null semantics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    ["temperature", "top_p", "max_tokens", "seed", "stop", "tools", "tool_choice", "response_format",
     "stream_options", "options", "keep_alive", "think", "user", "metadata", "logit_bias", "logprobs",
     "top_logprobs", "reasoning_effort", "parallel_tool_calls", "n", "stream"],
)  # fmt: skip
def test_null_optional_fields_mean_absent(field):
    validate.chat(chat(**{field: None}))


def test_null_nested_optional_fields_mean_absent():
    validate.chat(chat(
        options={"num_ctx": None},
        stream=True,
        stream_options={"include_usage": None},
        tools=[{"type": "function", "function": {"name": "f", "parameters": None, "description": None}}],
        messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
                  {"role": "tool", "tool_call_id": "c", "content": "r", "name": None}],
    ))  # fmt: skip


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": None, "messages": MSG}, "model"),
        ({"model": "chat", "messages": None}, "messages"),
        ({"model": "chat", "messages": [None]}, "messages[0]"),
        ({"model": "chat", "messages": [{"role": None, "content": "x"}]}, "messages[0].role"),
        ({"model": "chat", "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"model": "chat", "messages": [{"role": "user", "content": [None]}]}, "messages[0].content[0]"),
        ({"model": "chat", "messages": MSG, "tools": [{"type": "function", "function": {"name": None}}]},
         "tools[0].function.name"),
        ({"model": "chat", "messages": MSG, "tools": [None]}, "tools[0]"),
        ({"model": "chat", "messages": MSG, "stop": ["a", None]}, "stop[1]"),
        ({"model": "chat", "messages": MSG, "tool_choice": {"function": {"name": None}}},
         "tool_choice.function.name"),
    ],
)  # fmt: skip
def test_null_required_fields_are_refused(body, param):
    error = problem(validate.chat, body)
    assert error.param == param
    assert "null" in error.message or error.message.startswith("Missing required parameter")


def test_null_required_fields_on_the_other_endpoints():
    assert problem(validate.completion, {"model": "c", "prompt": None}).param == "prompt"
    assert problem(validate.embeddings, {"model": "e", "input": None}).param == "input"
    assert problem(validate.embeddings, {"model": None, "input": "x"}).param == "model"


def test_assistant_content_may_be_null_user_content_may_not():
    validate.chat(chat(messages=[*MSG, {"role": "assistant", "content": None}]))
    assert problem(validate.chat, chat(messages=[{"role": "user"}])).message == (
        "Missing required parameter: 'messages[0].content'."
    )


# --- what passes, and ranges --------------------------------------------------------------------


def test_unknown_fields_pass_at_top_level_and_inside_options():
    validate.chat(chat(guided_json={"type": "object"}, options={"some_new_option": [1, "x"]}))
    validate.completion({"model": "c", "prompt": "x", "future": 1})
    validate.embeddings({"model": "e", "input": "x", "future": 1})


def test_a_full_chat_body_passes():
    validate.chat({
        "model": "chat", "stream": True, "stream_options": {"include_usage": True},
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "data:;base64,AA", "detail": "low"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}},
        "temperature": 0, "top_p": 1, "max_completion_tokens": 10, "seed": 1, "stop": "x",
        "logprobs": True, "top_logprobs": 2, "logit_bias": {"1": -1}, "user": "u", "metadata": {"k": "v"},
        "reasoning_effort": "low", "options": {"num_ctx": 8192, "stop": ["y"]}, "keep_alive": "5m",
        "think": "high", "top_k": 40, "min_p": 0.1, "typical_p": 1, "repeat_penalty": 1.1,
        "repetition_penalty": 1.1, "task_type": "general_chat",
    })  # fmt: skip


@pytest.mark.parametrize(
    "fields,param,message",
    [
        ({"temperature": 2.5}, "temperature", "Invalid 'temperature': 2.5 is not between 0 and 2."),
        ({"max_tokens": 0}, "max_tokens", "Invalid 'max_tokens': must be at least 1."),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs", "Invalid 'top_logprobs': 30 is not between 0 and 20."),
        ({"top_logprobs": 2}, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true."),
        ({"stream_options": {"include_usage": True}}, "stream_options",
         "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
        ({"model": ""}, "model", "Invalid 'model': the string must not be empty."),
        ({"tool_choice": "sometimes"}, "tool_choice",
         "Invalid value for 'tool_choice': expected one of none, auto, required, but got 'sometimes'."),
        ({"response_format": {"type": "xml"}}, "response_format.type",
         "Invalid value for 'response_format.type': expected one of text, json_object, json_schema, but got 'xml'."),
    ],
)  # fmt: skip
def test_values_and_ranges(fields, param, message):
    error = problem(validate.chat, chat(**fields))
    assert (error.param, error.message) == (param, message)


def test_booleans_are_not_numbers():
    assert problem(validate.chat, chat(temperature=True)).param == "temperature"
    assert problem(validate.chat, chat(seed=False)).param == "seed"
    assert problem(validate.embeddings, {"model": "e", "input": [1, True]}).param == "input[1]"


# --- whatever passes the checker, the pure request path can handle ------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)


def valid_values(spec):
    """Values the spec allows, null for optional fields included: built from the schema on purpose,
    since the point here is what the translators do with anything validation lets through."""
    if isinstance(spec, checker.Anything):
        return _JSON
    if isinstance(spec, checker.Bool):
        return st.booleans()
    if isinstance(spec, checker.Str):
        if spec.choices:
            return st.sampled_from(sorted(spec.choices))
        return st.text(min_size=1 if spec.nonempty else 0, max_size=6)
    if isinstance(spec, checker.Int):
        return st.integers(-(2**40) if spec.low is None else spec.low, 2**40 if spec.high is None else spec.high)
    if isinstance(spec, checker.Num):
        low, high = (-1e6 if spec.low is None else spec.low), (1e6 if spec.high is None else spec.high)
        return st.integers(int(low), int(high)) | st.floats(low, high)
    if isinstance(spec, checker.Arr):
        return st.lists(valid_values(spec.item), min_size=spec.min_len, max_size=2)
    if isinstance(spec, checker.Map):
        return st.dictionaries(st.text(max_size=3), valid_values(spec.value), max_size=2)
    if isinstance(spec, checker.Tagged):
        variants = [_object(variant, extra={spec.tag: st.just(tag)}) for tag, variant in sorted(spec.variants.items())]
        if not spec.closed:
            variants.append(st.fixed_dictionaries({spec.tag: st.just("video_url"), "video_url": _JSON}))
        return st.one_of(variants)
    if isinstance(spec, checker.Obj):
        return _object(spec)
    if isinstance(spec, checker.OneOf):
        return st.one_of([valid_values(option) for option in spec.options])
    if isinstance(spec, checker.ArrayByFirst):
        return st.one_of(
            [st.lists(valid_values(s.item), min_size=max(1, spec.min_len), max_size=2) for s in spec.shapes]
        )
    raise AssertionError(f"no strategy for {spec!r}")


def _object(spec: checker.Obj, extra: dict | None = None):
    required = {k: valid_values(spec.fields[k]) if k in spec.fields else _JSON for k in spec.required}
    optional = {
        k: st.none() | valid_values(v) for k, v in spec.fields.items() if k not in spec.required and k != "task_type"
    }
    return st.fixed_dictionaries({**required, **(extra or {})}, optional=optional)


_ADAPTING = ModelConfig(name="m", target="t", supports_system_role=False, alternating_roles=True, system_prompt="s")
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _only_proxy_errors(call, *args):
    try:
        return call(*args)
    except ProxyError:
        return None


@_FUZZ
@given(body=valid_values(schemas.CHAT))
def test_any_valid_chat_body_translates_without_crashing(body):
    # the two rules across fields, which a per-field schema cannot express
    if body.get("stream_options") is not None:
        body["stream"] = True
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    validate.chat(body)
    requirements("chat", body)
    deterministic(body)
    cache_key("chat", "t", body)
    passthrough.request_body(body, "t")
    adapted = adapt_request(body, _ADAPTING)
    for candidate in (body, adapted):
        native = _only_proxy_errors(ollama_chat.chat_request, candidate, "t")
        if native is not None:
            orjson.dumps(native[0])


@_FUZZ
@given(body=valid_values(schemas.COMPLETION))
def test_any_valid_completion_body_translates_without_crashing(body):
    if body.get("stream_options") is not None:
        body["stream"] = True
    validate.completion(body)
    deterministic(body)
    cache_key("completion", "t", body)
    passthrough.request_body(body, "t")
    native = _only_proxy_errors(ollama_text.completion_request, adapt_request(body, _ADAPTING), "t")
    if native is not None:
        orjson.dumps(native[0])


@_FUZZ
@given(body=valid_values(schemas.EMBEDDINGS))
def test_any_valid_embeddings_body_translates_without_crashing(body):
    validate.embeddings(body)
    embedding_keys("t", body)
    passthrough.request_body(body, "t")
    native = _only_proxy_errors(ollama_text.embed_request, body, "t")
    if native is not None:
        orjson.dumps(native)


def _nested(depth: int):
    value: list | dict = []
    for i in range(depth - 1):
        value = {"a": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"p": _nested(300)}}}]},
         "tools[0].function.parameters.p"),
        ({"guided_json": _nested(300)}, "guided_json"),
        ({"options": {"some_new_option": _nested(300)}}, "options.some_new_option"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"x": _nested(300)}}}},
         "response_format.json_schema.schema.x"),
    ],
)  # fmt: skip
def test_free_form_parts_nested_too_deep_to_encode_are_refused(fields, param):
    # orjson parses up to 1024 levels but encodes only 254, and every body is encoded again
    body = chat(**fields)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(body)
    error = problem(validate.chat, body)
    assert (error.param, error.message) == (param, f"Invalid '{param}': nested more than 64 levels deep.")


def test_free_form_parts_of_reasonable_depth_pass():
    validate.chat(
        chat(
            guided_json=_nested(60),
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}},
                    },
                }
            ],
        )
    )
