"""The Anthropic Messages API through the proxy, driven by the official anthropic SDK against both simulators."""

from __future__ import annotations

import asyncio
import base64
import json

import anthropic
import httpx
import openai
import pytest

from proxy.sim import Behavior
from tests.support import PROXY_KEY, backends_config, running_proxy, wait_for

# (public model name, which sim serves it): an Ollama alias and a vLLM alias
BOTH = pytest.mark.parametrize("model,sim_name", [("chat", "ollama"), ("qwen-chat", "vllm")])

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HI = [{"role": "user", "content": "Hi"}]
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n tiny image bytes").decode()


@pytest.fixture(scope="module")
def proxy(ollama, vllm):
    config = backends_config(ollama, vllm)
    config["server"] = {"api_keys": [PROXY_KEY]}
    config["models"] = [*config["models"], {"name": "vision", "target": "llava:7b", "backends": ["ollama-1"]}]
    with running_proxy(config) as server:
        yield server


@pytest.fixture
def client(proxy):
    # max_retries=0: the SDK's own retries would hide the proxy's status codes.
    with anthropic.Anthropic(base_url=proxy.url, api_key=PROXY_KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def aclient(proxy):
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=PROXY_KEY, max_retries=0)


def last_body(sim, path_suffix: str) -> dict:
    for _method, path, body, _headers in reversed(sim.requests):
        if path.endswith(path_suffix):
            return body
    raise AssertionError(f"the backend received no request to {path_suffix}")


def backend_messages(sim_name: str, sim) -> list[dict]:
    return last_body(sim, "/api/chat" if sim_name == "ollama" else "/v1/chat/completions")["messages"]


def row(proxy, request_id: str) -> dict:
    url = f"{proxy.url}/admin/history/requests/{request_id}"
    assert wait_for(lambda: httpx.get(url).status_code == 200 and httpx.get(url).json()["status"] != "in_progress")
    return httpx.get(url).json()


# --- answers ----------------------------------------------------------------------------------


@BOTH
def test_message_non_streaming(client, proxy, request, model, sim_name):
    request.getfixturevalue(sim_name).behavior = Behavior(reply="The capital of France is Paris.")
    raw = client.messages.with_raw_response.create(model=model, max_tokens=100, messages=HI)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "The capital of France is Paris."
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.model == model
    assert message.id.startswith("msg_")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-proxy-backend"] == {"ollama": "ollama-1", "vllm": "vllm-1"}[sim_name]
    assert message._request_id == raw.headers["x-request-id"]


@BOTH
def test_message_stream_helper(client, request, model, sim_name):
    request.getfixturevalue(sim_name).behavior = Behavior(reply="one two three four five")
    with client.messages.stream(model=model, max_tokens=100, messages=HI) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "one two three four five"
    assert len(pieces) >= 5  # chunk by chunk, not one blob
    assert final.content[0].text == "one two three four five"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 5


@BOTH
def test_stream_true_event_sequence(client, request, model, sim_name):
    request.getfixturevalue(sim_name).behavior = Behavior(reply="alpha beta gamma")
    events = list(client.messages.create(model=model, max_tokens=100, messages=HI, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert {d.type for d in deltas} == {"text_delta"}
    assert "".join(d.text for d in deltas) == "alpha beta gamma"
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == 3


def test_stream_on_the_wire(proxy):
    """The raw bytes: named events, a ping, no OpenAI [DONE]."""
    body = {"model": "chat", "max_tokens": 50, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": PROXY_KEY}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    assert "[DONE]" not in text
    names = [line[7:] for line in text.split("\n") if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    assert resp.headers["request-id"] == resp.headers["x-request-id"]


def test_async_client_create_and_stream(aclient):
    async def run():
        message = await aclient.messages.create(model="chat", max_tokens=50, messages=HI)
        async with aclient.messages.stream(model="qwen-chat", max_tokens=50, messages=HI) as stream:
            text = "".join([piece async for piece in stream.text_stream])
        await aclient.close()
        return message, text

    message, text = asyncio.run(run())
    assert message.content[0].text == "You said: Hi"
    assert text == "You said: Hi"


# --- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ["Be terse.", [{"type": "text", "text": "Be"}, {"type": "text", "text": "terse."}]])
def test_system_as_string_and_blocks(client, ollama, system):
    client.messages.create(model="chat", max_tokens=50, system=system, messages=HI)
    messages = backend_messages("ollama", ollama)
    expected = "Be terse." if isinstance(system, str) else "Be\nterse."
    assert messages[0] == {"role": "system", "content": expected}
    assert messages[1] == {"role": "user", "content": "Hi"}


def test_image_block_reaches_the_vision_model(client, ollama):
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
    ]
    message = client.messages.create(model="vision", max_tokens=50, messages=[{"role": "user", "content": content}])
    assert message.content[0].text.startswith("You said: What is in this picture?")
    native = backend_messages("ollama", ollama)[-1]
    assert native["images"] == [PIXEL] and native["content"] == "What is in this picture?"


def test_sampling_fields_reach_the_backend(client, ollama, vllm):
    # Newer SDKs dropped the sampling keywords from create(); other clients still send them.
    sampling = {"temperature": 0.5, "top_p": 0.9, "top_k": 20}
    fields = {"extra_body": sampling, "stop_sequences": ["END"], "metadata": {"user_id": "u1"}}
    client.messages.create(model="chat", max_tokens=42, messages=HI, **fields)
    options = last_body(ollama, "/api/chat")["options"]
    assert options == {"temperature": 0.5, "top_p": 0.9, "top_k": 20, "num_predict": 42, "stop": ["END"]}
    client.messages.create(model="qwen-chat", max_tokens=42, messages=HI, **fields)
    body = last_body(vllm, "/v1/chat/completions")
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "max_tokens", "stop", "user")} == {
        "temperature": 0.5, "top_p": 0.9, "top_k": 20, "max_tokens": 42, "stop": ["END"], "user": "u1",
    }  # fmt: skip


@BOTH
def test_max_tokens_stop_reason(client, request, model, sim_name):
    request.getfixturevalue(sim_name).behavior = Behavior(reply="one two three four five six")
    message = client.messages.create(model=model, max_tokens=2, messages=HI)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].text == "one two"
    with client.messages.stream(model=model, max_tokens=2, messages=HI) as stream:
        assert stream.get_final_message().stop_reason == "max_tokens"


def test_stop_sequence_reported_where_the_backend_says_which(client, ollama, vllm):
    for sim in (ollama, vllm):
        sim.behavior = Behavior(reply="one two three four")
    message = client.messages.create(model="qwen-chat", max_tokens=50, messages=HI, stop_sequences=["three"])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "three")
    assert message.content[0].text == "one two "
    with client.messages.stream(model="qwen-chat", max_tokens=50, messages=HI, stop_sequences=["three"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "three")
    # Ollama does not say which stop string ended the answer: documented as end_turn.
    message = client.messages.create(model="chat", max_tokens=50, messages=HI, stop_sequences=["three"])
    assert (message.stop_reason, message.content[0].text) == ("end_turn", "one two ")


@BOTH
def test_structured_output(client, request, model, sim_name):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
              "required": ["city", "celsius"]}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    message = client.messages.create(model=model, max_tokens=100, messages=HI, output_config=fmt)
    assert json.loads(message.content[0].text) == {"city": "example", "celsius": 1}  # the sims' document for it
    sent = last_body(request.getfixturevalue(sim_name), "/api/chat" if sim_name == "ollama" else "/v1/chat/completions")
    assert (sent["format"] if sim_name == "ollama" else sent["response_format"]["json_schema"]["schema"]) == schema


# --- tools ------------------------------------------------------------------------------------


@BOTH
def test_tool_use_answer(client, request, model, sim_name):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    message = client.messages.create(
        model=model, max_tokens=100, tools=[WEATHER], tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )  # fmt: skip
    assert message.stop_reason == "tool_use"
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id
    sent = last_body(sim, "/api/chat" if sim_name == "ollama" else "/v1/chat/completions")
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]


@BOTH
def test_tool_use_streamed_as_input_json_deltas(client, request, model, sim_name):
    request.getfixturevalue(sim_name).behavior = Behavior(
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}},
                    {"name": "get_weather", "arguments": {"city": "Rome"}}]
    )  # fmt: skip
    events = list(client.messages.create(model=model, max_tokens=100, tools=[WEATHER], messages=HI, stream=True))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["tool_use", "tool_use"]
    assert all(e.delta.type == "input_json_delta" for e in events if e.type == "content_block_delta")
    with client.messages.stream(model=model, max_tokens=100, tools=[WEATHER], messages=HI) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content] == [{"city": "Paris"}, {"city": "Rome"}]
    assert final.stop_reason == "tool_use"


@BOTH
def test_tool_result_follow_up(client, request, model, sim_name):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(reply="It is sunny in Paris.")
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny, 24 C"}]},
    ]  # fmt: skip
    message = client.messages.create(model=model, max_tokens=100, tools=[WEATHER], messages=conversation)
    assert message.content[0].text == "It is sunny in Paris." and message.stop_reason == "end_turn"
    sent = backend_messages(sim_name, sim)
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[2]["content"] == "sunny, 24 C" and sent[2]["tool_call_id"] == "toolu_01"
    if sim_name == "ollama":
        assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
        assert sent[2]["tool_name"] == "get_weather"
    else:
        assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


# --- thinking ---------------------------------------------------------------------------------


def test_thinking_on_a_thinking_model(client, ollama):
    ollama.behavior = Behavior(reply="42", thinking="Six times seven.")
    thinking = {"type": "enabled", "budget_tokens": 2048}
    message = client.messages.create(model="thinker", max_tokens=4096, thinking=thinking, messages=HI)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Six times seven." and message.content[1].text == "42"
    assert last_body(ollama, "/api/chat")["think"] == "low"  # budget under 4096: a light think
    events = list(client.messages.create(model="thinker", max_tokens=4096, thinking=thinking, messages=HI, stream=True))
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]


def test_thinking_on_vllm_is_its_reasoning_content(client, vllm):
    vllm.behavior = Behavior(reply="42", thinking="Six times seven.")
    thinking = {"type": "enabled", "budget_tokens": 16384}  # at 16k a long think
    message = client.messages.create(model="qwen-chat", max_tokens=20000, thinking=thinking, messages=HI)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "Six times seven."),
        ("text", "42"),
    ]
    assert last_body(vllm, "/v1/chat/completions")["reasoning_effort"] == "high"
    with client.messages.stream(model="qwen-chat", max_tokens=20000, thinking=thinking, messages=HI) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == "Six times seven." and final.content[1].text == "42"


def test_beta_client_paths_work(client):
    message = client.beta.messages.create(model="chat", max_tokens=20, messages=HI)
    assert message.content[0].text == "You said: Hi"
    assert client.beta.messages.count_tokens(model="chat", messages=HI).input_tokens == 1


def test_thinking_disabled_turns_the_model_s_reasoning_off(client, ollama):
    ollama.behavior = Behavior(reply="42", thinking="Six times seven.")
    message = client.messages.create(model="thinker", max_tokens=100, thinking={"type": "disabled"}, messages=HI)
    assert [b.type for b in message.content] == ["text"]
    assert last_body(ollama, "/api/chat")["think"] is False


# --- errors -----------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=10, messages=HI)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in info.value.body["error"]["message"]
    assert info.value.request_id == info.value.response.headers["x-request-id"]


@pytest.mark.parametrize("change,message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role: Input should be 'user' or 'assistant'"),
    ({"extra_body": {"top_k": "many"}}, "top_k: Input should be an integer, got a string"),
    ({"extra_body": {"temperature": 1.5}}, "temperature: Input should be between 0 and 1"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages.0.content.0.type: 'document' blocks are not supported"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking.budget_tokens: Input should be greater"),
    ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, "tool_choice.name: no tool named 'nope'"),
])  # fmt: skip
def test_bad_fields_are_bad_requests(client, change, message):
    body = {"model": "chat", "max_tokens": 10, "messages": HI, **change}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**body)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert info.value.body["error"]["message"].startswith(message)


def test_unknown_field_is_refused_by_name(proxy):
    body = {"model": "chat", "max_tokens": 10, "messages": HI, "colour": "blue"}
    resp = httpx.post(f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": PROXY_KEY})
    assert resp.status_code == 400
    assert resp.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "colour: Extra inputs are not permitted"},
        "request_id": resp.headers["x-request-id"],
    }


def test_required_fields(proxy):
    for body, message in (({"model": "chat", "messages": HI}, "max_tokens: Field required"),
                          ({"max_tokens": 5, "messages": HI}, "model: Field required"),
                          ({"model": "chat", "max_tokens": 5}, "messages: Field required")):  # fmt: skip
        resp = httpx.post(f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": PROXY_KEY})
        assert resp.status_code == 400 and resp.json()["error"]["message"] == message


def test_not_json_is_a_bad_request(proxy):
    resp = httpx.post(f"{proxy.url}/v1/messages", content=b"{nope", headers={"x-api-key": PROXY_KEY})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_keys_by_header_or_bearer(proxy):
    with anthropic.Anthropic(base_url=proxy.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model="chat", max_tokens=10, messages=HI)
    assert info.value.body["error"]["type"] == "authentication_error"
    with anthropic.Anthropic(base_url=proxy.url, auth_token=PROXY_KEY, max_retries=0) as bearer:
        assert bearer.messages.create(model="chat", max_tokens=10, messages=HI).content
    resp = httpx.post(f"{proxy.url}/v1/messages", json={"model": "chat", "max_tokens": 10, "messages": HI})
    assert resp.status_code == 401 and "x-api-key" in resp.json()["error"]["message"]
    # The OpenAI endpoints keep taking only the bearer header.
    resp = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": HI},
                      headers={"x-api-key": PROXY_KEY})  # fmt: skip
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_backend_down_before_the_first_byte(client, ollama):
    ollama.behavior = Behavior(fail="http_500")
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="chat", max_tokens=10, messages=HI)
    assert info.value.status_code == 502 and info.value.body["error"]["type"] == "api_error"


def test_failure_mid_stream_is_an_error_event(client, proxy, ollama):
    ollama.behavior = Behavior(reply="one two three four five six", fail="error_mid_stream", fail_after_chunks=2)
    texts = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(model="chat", max_tokens=100, messages=HI) as stream:
            for text in stream.text_stream:
                texts.append(text)
    assert texts  # the stream had started: the error came as an event, after some text
    assert info.value.status_code == 200  # ... so the SDK sees the stream's status
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "api_error"
    entry = row(proxy, info.value.response.headers["x-request-id"])
    assert entry["endpoint"] == "/v1/messages" and entry["status"] == "error"


def test_wrong_method_is_anthropic_shaped(proxy):
    resp = httpx.get(f"{proxy.url}/v1/messages", headers={"x-api-key": PROXY_KEY})
    assert resp.status_code == 405 and resp.json()["type"] == "error"


# --- count_tokens -----------------------------------------------------------------------------


def test_count_tokens(client, proxy):
    messages = [{"role": "user", "content": "x" * 40}]
    raw = client.messages.with_raw_response.count_tokens(model="chat", system="y" * 20, messages=messages)
    assert raw.parse().input_tokens == 15  # (40 + 20) / 4
    assert raw.headers["x-proxy-token-estimate"] == "chars/4"
    with_tool = client.messages.count_tokens(model="chat", messages=messages, tools=[WEATHER])
    assert with_tool.input_tokens > 10
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=messages)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="chat", messages=[])


# --- the rest of the proxy, the same as for OpenAI -------------------------------------------


def test_history_row(client, proxy):
    raw = client.messages.with_raw_response.create(model="chat", max_tokens=50, messages=HI)
    entry = row(proxy, raw.headers["x-request-id"])
    assert entry["endpoint"] == "/v1/messages" and entry["status"] == "ok" and entry["http_status"] == 200
    assert entry["requested_model"] == "chat" and entry["resolved_model"] == "llama3.1:8b"
    assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
    assert entry["key_id"] and PROXY_KEY not in str(entry)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope", max_tokens=10, messages=HI)
    failed = row(proxy, info.value.response.headers["x-request-id"])
    assert failed["endpoint"] == "/v1/messages" and failed["http_status"] == 404


def test_streamed_history_row_has_tokens(client, proxy):
    with client.messages.with_streaming_response.create(model="qwen-chat", max_tokens=50, messages=HI,
                                                        stream=True) as resp:  # fmt: skip
        request_id = resp.headers["x-request-id"]
        list(resp.iter_lines())
    entry = row(proxy, request_id)
    assert entry["endpoint"] == "/v1/messages" and entry["stream"] is True and entry["status"] == "ok"
    assert entry["completion_tokens"] > 0


def test_a_client_that_leaves_stops_the_backend(proxy, ollama):
    ollama.behavior = Behavior(reply="word " * 200, tokens_per_second=50)
    body = {"model": "chat", "max_tokens": 500, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": PROXY_KEY}) as resp:
        request_id = resp.headers["x-request-id"]
        chunks = resp.iter_raw()  # kept: dropping the iterator would close the response
        assert b"message_start" in next(chunks)
    assert wait_for(lambda: ollama.cancelled == 1)
    assert row(proxy, request_id)["status"] == "cancelled"


def test_metrics_label_the_endpoint(client, proxy):
    client.messages.create(model="chat", max_tokens=10, messages=HI)
    text = httpx.get(f"{proxy.url}/metrics").text
    assert 'endpoint="/v1/messages"' in text


def test_cache_is_shared_with_the_openai_endpoint(client, proxy, ollama):
    ollama.behavior = Behavior(reply="cached answer")
    question = [{"role": "user", "content": "A question worth caching"}]
    zero = {"extra_body": {"temperature": 0}}
    first = client.messages.with_raw_response.create(model="chat", max_tokens=30, messages=question, **zero)
    assert first.headers["x-cache"] == "MISS"
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=PROXY_KEY, max_retries=0) as oai:
        again = oai.chat.completions.with_raw_response.create(model="chat", max_tokens=30, temperature=0,
                                                              messages=question)  # fmt: skip
    assert again.headers["x-cache"] == "HIT"
    assert again.parse().choices[0].message.content == "cached answer"
    with client.messages.with_streaming_response.create(model="chat", max_tokens=30, messages=question,
                                                        stream=True, **zero) as resp:  # fmt: skip
        assert resp.headers["x-cache"] == "HIT"
        lines = list(resp.iter_lines())
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "message_stop"
    assert "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta") == "cached answer"
    with client.messages.stream(model="chat", max_tokens=30, messages=question, **zero) as stream:
        assert stream.get_final_message().content[0].text == "cached answer"
    chats = [p for _m, p, _b, _h in ollama.requests if p == "/api/chat"]
    assert len(chats) == 1  # one backend call for all four
