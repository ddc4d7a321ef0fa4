"""The pure translation layer, against small JSON fixtures and with property-based round trips."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest, UnsupportedParameter
from proxy.translate import ollama_chat, ollama_text
from proxy.translate.passthrough import ModelRenamer, request_body

FIXTURES = Path(__file__).parent / "fixtures" / "translate"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def sse_payloads(raw: bytes) -> list:
    """The JSON objects (and the [DONE] marker) of an SSE byte stream, as a client would parse it."""
    assert raw.endswith(b"\n\n")
    out = []
    for event in raw.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: "), event
        data = event[6:]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


# --- fixtures -----------------------------------------------------------------------------------


def test_chat_request_maps_every_field():
    case = fixture("chat_request_full.json")
    native, shape = ollama_chat.chat_request(case["openai"], case["target"])
    assert native == case["ollama"]
    assert shape == ollama_chat.ChatShape(model="chat", include_usage=True, single_tool_call=False)


def test_chat_stream_translation_matches_fixture():
    case = fixture("chat_stream_tools.json")
    stream = ollama_chat.ChatStream(ollama_chat.ChatShape("thinker", include_usage=case["include_usage"]))
    raw = b"".join(stream.feed(line) for line in case["lines"])
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == case["usage"]
    chunks = payloads[:-2]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    for delta in deltas:  # ids are generated when older Ollama releases send none
        for call in delta.get("tool_calls", ()):
            assert call.pop("id").startswith("call_")
    assert deltas == case["deltas"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == case["finish_reasons"]
    assert {c["id"] for c in payloads[:-1]} == {stream.id}
    assert {c["model"] for c in payloads[:-1]} == {"thinker"}
    assert all(c["object"] == "chat.completion.chunk" for c in payloads[:-1])


def test_chat_aggregate_matches_fixture():
    case = fixture("chat_stream_tools.json")
    agg = ollama_chat.ChatAggregate(ollama_chat.ChatShape("thinker"))
    for line in case["lines"]:
        agg.feed(line)
    result = agg.result()
    message = result["choices"][0]["message"]
    assert message["content"] == "Let me check."
    assert message["reasoning_content"] == "hmm"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Tokyo"}]
    assert "index" not in message["tool_calls"][0]
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert result["usage"] == case["usage"]


def test_text_request_matches_fixture():
    case = fixture("text_request.json")
    native, shape = ollama_text.completion_request(case["openai"], case["target"])
    assert native == case["ollama"]
    assert shape.logprobs == 2


# --- details ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "effort,think",
    [("none", False), ("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high"), ("xhigh", "max")],
)
def test_reasoning_effort_to_think(effort, think):
    native, _ = ollama_chat.chat_request({"model": "m", "messages": [], "reasoning_effort": effort}, "t")
    assert native["think"] is think if isinstance(think, bool) else native["think"] == think


def test_invalid_reasoning_effort():
    with pytest.raises(InvalidRequest) as info:
        ollama_chat.chat_request({"model": "m", "messages": [], "reasoning_effort": "extreme"}, "t")
    assert info.value.param == "reasoning_effort"


def test_explicit_think_wins_over_reasoning_effort():
    native, _ = ollama_chat.chat_request({"model": "m", "messages": [], "think": True, "reasoning_effort": "low"}, "t")
    assert native["think"] is True


@pytest.mark.parametrize(
    "choice,expected",
    [("none", None), ("auto", ["a", "b"]), ("required", ["a", "b"]),
     ({"type": "function", "function": {"name": "b"}}, ["b"])],
)  # fmt: skip
def test_tool_choice(choice, expected):
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    native, _ = ollama_chat.chat_request({"model": "m", "messages": [], "tools": tools, "tool_choice": choice}, "t")
    got = [t["function"]["name"] for t in native["tools"]] if "tools" in native else None
    assert got == expected


def test_tool_name_found_from_earlier_call_last_match_wins():
    messages = [
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "first", "arguments": "{}"}}]},
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "second", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "r"},
    ]
    native, _ = ollama_chat.chat_request({"model": "m", "messages": messages}, "t")
    assert native["messages"][2]["tool_name"] == "second"


def test_parallel_tool_calls_false_keeps_one_call():
    shape = ollama_chat.ChatShape("m", single_tool_call=True)
    line = {"message": {"content": "", "tool_calls": [
        {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]},
        "done": True, "done_reason": "stop"}  # fmt: skip
    agg = ollama_chat.ChatAggregate(shape)
    agg.feed(line)
    assert [c["function"]["name"] for c in agg.result()["choices"][0]["message"]["tool_calls"]] == ["a"]
    chunks = sse_payloads(ollama_chat.ChatStream(shape).feed(line))
    calls = [tc for c in chunks if c != "[DONE]" for tc in c["choices"][0]["delta"].get("tool_calls", ())]
    assert [c["function"]["name"] for c in calls] == ["a"]


@pytest.mark.parametrize(
    "done_reason,tools,expected",
    [("stop", False, "stop"), ("length", False, "length"), ("stop", True, "tool_calls"),
     ("length", True, "length"), ("", False, "stop"), (None, False, "stop")],
)  # fmt: skip
def test_finish_reason_precedence(done_reason, tools, expected):
    from proxy.translate.common import finish_reason

    assert finish_reason(done_reason, tools) == expected


def test_empty_answer_still_opens_with_a_role_chunk():
    stream = ollama_chat.ChatStream(ollama_chat.ChatShape("m"))
    payloads = sse_payloads(stream.feed({"message": {"content": ""}, "done": True, "done_reason": "stop"}))
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert payloads[2] == "[DONE]"


def test_logprobs_are_carried_in_openai_shape():
    entry = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.1}]}
    line = {"message": {"content": "Hi"}, "logprobs": [entry], "done": False}
    chunk = sse_payloads(ollama_chat.ChatStream(ollama_chat.ChatShape("m")).feed(line))[0]
    assert chunk["choices"][0]["logprobs"] == {"content": [entry]}
    agg = ollama_chat.ChatAggregate(ollama_chat.ChatShape("m"))
    agg.feed(line)
    agg.feed({"message": {"content": ""}, "done": True, "done_reason": "stop"})
    assert agg.result()["choices"][0]["logprobs"] == {"content": [entry]}


@pytest.mark.parametrize(
    "body,param",
    [({"n": 3}, "n"), ({"logit_bias": {"1": 1}}, "logit_bias"), ({"functions": [{"name": "f"}]}, "functions"),
     ({"audio": {"voice": "x"}}, "audio"), ({"unknown_thing": 1}, "unknown_thing")],
)  # fmt: skip
def test_unsupported_parameters_are_refused_by_name(body, param):
    with pytest.raises(UnsupportedParameter) as info:
        ollama_chat.chat_request({"model": "m", "messages": [], **body}, "t")
    assert info.value.param == param


def test_completion_logprobs_legacy_shape():
    shape = ollama_text.TextShape("m", logprobs=1)
    agg = ollama_text.TextAggregate(shape)
    agg.feed(
        {
            "response": "Hi",
            "logprobs": [{"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}],
        }
    )
    agg.feed({"response": " there", "logprobs": [{"token": " there", "logprob": -1.0, "top_logprobs": []}]})
    agg.feed({"response": "", "done": True, "done_reason": "length", "prompt_eval_count": 2, "eval_count": 2})
    choice = agg.result()["choices"][0]
    assert choice["text"] == "Hi there" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"tokens": ["Hi", " there"], "token_logprobs": [-0.5, -1.0],
                                  "top_logprobs": [{"Hi": -0.5}, {}], "text_offset": [0, 2]}  # fmt: skip


def test_embedding_base64_matches_openai_reference():
    assert ollama_text.float32_base64([0.1, -0.2, 0.3]) == "zczMPc3MTL6amZk+"


# --- property-based round trips -----------------------------------------------------------------

text = st.text(max_size=30)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=10))
arguments = st.dictionaries(st.text(min_size=1, max_size=8), json_scalars, max_size=4)
tool_call = st.fixed_dictionaries({"name": st.text(min_size=1, max_size=12), "arguments": arguments})

native_line = st.fixed_dictionaries({"content": text, "thinking": text, "tool_calls": st.lists(tool_call, max_size=2)})


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(native_line, max_size=8), done_reason=st.sampled_from(["stop", "length", ""]),
       counts=st.tuples(st.integers(0, 5000), st.integers(0, 5000)), include_usage=st.booleans())  # fmt: skip
def test_stream_round_trip_keeps_every_field(lines, done_reason, counts, include_usage):
    """Native lines -> SSE chunks -> reassembled by a client == what the backend produced == the aggregate."""
    native = []
    for i, line in enumerate(lines):
        message = {"role": "assistant", "content": line["content"]}
        if line["thinking"]:
            message["thinking"] = line["thinking"]
        if line["tool_calls"]:
            message["tool_calls"] = [
                {"id": f"call_{i}{k}", "function": {"index": k, "name": c["name"], "arguments": c["arguments"]}}
                for k, c in enumerate(line["tool_calls"])
            ]
        native.append({"message": message, "done": False})
    native.append({"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": done_reason,
                   "prompt_eval_count": counts[0], "eval_count": counts[1]})  # fmt: skip

    shape = ollama_chat.ChatShape("alias", include_usage=include_usage)
    stream, agg = ollama_chat.ChatStream(shape), ollama_chat.ChatAggregate(shape)
    raw = b""
    for line in native:
        raw += stream.feed(line)
        agg.feed(line)
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [p for p in payloads[:-1] if p["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1

    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    thinking = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    expected_calls = [(c["name"], c["arguments"]) for line in lines for c in line["tool_calls"]]
    assert content == "".join(line["content"] for line in lines)
    assert thinking == "".join(line["thinking"] for line in lines)
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls] == expected_calls
    assert [c["index"] for c in calls] == list(range(len(calls)))

    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    expected_finish = "length" if done_reason == "length" else "tool_calls" if expected_calls else "stop"
    assert finishes[-1] == expected_finish
    usage = {"prompt_tokens": counts[0], "completion_tokens": counts[1], "total_tokens": sum(counts)}
    if include_usage:
        assert payloads[-2] == {**payloads[-2], "choices": [], "usage": usage}
    else:
        assert all("usage" not in p for p in payloads[:-1])

    result = agg.result()
    message = result["choices"][0]["message"]
    assert (message["content"] or "") == content
    assert message.get("reasoning_content", "") == thinking
    assert [
        (c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in message.get("tool_calls", ())
    ] == expected_calls
    assert result["choices"][0]["finish_reason"] == expected_finish
    assert result["usage"] == usage
    assert result["model"] == "alias"


user_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": text})
assistant_turn = st.lists(tool_call, min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(plain=st.lists(user_message, min_size=1, max_size=4), turns=st.lists(assistant_turn, max_size=3),
       named=st.booleans())  # fmt: skip
def test_request_round_trip_keeps_every_message_field(plain, turns, named):
    """OpenAI messages -> Ollama messages, read back: roles, text, tool calls, arguments and tool names survive."""
    messages = list(plain)
    for t, calls in enumerate(turns):
        ids = [f"id{t}_{k}" for k in range(len(calls))]
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for i, c in zip(ids, calls)]})  # fmt: skip
        for i, c in zip(ids, calls):
            result = {"role": "tool", "tool_call_id": i, "content": f"result of {c['name']}"}
            if named:
                result["name"] = c["name"]
            messages.append(result)

    native, _ = ollama_chat.chat_request({"model": "m", "messages": messages}, "t")
    assert len(native["messages"]) == len(messages)
    for sent, got in zip(messages, native["messages"]):
        assert got["role"] == ("system" if sent["role"] == "developer" else sent["role"])
        assert got["content"] == (sent["content"] or "")
        if sent["role"] == "assistant":
            back = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in got["tool_calls"]]
            assert back == [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                            for c in sent["tool_calls"]]  # fmt: skip
        if sent["role"] == "tool":
            assert got["tool_call_id"] == sent["tool_call_id"]
            assert got["tool_name"] == sent["content"].removeprefix("result of ")


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 2000), max_size=6),
       backend=st.sampled_from(["Qwen/Qwen2.5-7B-Instruct", "m", "a\"quoted\""]), public=st.text(min_size=1, max_size=10))  # fmt: skip
def test_renamer_round_trip_whatever_the_chunking(texts, cuts, backend, public):
    events = [orjson.dumps({"id": "x", "model": backend, "choices": [{"delta": {"content": t}}]}) for t in texts]
    raw = b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    points = sorted({min(c, len(raw)) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)])]
    renamer = ModelRenamer(backend, public)
    out = b"".join(renamer.stream(p) for p in pieces) + renamer.flush()
    payloads = sse_payloads(out)
    assert payloads[-1] == "[DONE]"
    assert [p["model"] for p in payloads[:-1]] == [public] * len(texts)
    assert [p["choices"][0]["delta"]["content"] for p in payloads[:-1]] == texts


def test_request_body_renames_and_drops_proxy_fields():
    sent = orjson.loads(request_body({"model": "alias", "messages": [], "task_type": "code", "top_k": 3}, "real"))
    assert sent == {"model": "real", "messages": [], "top_k": 3}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=64))
def test_base64_embedding_round_trip(vector):
    raw = base64.b64decode(ollama_text.float32_base64(vector))
    assert list(struct.unpack(f"<{len(vector)}f", raw)) == vector
