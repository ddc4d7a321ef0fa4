"""Every failure answers in OpenAI's error shape with the right status, and nothing hangs."""

from __future__ import annotations


import httpx
import openai
import orjson
import pytest

from proxy.sim import Behavior, SimOllama
from tests.support import PROXY_KEY, ollama_models, reset_health, running_proxy, wait_for

MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(resp: httpx.Response, status: int, *, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# --- the client's mistakes ----------------------------------------------------------------------


def test_malformed_json_is_400(proxy):
    resp = httpx.post(f"{proxy.url}/v1/chat/completions", content=b'{"model": "chat", "messages": [',
                      headers={"content-type": "application/json"})  # fmt: skip
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": MSG}, "model"),
        ({"model": "chat"}, "messages"),
        ({"model": "chat", "messages": []}, "messages"),
        ({"model": "chat", "messages": "hi"}, "messages"),
        ({"model": 7, "messages": MSG}, "model"),
        ({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "chat", "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": "chat", "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": "chat", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "chat", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "chat", "messages": MSG, "stop": [1, 2]}, "stop[0]"),
        ({"model": "chat", "messages": MSG, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": "chat", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "chat", "messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_chat_fields_name_the_param(proxy, body, param):
    resp = httpx.post(f"{proxy.url}/v1/chat/completions", json=body)
    assert_openai_error(resp, 400, param=param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "embed"}, "input"),
        ({"model": "embed", "input": []}, "input"),
        ({"model": "embed", "input": 5}, "input"),
        ({"model": "embed", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "embed", "input": [[1, 2, 3]]}, "input"),  # token arrays: not on Ollama
    ],
)
def test_invalid_embedding_requests(proxy, body, param):
    assert_openai_error(httpx.post(f"{proxy.url}/v1/embeddings", json=body), 400, param=param)


def test_body_not_an_object_is_400(proxy):
    assert_openai_error(httpx.post(f"{proxy.url}/v1/chat/completions", json=[1, 2]), 400)


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17-ultra", messages=MSG)
    error = info.value.body
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-17-ultra" in error["message"]
    assert "chat" in error["message"]  # says what is available instead


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"n": 2}, "n"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"some_future_field": 1}, "some_future_field"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_parameters_ollama_cannot_honour_are_refused(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=MSG, extra_body=extra)
    assert info.value.body["param"] == param
    assert info.value.body["code"] == "unsupported_parameter"


def test_http_image_url_is_refused_for_ollama(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="llava:7b",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        )
    assert info.value.body["param"] == "messages[0].content[0].image_url"


def test_invalid_tool_call_arguments_are_400(client):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=messages)
    assert info.value.body["param"] == "messages[1].tool_calls[0].function.arguments"


def test_unknown_path_and_method(proxy):
    assert_openai_error(httpx.get(f"{proxy.url}/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{proxy.url}/v1/chat/completions"), 405)


def test_backend_400_is_mapped_with_param(client, ollama):
    # llama3.1 on the sim has no "thinking" capability: Ollama answers 400, the client gets a clean 400.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=MSG, reasoning_effort="high")
    body = info.value.body
    assert body["type"] == "invalid_request_error"
    assert body["param"] == "reasoning_effort"
    assert "ollama-1" in body["message"]


def test_backend_500_is_502_and_body_is_not_leaked_raw(client, ollama):
    ollama.behavior = Behavior(fail="http_500")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="chat", messages=MSG)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "backend_error"
    assert set(info.value.body) == {"message", "type", "param", "code"}


def test_backend_busy_is_503(client, ollama):
    ollama.behavior = Behavior(fail="busy")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="chat", messages=MSG)
    assert info.value.status_code == 503
    assert "busy" in info.value.body["message"]


def test_backend_404_becomes_model_not_found(client, vllm):
    vllm.behavior = Behavior(fail="not_found")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="qwen-chat", messages=MSG)
    assert info.value.body["code"] == "model_not_found"
    assert "vllm-1" in info.value.body["message"]  # names the backend that lacks it


# --- failures mid-stream and disconnects --------------------------------------------------------


@pytest.mark.parametrize("sim_name,model", [("ollama", "chat"), ("vllm", "qwen-chat")])
@pytest.mark.parametrize("mode", ["die_mid_stream", "error_mid_stream"])
def test_failure_after_stream_started_ends_with_error_event(proxy, request, sim_name, model, mode):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(reply="one two three four five six", fail=mode, fail_after_chunks=2)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions",
                      json={"model": model, "messages": MSG, "stream": True}, timeout=10) as resp:  # fmt: skip
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    # vLLM reports its own failure in-band and then sends [DONE]; otherwise the proxy's error event ends it
    if not (mode == "error_mid_stream" and sim_name == "vllm"):
        assert events[-1] != "[DONE]"
    errors = [orjson.loads(e)["error"] for e in events if e != "[DONE]" and "error" in orjson.loads(e)]
    assert len(errors) == 1
    assert errors[0]["message"]
    content = [orjson.loads(e) for e in events if e != "[DONE]" and "choices" in orjson.loads(e)]
    assert len(content) >= 2  # what was generated before the failure did reach the client


def test_sdk_raises_on_mid_stream_error(client, ollama):
    ollama.behavior = Behavior(reply="one two three four", fail="die_mid_stream", fail_after_chunks=2)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="chat", messages=MSG, stream=True):
            pass


@pytest.mark.parametrize("sim_name,model", [("ollama", "chat"), ("vllm", "qwen-chat")])
def test_client_disconnect_cancels_upstream_stream(proxy, request, sim_name, model):
    sim = request.getfixturevalue(sim_name)
    sim.behavior = Behavior(reply=" ".join(["word"] * 200), tokens_per_second=20)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions",
                      json={"model": model, "messages": MSG, "stream": True}, timeout=10) as resp:  # fmt: skip
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    # The client is gone: the backend must stop generating, not finish 200 tokens for nobody.
    assert wait_for(lambda: sim.cancelled == 1), sim.stats()
    assert sim.completed == 0
    assert wait_for(lambda: sim.active == 0)


def test_client_disconnect_cancels_upstream_non_stream(proxy, ollama):
    ollama.behavior = Behavior(ttft=5.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": MSG}, timeout=0.5)
    assert wait_for(lambda: ollama.cancelled == 1), ollama.stats()
    assert ollama.completed == 0


# --- unreachable and slow backends, with a proxy of short timeouts ------------------------------


@pytest.fixture(scope="module")
def _slow_setup():
    with SimOllama(models=ollama_models()) as sim:
        config = {
            "timeouts": {"connect": 1, "first_byte": 0.5, "idle": 0.4},
            "backends": [
                {"name": "slow", "kind": "ollama", "url": sim.url},
                {"name": "dead", "kind": "ollama", "url": "http://127.0.0.1:9"},
            ],
            "models": [
                {"name": "chat", "target": "llama3.1:8b", "backends": ["slow"]},
                {"name": "nowhere", "target": "llama3.1:8b", "backends": ["dead"]},
            ],
        }
        with running_proxy(config) as server:
            yield server, sim


@pytest.fixture
def slow_setup(_slow_setup):
    """The slow setup with a well-behaved node and no learned health, restored even when a test fails."""
    server, sim = _slow_setup
    sim.behavior = Behavior()
    sim.reset()
    reset_health(server)
    try:
        yield server, sim
    finally:
        sim.behavior = Behavior()


def test_unreachable_backend_is_503(slow_setup):
    server, _ = slow_setup
    resp = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nowhere", "messages": MSG})
    error = assert_openai_error(resp, 503, code="backend_unavailable")
    assert "dead" in error["message"]


def test_first_byte_timeout_is_504(slow_setup):
    server, sim = slow_setup
    sim.behavior = Behavior(ttft=3.0)
    # The node would answer after 3 s and the client waits 10: a 504 can only be the proxy giving up.
    resp = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": MSG}, timeout=10)
    assert_openai_error(resp, 504, code="backend_timeout")


def test_hung_backend_is_504_not_a_hang(slow_setup):
    server, sim = slow_setup
    sim.behavior = Behavior(fail="hang")
    resp = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "chat", "messages": MSG, "stream": True}, timeout=10)  # fmt: skip
    assert_openai_error(resp, 504)


def test_idle_timeout_mid_stream_ends_with_error_event(slow_setup):
    server, sim = slow_setup
    sim.behavior = Behavior(reply="a b c d e f", tokens_per_second=1.0)  # 1 s between tokens > idle 0.4 s
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={"model": "chat", "messages": MSG, "stream": True}, timeout=10) as resp:  # fmt: skip
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    last = orjson.loads(events[-1])
    assert last["error"]["code"] == "backend_timeout"


# --- limits and keys ----------------------------------------------------------------------------


def test_body_over_limit_is_413(ollama):
    config = {"server": {"max_body_bytes": 1000}, "backends": [{"name": "o", "kind": "ollama", "url": ollama.url}]}
    with running_proxy(config) as server:
        big = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", json=big), 413)

        def chunked():  # no content-length: the limit holds while reading
            yield b'{"model": "llama3.1:8b", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'

        resp = httpx.post(f"{server.url}/v1/chat/completions", content=chunked())
        assert_openai_error(resp, 413)


def test_api_keys_are_required_when_configured(ollama):
    config = {"server": {"api_keys": [PROXY_KEY, "second-key"]},
              "backends": [{"name": "o", "kind": "ollama", "url": ollama.url}]}  # fmt: skip
    with running_proxy(config) as server:
        base = f"{server.url}/v1"
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert_openai_error(httpx.get(f"{base}/models"), 401)
        for key in (PROXY_KEY, "second-key"):
            ok = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
            assert ok.chat.completions.create(model="llama3.1:8b", messages=MSG).choices[0].message.content
        assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open for probes
