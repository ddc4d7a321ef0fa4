"""The Anthropic translation, pure: requests, whole replies and streams against JSON fixtures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import validate
from proxy.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    ProxyError,
    Unauthorized,
    UnsupportedParameter,
    anthropic_error_body,
    anthropic_error_event,
)
from proxy.translate import anthropic_reply, anthropic_request
from proxy.translate.replay import completion_to_frames

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
BASE = {"model": "chat", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def events(raw: bytes) -> list[list]:
    """[event name, data] pairs of an Anthropic SSE byte stream, checking the framing on the way."""
    assert raw.endswith(b"\n\n") or raw == b""
    out = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: "), block
        payload = orjson.loads(data[6:])
        assert payload["type"] == name[7:].decode()  # the data's type always matches the event name
        out.append([name[7:].decode(), payload])
    return out


def translate(**change) -> dict:
    return anthropic_request.to_openai({**copy.deepcopy(BASE), **change})


# --- requests ---------------------------------------------------------------------------------


def test_request_maps_every_field():
    case = fixture("request_full.json")
    openai = anthropic_request.to_openai(case["anthropic"])
    assert openai == case["openai"]
    validate.chat(openai)  # what the rest of the chain checks: the translation always passes it


def test_minimal_request_is_what_an_openai_client_would_send():
    # The same body as the OpenAI SDK sends for one user message, so the two share cache entries.
    assert translate() == {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}


@pytest.mark.parametrize("budget,effort", [(1024, "low"), (4095, "low"), (4096, "medium"), (16383, "medium"),
                                           (16384, "high"), (60000, "high")])  # fmt: skip
def test_thinking_budget_to_reasoning_effort(budget, effort):
    assert (
        translate(max_tokens=64000, thinking={"type": "enabled", "budget_tokens": budget})["reasoning_effort"] == effort
    )


def test_output_config():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    openai = translate(output_config={"effort": "xhigh", "format": {"type": "json_schema", "schema": schema}})
    assert openai["reasoning_effort"] == "xhigh"
    assert openai["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    validate.chat(openai)
    # effort overrides a thinking budget's mapping, but not thinking turned off
    budget = {"type": "enabled", "budget_tokens": 2000}
    assert translate(max_tokens=4000, thinking=budget, output_config={"effort": "high"})["reasoning_effort"] == "high"
    off = translate(thinking={"type": "disabled"}, output_config={"effort": "high"})
    assert off["reasoning_effort"] == "none"


def test_thinking_disabled_and_adaptive():
    assert translate(thinking={"type": "disabled"})["reasoning_effort"] == "none"
    assert "reasoning_effort" not in translate(thinking={"type": "adaptive"})
    assert "reasoning_effort" not in translate()


TOOL = {"name": "f", "input_schema": {"type": "object"}}


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
])  # fmt: skip
def test_tool_choice(choice, expected):
    openai = translate(tools=[TOOL], tool_choice=choice)
    assert {k: openai[k] for k in expected} == expected


def test_tool_choice_auto_without_tools_is_dropped():
    assert "tool_choice" not in translate(tool_choice={"type": "auto"})


def test_tool_results_come_first_and_empty_text_is_skipped():
    messages = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "here you go"},
            {"type": "text", "text": ""},
            {"type": "tool_result", "tool_use_id": "t1"},
        ]},
    ]  # fmt: skip
    out = translate(messages=messages)["messages"]
    assert out == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {"role": "user", "content": "here you go"},
    ]  # fmt: skip


def test_assistant_with_only_thinking_becomes_empty_text():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]},
                {"role": "user", "content": "b"}]  # fmt: skip
    assert translate(messages=messages)["messages"][1] == {"role": "assistant", "content": ""}


def test_ignored_hints_do_not_reach_the_backend():
    openai = translate(cache_control={"type": "ephemeral"}, service_tier="auto", speed="fast", inference_geo="eu")
    assert openai == translate()


def msg(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("change,message,param,kind", [
    ({"model": 3}, "model: Input should be a string, got a number", "model", InvalidRequest),
    ({"model": ""}, "model: String should have at least 1 character", "model", InvalidRequest),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1", "max_tokens", InvalidRequest),
    ({"max_tokens": True}, "max_tokens: Input should be an integer, got a boolean", "max_tokens", InvalidRequest),
    ({"messages": []}, "messages: List should have at least 1 item", "messages", InvalidRequest),
    ({"messages": "hi"}, "messages: Input should be an array, got a string", "messages", InvalidRequest),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role: Input should be 'user' or 'assistant'",
     "messages[0].role", InvalidRequest),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required", "messages[0].content", InvalidRequest),
    (msg([]), "messages.0.content: List should have at least 1 item", "messages[0].content", InvalidRequest),
    (msg([{"type": "text"}]), "messages.0.content.0.text: Input should be a string, got null",
     "messages[0].content[0].text", InvalidRequest),
    (msg([{"text": "x"}]), "messages.0.content.0: Input should be an object with a 'type'",
     "messages[0].content[0]", InvalidRequest),
    (msg([{"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "x"}}]),
     "messages.0.content.0.source.media_type: Input should be one of image/jpeg", "messages[0].content[0].source.media_type",
     InvalidRequest),
    (msg([{"type": "image", "source": {"type": "file", "file_id": "f"}}]),
     "messages.0.content.0.source.type: Input should be 'base64' or 'url'", "messages[0].content[0].source.type",
     UnsupportedParameter),
    (msg([{"type": "document", "source": {}}]), "messages.0.content.0.type: 'document' blocks are not supported",
     "messages[0].content[0].type", UnsupportedParameter),
    (msg([{"type": "tool_use", "id": "a", "name": "f", "input": {}}]),
     "messages.0.content.0.type: 'tool_use' blocks belong in assistant messages", "messages[0].content[0].type",
     InvalidRequest),
    (msg([{"type": "tool_result", "tool_use_id": "a", "content": [{"type": "image", "source": {}}]}]),
     "messages.0.content.0.content.0.type: 'image' blocks inside tool_result are not supported",
     "messages[0].content[0].content[0].type", UnsupportedParameter),
    (msg([{"type": "tool_result"}]), "messages.0.content.0.tool_use_id: Input should be a string",
     "messages[0].content[0].tool_use_id", InvalidRequest),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": "x"}]}]},
     "messages.0.content.0.input: Input should be an object, got a string", "messages[0].content[0].input",
     InvalidRequest),
    ({"system": [{"type": "image"}]}, "system.0.type: Input should be 'text'", "system[0].type", InvalidRequest),
    ({"system": 5}, "system: Input should be a string or an array of text blocks", "system", InvalidRequest),
    ({"temperature": 1.5}, "temperature: Input should be between 0 and 1, got 1.5", "temperature", InvalidRequest),
    ({"top_p": "x"}, "top_p: Input should be a number, got a string", "top_p", InvalidRequest),
    ({"top_k": -1}, "top_k: Input should be greater than or equal to 0", "top_k", InvalidRequest),
    ({"stop_sequences": ["a", 1]}, "stop_sequences.1: Input should be a string", "stop_sequences[1]", InvalidRequest),
    ({"stream": "yes"}, "stream: Input should be a boolean, got a string", "stream", InvalidRequest),
    ({"metadata": {"user_id": 5}}, "metadata.user_id: Input should be a string", "metadata.user_id", InvalidRequest),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema: Input should be an object, got null",
     "tools[0].input_schema", InvalidRequest),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type: server tool",
     "tools[0].type", UnsupportedParameter),
    ({"tool_choice": {"type": "any"}}, "tool_choice: tool_choice 'any' needs tools", "tool_choice", InvalidRequest),
    ({"tool_choice": {"type": "maybe"}, "tools": [TOOL]}, "tool_choice.type: Input should be", "tool_choice.type",
     InvalidRequest),
    ({"tool_choice": {"type": "tool", "name": "g"}, "tools": [TOOL]}, "tool_choice.name: no tool named 'g'",
     "tool_choice.name", InvalidRequest),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens: Input should be an integer",
     "thinking.budget_tokens", InvalidRequest),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "max_tokens: max_tokens must be greater than",
     "max_tokens", InvalidRequest),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}, "max_tokens": 2000},
     "thinking.display: 'omitted' is not supported", "thinking.display", UnsupportedParameter),
    ({"container": "c1"}, "container: code-execution containers are not available", "container", UnsupportedParameter),
    ({"output_config": {"effort": "extreme"}}, "output_config.effort: Input should be one of low",
     "output_config.effort", InvalidRequest),
    ({"output_config": {"format": {"type": "regex"}}}, "output_config.format.type: Input should be 'json_schema'",
     "output_config.format.type", InvalidRequest),
    ({"frequency_penalty": 1}, "frequency_penalty: Extra inputs are not permitted", "frequency_penalty",
     UnsupportedParameter),
])  # fmt: skip
def test_bad_requests_name_the_field(change, message, param, kind):
    with pytest.raises(InvalidRequest) as info:
        translate(**change)
    assert info.value.message.startswith(message), info.value.message
    assert info.value.param == param
    assert type(info.value) is kind
    assert info.value.status == 400


def test_required_fields():
    for key in ("model", "max_tokens", "messages"):
        body = {k: v for k, v in BASE.items() if k != key}
        with pytest.raises(InvalidRequest, match=f"^{key}: Field required$"):
            anthropic_request.to_openai(body)


# --- count_tokens -----------------------------------------------------------------------------


def test_count_tokens_estimate():
    body = {"model": "chat", "system": "s" * 8, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "u" * 20},
                                     {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "ff", "input": {}}]},
    ]}  # fmt: skip
    openai = anthropic_request.count_request(body)
    # system 8 + text 20 + tool call name 2 + arguments "{}" 2 = 32 chars -> 8 tokens, plus one image
    assert anthropic_request.estimate_tokens(openai) == 8 + anthropic_request.IMAGE_TOKENS
    with_tools = anthropic_request.count_request({**body, "tools": [TOOL]})
    tool_chars = len(orjson.dumps({"name": "f", "parameters": {"type": "object"}}))
    assert anthropic_request.estimate_tokens(with_tools) == -(-(32 + tool_chars) // 4) + anthropic_request.IMAGE_TOKENS


def test_count_tokens_takes_the_create_body_but_refuses_unknown_fields():
    assert anthropic_request.estimate_tokens(anthropic_request.count_request({**BASE, "temperature": 0.5})) == 1
    with pytest.raises(UnsupportedParameter, match="colour: Extra inputs"):
        anthropic_request.count_request({**BASE, "colour": "blue"})


# --- whole replies ----------------------------------------------------------------------------


def test_reply_maps_every_field():
    case = fixture("reply_full.json")
    assert anthropic_reply.to_message(case["openai"]) == case["anthropic"]


@pytest.mark.parametrize("finish,matched,tools,expected", [
    ("stop", None, False, ("end_turn", None)),
    ("stop", "END", False, ("stop_sequence", "END")),
    ("stop", 128001, False, ("end_turn", None)),  # vLLM's token id for an EOS token
    ("length", None, True, ("max_tokens", None)),  # cut while calling a tool: still max_tokens
    ("tool_calls", None, True, ("tool_use", None)),
    ("stop", None, True, ("tool_use", None)),  # vLLM says stop for a named tool choice
    ("content_filter", None, False, ("refusal", None)),
    (None, None, False, ("end_turn", None)),
])  # fmt: skip
def test_stop_reason(finish, matched, tools, expected):
    assert anthropic_reply.stop_reason(finish, matched, tools) == expected


@pytest.mark.parametrize("arguments,expected", [
    ('{"a": 1}', {"a": 1}), ("", {}), (None, {}), ("not json", {}), ("[1, 2]", {}), ({"a": 2}, {"a": 2}),
])  # fmt: skip
def test_tool_input(arguments, expected):
    assert anthropic_reply.tool_input(arguments) == expected


def test_empty_answer_has_no_empty_text_block():
    completion = {"id": "chatcmpl-1", "model": "m", "choices": [{"message": {"content": ""}, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 0}}  # fmt: skip
    message = anthropic_reply.to_message(completion)
    assert message["content"] == [] and message["stop_reason"] == "max_tokens"
    assert message["usage"]["input_tokens"] == 3


# --- streams ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stream_mixed.json", "stream_stop_sequence.json"])
def test_stream_matches_fixture(name):
    case = fixture(name)
    stream = anthropic_reply.MessageStream()
    raw = b"".join(stream.feed(frame.encode()) for frame in case["openai_frames"]) + stream.close()
    assert events(raw) == case["anthropic_events"]


def test_stream_is_chunk_in_chunk_out():
    frames = [f.encode() for f in fixture("stream_mixed.json")["openai_frames"]]
    stream = anthropic_reply.MessageStream()
    assert [e[0] for e in events(stream.feed(frames[0]))] == ["message_start", "ping"]
    out = events(stream.feed(frames[3]))  # the first text: the thinking-less text block opens at once
    assert [e[0] for e in out] == ["content_block_start", "content_block_delta"]
    assert out[1][1]["delta"] == {"type": "text_delta", "text": "Checking"}
    assert stream.feed(frames[4]).count(b"text_delta") == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_stream_does_not_depend_on_how_bytes_are_cut(cuts):
    case = fixture("stream_mixed.json")
    whole = "".join(case["openai_frames"]).encode()
    points = sorted({c % (len(whole) + 1) for c in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)])]
    stream = anthropic_reply.MessageStream()
    raw = b"".join(stream.feed(piece) for piece in pieces) + stream.close()
    assert events(raw) == case["anthropic_events"]


def test_crlf_stream_cut_between_cr_and_lf():
    case = fixture("stream_stop_sequence.json")
    whole = "".join(case["openai_frames"]).encode()
    for at in [i + 1 for i in range(len(whole)) if whole[i : i + 1] == b"\r"]:
        stream = anthropic_reply.MessageStream()
        raw = stream.feed(whole[:at]) + stream.feed(whole[at:]) + stream.close()
        assert events(raw) == case["anthropic_events"]


def test_stream_of_a_replayed_answer_matches_the_whole_reply():
    """A cached answer replayed as OpenAI frames, then translated, says what the whole reply says."""
    completion = fixture("reply_full.json")["openai"]
    stream = anthropic_reply.MessageStream()
    raw = b"".join(stream.feed(f) for f in completion_to_frames(completion, "chat", True)) + stream.close()
    message: dict = {}
    blocks: list[dict] = []
    partial: dict[int, str] = {}
    for name, data in events(raw):
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            delta, block = data["delta"], blocks[data["index"]]
            if delta["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
            else:
                key = "text" if delta["type"] == "text_delta" else "thinking"
                block[key] += delta[key]
        elif name == "message_delta":
            message.update(data["delta"], usage=data["usage"])
    for index, text in partial.items():
        blocks[index]["input"] = json.loads(text)
    expected = anthropic_reply.to_message(completion)
    assert blocks == expected["content"]
    assert (message["stop_reason"], message["usage"]) == (expected["stop_reason"], expected["usage"])


def test_stream_without_done_is_finished_by_close():
    frames = fixture("stream_stop_sequence.json")["openai_frames"][:-1]
    stream = anthropic_reply.MessageStream()
    raw = b"".join(stream.feed(f.encode()) for f in frames)
    assert b"message_stop" not in raw
    assert events(stream.close())[-1][0] == "message_stop"
    # A stream that never finished gets no message_stop from close(): the caller reports the error.
    unfinished = anthropic_reply.MessageStream()
    unfinished.feed(frames[0].encode())
    assert unfinished.close() == b""


def test_stream_error_frame_raises():
    stream = anthropic_reply.MessageStream()
    with pytest.raises(BackendError, match="boom"):
        stream.feed(b'data: {"error": {"message": "boom"}}\n\n')


def test_empty_stream_still_has_a_message():
    stream = anthropic_reply.MessageStream()
    names = [e[0] for e in events(stream.feed(b"data: [DONE]\n\n"))]
    assert names == ["message_start", "ping", "message_delta", "message_stop"]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exc,kind", [
    (InvalidRequest("x"), "invalid_request_error"),
    (Unauthorized("x"), "authentication_error"),
    (ModelNotFound("x"), "not_found_error"),
    (Overloaded("x", 1), "rate_limit_error"),
    (BackendError("x"), "api_error"),
    (BackendUnavailable("x"), "overloaded_error"),
    (BackendTimeout("x"), "timeout_error"),
    (ProxyError("x", status=413), "request_too_large"),
    (ProxyError("x", status=418), "invalid_request_error"),
    (ProxyError("x", status=507), "api_error"),
])  # fmt: skip
def test_error_types(exc, kind):
    assert anthropic_error_body(exc) == {"type": "error", "error": {"type": kind, "message": "x"}}


def test_error_event():
    assert anthropic_error_event(BackendTimeout("slow")) == (
        b'event: error\ndata: {"type":"error","error":{"type":"timeout_error","message":"slow"}}\n\n'
    )


def test_tool_calls_without_an_index_are_told_apart_by_id():
    stream = anthropic_reply.MessageStream()
    frames = [
        b'data: {"id":"chatcmpl-3","model":"m","choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"f","arguments":"{}"}}]}}]}\n\n',
        b'data: {"id":"chatcmpl-3","model":"m","choices":[{"delta":{"tool_calls":[{"id":"b","function":{"name":"g","arguments":"{}"}}]}}]}\n\n',
        b'data: {"id":"chatcmpl-3","model":"m","choices":[{"delta":{},"finish_reason":"tool_calls"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    out = events(b"".join(stream.feed(f) for f in frames))
    starts = [data["content_block"] for name, data in out if name == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("a", "f"), ("b", "g")]
    assert out[-2][1]["delta"]["stop_reason"] == "tool_use"
