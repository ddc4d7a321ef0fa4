"""Chat completions through the proxy, driven by the official openai SDK, against both backend kinds."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.sim import Behavior

# (public model name, which sim serves it)
BOTH = pytest.mark.parametrize("model,sim_name", [("chat", "ollama"), ("qwen-chat", "vllm")])

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def last_body(sim, path_suffix: str) -> dict:
    for _method, path, body, _headers in reversed(sim.requests):
        if path.endswith(path_suffix):
            return body
    raise AssertionError(f"the backend received no request to {path_suffix}")


@BOTH
def test_chat_non_streaming(client, request, model, sim_name):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(reply="The capital of France is Paris.")
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Capital of France?"}], temperature=0
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == "The capital of France is Paris."
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == model  # the public name, never the backend's
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert raw.headers["x-proxy-backend"] == {"ollama": "ollama-1", "vllm": "vllm-1"}[sim_name]


@BOTH
def test_chat_streaming(client, request, model, sim_name):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(reply="one two three four five")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "count"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 5  # chunk by chunk, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert {c.model for c in chunks} == {model}
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks)


@BOTH
def test_chat_streaming_include_usage(client, request, model, sim_name):
    request.getfixturevalue(sim_name).behavior = Behavior(reply="alpha beta gamma")
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    final = chunks[-1]
    assert final.choices == []
    assert final.usage.completion_tokens == 3
    assert final.usage.prompt_tokens > 0
    assert final.usage.total_tokens == final.usage.prompt_tokens + 3


@BOTH
def test_tool_calls_non_streaming(client, request, model, sim_name):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id


@BOTH
def test_tool_calls_streaming(client, request, model, sim_name):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Tokyo"}}])
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL], stream=True
    ):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or ():
            slot = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or delta.id
            slot["name"] += (delta.function and delta.function.name) or ""
            slot["arguments"] += (delta.function and delta.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Tokyo"}
    assert calls[0]["id"]


def test_tool_result_round_trip_reaches_ollama_natively(client, ollama):
    """The second turn of a tool conversation: arguments become objects, tool results get tool_name."""
    client.chat.completions.create(
        model="chat",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },  # fmt: skip
            {"role": "tool", "tool_call_id": "call_abc", "content": "18C and sunny"},
        ],
        tools=[WEATHER_TOOL],
    )
    sent = last_body(ollama, "/api/chat")
    assistant, tool = sent["messages"][1], sent["messages"][2]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert assistant["tool_calls"][0]["id"] == "call_abc"
    assert tool == {"role": "tool", "content": "18C and sunny", "tool_name": "get_weather", "tool_call_id": "call_abc"}


@BOTH
def test_json_mode(client, request, model, sim_name):
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give me JSON"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_json_schema_becomes_ollama_format(client, ollama):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    resp = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Name?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    assert last_body(ollama, "/api/chat")["format"] == schema


def test_sampling_parameters_reach_ollama_options(client, ollama):
    client.chat.completions.create(
        model="chat",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0.2, top_p=0.9, seed=42, stop=["END"], max_completion_tokens=50,
        presence_penalty=0.5, frequency_penalty=0.25,
        extra_body={"options": {"num_ctx": 8192}, "keep_alive": "10m", "top_k": 20},
    )  # fmt: skip
    sent = last_body(ollama, "/api/chat")
    assert sent["model"] == "llama3.1:8b"
    assert sent["options"] == {
        "num_ctx": 8192, "temperature": 0.2, "top_p": 0.9, "seed": 42, "stop": ["END"], "num_predict": 50,
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "top_k": 20,
    }  # fmt: skip
    assert sent["keep_alive"] == "10m"
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


def test_max_tokens_gives_length_finish(client, ollama):
    ollama.behavior = Behavior(reply="a b c d e f g h")
    resp = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_reasoning_becomes_reasoning_content(client, ollama):
    ollama.behavior = Behavior(reply="42", thinking="Let me think this through.")
    resp = client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "Answer?"}], reasoning_effort="high"
    )
    message = resp.choices[0].message
    assert message.content == "42"
    assert message.model_extra["reasoning_content"] == "Let me think this through."
    assert last_body(ollama, "/api/chat")["think"] == "high"

    chunks = list(
        client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "Answer?"}], stream=True)
    )
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning == "Let me think this through."


def test_image_content_parts_become_ollama_images(client, ollama):
    client.chat.completions.create(
        model="llava:7b",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in"},
                    {"type": "text", "text": "this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            }
        ],
    )
    sent = last_body(ollama, "/api/chat")["messages"][0]
    assert sent == {"role": "user", "content": "What is in\nthis picture?", "images": ["iVBORw0KGgo="]}


def test_unaliased_backend_name_is_routable(client, ollama, vllm):
    resp = client.chat.completions.create(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}])
    assert resp.model == "llama3.1:8b"
    assert last_body(ollama, "/api/chat")["model"] == "llama3.1:8b"
    # Ollama's implicit ":latest" tag: the client's short name reaches the backend in full
    client.embeddings.create(model="nomic-embed-text", input="hello")
    assert last_body(ollama, "/api/embed")["model"] == "nomic-embed-text:latest"
    resp = client.chat.completions.create(model="qwen2.5-7b", messages=[{"role": "user", "content": "hi"}])
    assert resp.model == "qwen2.5-7b"
    assert last_body(vllm, "/v1/chat/completions")["model"] == "qwen2.5-7b"


def test_vllm_extra_fields_pass_through_untouched(client, vllm):
    client.chat.completions.create(
        model="qwen-chat",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "guided_json": {"type": "object"}},
    )
    sent = last_body(vllm, "/v1/chat/completions")
    assert sent["model"] == "qwen2.5-7b"
    assert (sent["top_k"], sent["min_p"], sent["repetition_penalty"]) == (5, 0.1, 1.1)
    assert sent["guided_json"] == {"type": "object"}
    _, _, _, headers = vllm.requests[-1]
    assert headers.get("authorization") == "Bearer vllm-secret-key"


def test_completions_legacy_endpoint(client, ollama, vllm):
    ollama.behavior = Behavior(reply="upon a time")
    resp = client.completions.create(model="chat", prompt="Once", max_tokens=10)
    assert resp.choices[0].text == "upon a time"
    assert resp.object == "text_completion"
    assert resp.model == "chat"
    assert last_body(ollama, "/api/generate")["prompt"] == "Once"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="chat", prompt="Once", stream=True) if c.choices
    )
    assert streamed == "upon a time"
    resp = client.completions.create(model="qwen-chat", prompt="Once", max_tokens=10)
    assert resp.model == "qwen-chat" and resp.choices[0].text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_client_concurrent_streams(aclient, ollama, vllm, anyio_backend):
    ollama.behavior = Behavior(reply="a b c d")
    vllm.behavior = Behavior(reply="a b c d")

    async def one(model: str) -> str:
        stream = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(one(m) for m in ["chat", "qwen-chat"] * 5))
    assert results == ["a b c d"] * 10
    resp = await aclient.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert resp.choices[0].message.content == "a b c d"
    await aclient.close()
