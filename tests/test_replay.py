"""Complete answer <-> SSE stream (proxy/translate/replay.py): exact shapes, fixtures and round trips."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.translate import ollama_chat
from proxy.translate.replay import StreamAccumulator, accumulate, completion_to_frames

FIXTURES = Path(__file__).parent / "fixtures" / "replay"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def payloads(frames: list[bytes]) -> list:
    out = []
    for frame in frames:
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n\n") == 1, frame
        data = frame[6:-2]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


# --- exact shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat_tools_reasoning.json", "chat_tool_only.json", "text_completion.json"])
def test_replay_frames_match_fixture(name):
    case = fixture(name)
    frames = completion_to_frames(case["completion"], case["kind"], case["include_usage"])
    assert payloads(frames) == case["chunks"]
    assert frames[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("name", ["chat_tools_reasoning.json", "chat_tool_only.json", "text_completion.json"])
def test_fixture_round_trip(name):
    case = fixture(name)
    frames = completion_to_frames(case["completion"], case["kind"], include_usage=True)
    assert accumulate(frames, case["kind"]) == case["completion"]


def test_replayed_chunks_parse_with_the_openai_sdk_types():
    case = fixture("chat_tools_reasoning.json")
    for chunk in payloads(completion_to_frames(case["completion"], "chat", True))[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    ChatCompletion.model_validate(case["completion"])
    text = fixture("text_completion.json")
    for chunk in payloads(completion_to_frames(text["completion"], "text", True))[:-1]:
        # The SDK builds stream chunks without validation: its Completion type has no null
        # finish_reason, which every streamed text chunk but the last carries (as OpenAI's do).
        if not chunk["choices"] or chunk["choices"][0]["finish_reason"]:
            Completion.model_validate(chunk)


def test_without_usage_the_stream_has_no_usage_chunk_and_accumulates_to_null_usage():
    case = fixture("chat_tools_reasoning.json")
    frames = completion_to_frames(case["completion"], "chat", include_usage=False)
    assert all("usage" not in p for p in payloads(frames)[:-1])
    assert accumulate(frames, "chat") == {**case["completion"], "usage": None}


@pytest.mark.parametrize("index", range(3))
def test_vllm_streams_accumulate(index):
    case = fixture("vllm_streams.json")["cases"][index]
    raw = case["sse"].encode()
    assert accumulate(raw, case["kind"]) == case["complete"]
    acc = StreamAccumulator(case["kind"])
    for i in range(len(raw)):  # one byte at a time: CRLF pairs and events split anywhere
        acc.feed(raw[i : i + 1])
    assert acc.result() == case["complete"]


def test_several_choices_and_logprobs():
    completion = {
        "id": "chatcmpl-n2", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "a"},
             "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}], "refusal": None},
             "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "", "refusal": "I can't."},
             "logprobs": None, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }  # fmt: skip
    frames = completion_to_frames(completion, "chat", True)
    indexes = [p["choices"][0]["index"] for p in payloads(frames)[:-2]]
    assert indexes == [0, 0, 0, 1, 1, 1]
    assert accumulate(frames, "chat") == completion


# --- streams that did not end properly ----------------------------------------------------------


def _good_frames() -> list[bytes]:
    return completion_to_frames(fixture("chat_tools_reasoning.json")["completion"], "chat", True)


def test_no_done_marker_gives_none():
    assert accumulate(_good_frames()[:-1], "chat") is None


def test_no_finish_reason_gives_none():
    frames = [f for f in _good_frames() if b'"finish_reason":"tool_calls"' not in f]
    assert accumulate(frames, "chat") is None


@pytest.mark.parametrize(
    "error_event",
    [
        b'data: {"error":{"message":"backend went away","type":"api_error","param":null,"code":null}}\n\n',
        b'event: error\ndata: {"message":"boom"}\n\n',
        b"data: {not json\n\n",
    ],
)
def test_error_event_gives_none(error_event):
    frames = _good_frames()
    acc = StreamAccumulator("chat")
    for frame in frames[:3] + [error_event] + frames[3:]:
        acc.feed(frame)
    assert acc.result() is None and acc.error is not None


def test_empty_stream_gives_none():
    assert accumulate([b"data: [DONE]\n\n"], "chat") is None
    assert accumulate([], "text") is None


# --- agreement with the Ollama translator -------------------------------------------------------


def test_ollama_chat_stream_accumulates_to_what_the_aggregate_builds():
    case = json.loads((Path(__file__).parent / "fixtures" / "translate" / "chat_stream_tools.json").read_text())
    shape = ollama_chat.ChatShape("thinker", include_usage=True)
    stream = ollama_chat.ChatStream(shape)
    raw = b"".join(stream.feed(line) for line in case["lines"])
    aggregate = ollama_chat.ChatAggregate(shape)
    for line in case["lines"]:
        aggregate.feed(line)
    streamed, whole = accumulate(raw, "chat"), aggregate.result()
    for answer in (streamed, whole):
        for call in answer["choices"][0]["message"]["tool_calls"]:
            call["id"] = "call_x"  # generated independently on each side
    assert streamed["choices"][0]["message"] == {
        k: v for k, v in whole["choices"][0]["message"].items() if k != "refusal"
    }
    assert streamed["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "tool_calls"
    assert streamed["usage"] == whole["usage"] == case["usage"]


# --- property: any answer survives the trip, in any byte chunking -------------------------------

_text = st.text(max_size=30)
_nonempty = st.text(min_size=1, max_size=30)
_tool_call = st.builds(
    lambda i, name, args: {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}},
    st.integers(0, 10**6),
    _nonempty,
    _text,
)


@st.composite
def chat_message(draw) -> dict:
    calls = draw(st.lists(_tool_call, max_size=3))
    content = draw(st.one_of(st.none(), _text)) if calls else draw(_text)
    message: dict = {"role": "assistant", "content": content}
    for name in draw(st.lists(st.sampled_from(["reasoning_content", "reasoning", "refusal"]), unique=True)):
        message[name] = draw(st.one_of(st.none(), _text))
    if calls:
        message["tool_calls"] = calls
    return message


_usage = st.builds(
    lambda p, c: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    st.integers(0, 10**5),
    st.integers(0, 10**5),
)
_finish = st.sampled_from(["stop", "length", "tool_calls", "content_filter"])


@st.composite
def chat_completion(draw) -> dict:
    n = draw(st.integers(1, 3))
    completion = {
        "id": "chatcmpl-" + draw(st.text("abcdef0123456789", min_size=1, max_size=12)),
        "object": "chat.completion",
        "created": draw(st.integers(0, 2**31)),
        "model": draw(_nonempty),
        "choices": [
            {"index": i, "message": draw(chat_message()), "logprobs": None, "finish_reason": draw(_finish)}
            for i in range(n)
        ],
        "usage": draw(_usage),
    }
    if draw(st.booleans()):
        completion["system_fingerprint"] = draw(st.one_of(st.none(), _nonempty))
    return completion


@st.composite
def text_completion(draw) -> dict:
    return {
        "id": "cmpl-" + draw(st.text("abcdef0123456789", min_size=1, max_size=12)),
        "object": "text_completion",
        "created": draw(st.integers(0, 2**31)),
        "model": draw(_nonempty),
        "choices": [{"index": 0, "text": draw(_text), "logprobs": None, "finish_reason": draw(_finish)}],
        "usage": draw(_usage),
    }


def _feed_in_pieces(frames: list[bytes], cuts: list[int], kind) -> dict | None:
    raw = b"".join(frames)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    acc = StreamAccumulator(kind)
    last = 0
    for point in [*points, len(raw)]:
        acc.feed(raw[last:point])
        last = point
    return acc.result()


@settings(max_examples=100, deadline=None)
@given(chat_completion(), st.lists(st.integers(0, 10**6), max_size=8))
def test_chat_round_trip_property(completion, cuts):
    frames = completion_to_frames(completion, "chat", include_usage=True)
    assert _feed_in_pieces(frames, cuts, "chat") == completion


@settings(max_examples=100, deadline=None)
@given(text_completion(), st.lists(st.integers(0, 10**6), max_size=8))
def test_text_round_trip_property(completion, cuts):
    frames = completion_to_frames(completion, "text", include_usage=True)
    assert _feed_in_pieces(frames, cuts, "text") == completion
