"""The simulated vLLM node speaks vLLM's OpenAI-compatible protocol and fails on request."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.sim import Behavior, SimVLLM
from proxy.sim.__main__ import main as sim_main
from tests.support import wait_for

KEY = "test-key"
USER = [{"role": "user", "content": "one two three"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def sim():
    with SimVLLM(
        model="/models/Qwen2.5-7B-Instruct", served_model_names=["qwen", "qwen-alias"], api_key=KEY
    ) as running:
        yield running


@pytest.fixture(scope="module")
def embedder():
    with SimVLLM(model="BAAI/bge-base-en-v1.5", embedding=True) as running:
        yield running


@pytest.fixture
def api(sim):
    sim.behavior = Behavior()
    sim.reset()
    with httpx.Client(base_url=sim.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as client:
        yield client
    sim.behavior = Behavior()
    sim.supports_system_role = True


def events(response: httpx.Response) -> list:
    """Decoded SSE ``data:`` payloads; checks the framing on the way."""
    text = response.text
    assert text.endswith("\n\n")
    frames = text[:-2].split("\n\n")
    assert all(frame.startswith("data: ") for frame in frames)
    return [frame[6:] if frame == "data: [DONE]" else json.loads(frame[6:]) for frame in frames]


def chat(api: httpx.Client, **fields) -> httpx.Response:
    return api.post("/v1/chat/completions", json={"model": "qwen", "messages": USER, **fields})


# --------------------------------------------------------------------------- basic endpoints


def test_health_version_and_models(api):
    health = api.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    assert api.get("/version").json() == {"version": "0.11.0"}
    cards = api.get("/v1/models").json()
    assert cards["object"] == "list"
    assert [c["id"] for c in cards["data"]] == ["qwen", "qwen-alias"]
    card = cards["data"][0]
    assert (card["object"], card["owned_by"], card["root"], card["parent"], card["max_model_len"]) == (
        "model",
        "vllm",
        "/models/Qwen2.5-7B-Instruct",
        None,
        32768,
    )
    assert re.fullmatch(r"modelperm-[0-9a-f]{32}", card["permission"][0]["id"])


def test_api_key_guards_v1_only(sim):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.get(f"{sim.url}/v1/models", headers=headers)
        assert (denied.status_code, denied.json()) == (401, {"error": "Unauthorized"})
    assert httpx.get(f"{sim.url}/health").status_code == 200
    assert httpx.get(f"{sim.url}/version").status_code == 200
    assert httpx.get(f"{sim.url}/_sim/stats").status_code == 200


def test_unknown_path_is_fastapi_404(api):
    response = api.get("/v2/nothing")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


# --------------------------------------------------------------------------- chat


def test_chat_non_stream_has_model_dump_shape(api):
    body = chat(api, model="qwen-alias").json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert (body["object"], body["model"]) == ("chat.completion", "qwen-alias")
    for key in ("system_fingerprint", "prompt_logprobs", "kv_transfer_params"):
        assert key in body and body[key] is None
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None and choice["logprobs"] is None
    message = choice["message"]
    assert message["content"] == "You said: one two three"
    assert message["tool_calls"] == [] and message["reasoning_content"] is None and message["role"] == "assistant"
    usage = body["usage"]
    assert usage["prompt_tokens_details"] is None
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5


def test_model_may_be_omitted_but_not_unknown(api):
    omitted = api.post("/v1/chat/completions", json={"messages": USER}).json()
    assert omitted["model"] == "qwen"
    unknown = chat(api, model="foo")
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": {"message": "The model `foo` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}
    }


def test_validation_errors_are_nested_400(api):
    missing = api.post("/v1/chat/completions", json={"model": "qwen"})
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and "messages" in error["message"]
    wrong = chat(api, max_tokens="lots")
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == 400
    garbage = api.post("/v1/chat/completions", content=b"{nope")
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "BadRequestError"


def test_stream_sse_framing_and_finish_on_last_token(api):
    response = chat(api, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, done = events(response)
    assert done == "[DONE]"
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "system_fingerprint" not in c for c in chunks)
    first, *rest = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in rest) == "You said: one two three"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and "stop_reason" in last and last["delta"]["content"]
    assert not any("usage" in c for c in chunks)


def test_include_usage_adds_final_usage_chunk(api):
    *chunks, done = events(chat(api, stream=True, stream_options={"include_usage": True}))
    usage_chunk = chunks[-1]
    assert done == "[DONE]" and usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 5


def test_stream_options_need_stream(api):
    response = chat(api, stream_options={"include_usage": True})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Stream options can only be defined when `stream=True`."


def test_streamed_tool_calls_are_incremental(api, sim):
    sim.behavior.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]
    *chunks, done = events(chat(api, stream=True, tools=TOOLS))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
    header = deltas[0]["tool_calls"][0]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", header["id"])
    assert (header["index"], header["type"], header["function"]) == (
        0,
        "function",
        {"name": "get_weather", "arguments": ""},
    )
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert len(pieces) > 1 and all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:])
    assert json.loads("".join(pieces)) == {"city": "Paris", "days": 2}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and done == "[DONE]"


def test_non_stream_tool_calls_and_named_choice(api, sim):
    sim.behavior.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    choice = chat(api, tools=TOOLS).json()["choices"][0]
    call = choice["message"]["tool_calls"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    named = chat(api, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}).json()
    assert named["choices"][0]["finish_reason"] == "stop"
    none = chat(api, tools=TOOLS, tool_choice="none").json()["choices"][0]
    assert none["message"]["tool_calls"] == [] and none["message"]["content"]


def test_max_completion_tokens_wins_over_max_tokens(api):
    capped = chat(api, max_tokens=10, max_completion_tokens=2).json()["choices"][0]
    assert (capped["message"]["content"], capped["finish_reason"]) == ("You said:", "length")
    *chunks, _ = events(chat(api, stream=True, max_tokens=3))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chat(api, max_tokens=0).status_code == 400


def test_stop_strings_report_stop_reason(api):
    choice = chat(api, stop=[" two"]).json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"], choice["stop_reason"]) == (
        "You said: one",
        "stop",
        " two",
    )


def test_response_format_yields_json(api, sim):
    assert json.loads(chat(api, response_format={"type": "json_object"}).json()["choices"][0]["message"]["content"])[
        "ok"
    ]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
        "required": ["city", "temp"],
    }
    shaped = chat(api, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}).json()
    document = json.loads(shaped["choices"][0]["message"]["content"])
    assert isinstance(document["city"], str) and isinstance(document["temp"], float)
    sim.behavior.json_reply = {"answer": 42}
    assert json.loads(
        chat(api, response_format={"type": "json_object"}).json()["choices"][0]["message"]["content"]
    ) == {"answer": 42}


def test_reasoning_content_precedes_content(api, sim):
    sim.behavior.thinking = "considering options"
    *chunks, _ = events(chat(api, stream=True))
    kinds = [next(iter(c["choices"][0]["delta"])) for c in chunks[1:]]
    assert kinds == ["reasoning_content"] * 2 + ["content"] * 5
    message = chat(api).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "considering options" and message["content"] == "You said: one two three"
    off = chat(api, chat_template_kwargs={"enable_thinking": False}).json()["choices"][0]["message"]
    assert off["reasoning_content"] is None


def test_logprobs(api):
    logprobs = chat(api, logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in logprobs] == ["You", " said:", " one", " two", " three"]
    assert all(len(entry["top_logprobs"]) == 2 and entry["logprob"] <= 0 for entry in logprobs)
    refused = chat(api, top_logprobs=2)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "when using `top_logprobs`, `logprobs` must be set to true."


def test_system_role_rejected_when_template_lacks_it(api, sim):
    system = [{"role": "system", "content": "be brief"}, *USER]
    assert chat(api, messages=system).status_code == 200
    sim.supports_system_role = False
    refused = chat(api, messages=system)
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "message": "System role not supported",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


def test_context_length_is_enforced(api):
    response = chat(api, max_tokens=40000)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("This model's maximum context length is 32768 tokens.")


def test_n_returns_identical_choices(api):
    choices = chat(api, n=2).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["message"] == choices[1]["message"]


# --------------------------------------------------------------------------- completions


def test_completions_one_choice_per_prompt(api):
    body = api.post("/v1/completions", json={"model": "qwen", "prompt": ["alpha beta", "gamma"]}).json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"]) and body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["You said: alpha beta", "You said: gamma"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 4 + 3


def test_completions_default_to_16_tokens(api, sim):
    sim.behavior.reply = " ".join(["word"] * 30)
    choice = api.post("/v1/completions", json={"prompt": "go"}).json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 16


def test_completions_stream_text_deltas(api):
    *chunks, done = events(
        api.post("/v1/completions", json={"prompt": "hello", "stream": True, "stream_options": {"include_usage": True}})
    )
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "You said: hello" and done == "[DONE]"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


# --------------------------------------------------------------------------- embeddings


def test_embeddings_float_and_base64(embedder):
    url = f"{embedder.url}/v1/embeddings"
    floats = httpx.post(url, json={"input": ["alpha", "beta"]}).json()
    assert floats["object"] == "list" and re.fullmatch(r"embd-[0-9a-f]+", floats["id"])
    assert floats["model"] == "BAAI/bge-base-en-v1.5"
    first, second = (d["embedding"] for d in floats["data"])
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["data"][0]["object"] == "embedding"
    assert len(first) == 768 and math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-5) and first != second
    assert floats["usage"]["completion_tokens"] == 0 and floats["usage"]["prompt_tokens_details"] is None
    encoded = httpx.post(url, json={"input": "alpha", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == first


def test_embeddings_dimensions_and_token_input(embedder):
    url = f"{embedder.url}/v1/embeddings"
    short = httpx.post(url, json={"input": "alpha", "dimensions": 16}).json()["data"][0]["embedding"]
    assert len(short) == 16 and math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-5)
    tokens = httpx.post(url, json={"input": [[101, 2023, 102]]}).json()
    assert len(tokens["data"]) == 1 and tokens["usage"]["prompt_tokens"] == 3
    bad = httpx.post(url, json={"input": "x", "encoding_format": "hex"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400


def test_embeddings_refused_by_chat_model(api):
    refused = api.post("/v1/embeddings", json={"input": "x"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "The model does not support Embeddings API"


# --------------------------------------------------------------------------- failure modes


def test_http_500_busy_and_not_found_use_nested_errors(api, sim):
    sim.behavior.fail = "http_500"
    failed = chat(api)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "InternalServerError"
    assert failed.json()["error"]["code"] == 500
    sim.behavior.fail = "busy"
    assert chat(api).status_code == 503
    sim.behavior.fail = "not_found"
    gone = chat(api, model="qwen-alias")
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "The model `qwen-alias` does not exist."


def test_fail_times_counts_down(api, sim):
    sim.behavior = Behavior(fail="busy", fail_times=1)
    assert [chat(api).status_code for _ in range(2)] == [503, 200]


def test_die_mid_stream_drops_connection_without_done(api, sim):
    sim.behavior = Behavior(fail="die_mid_stream", fail_after_chunks=2)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with api.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    received.append(line)
    assert len(received) == 3  # the role chunk plus two content chunks
    assert "data: [DONE]" not in received
    with pytest.raises(httpx.RemoteProtocolError):
        chat(api)


def test_error_mid_stream_sends_error_event_then_done(api, sim):
    sim.behavior = Behavior(fail="error_mid_stream", fail_after_chunks=1)
    *chunks, error, done = events(chat(api, stream=True))
    assert len(chunks) == 2 and done == "[DONE]"
    assert error["error"]["type"] == "InternalServerError" and error["error"]["code"] == 500
    assert chat(api).status_code == 500


def test_hang_is_cancelled_when_client_gives_up(api, sim):
    sim.behavior.fail = "hang"
    with pytest.raises(httpx.ReadTimeout):
        api.post("/v1/chat/completions", json={"messages": USER, "stream": True}, timeout=0.2)
    assert wait_for(lambda: sim.cancelled == 1 and sim.active == 0)


# --------------------------------------------------------------------------- pacing and disconnects


def test_ttft_delays_the_reply(api, sim):
    sim.behavior = Behavior(ttft=0.3)
    started = time.monotonic()
    chat(api)
    assert time.monotonic() - started >= 0.3


def test_disconnect_mid_stream_is_counted_and_stops_generation(api, sim):
    sim.behavior = Behavior(reply=" ".join(["word"] * 30), tokens_per_second=10)
    with api.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as response:
        lines = response.iter_lines()
        next(lines), next(lines)
    assert wait_for(lambda: sim.cancelled == 1, timeout=1.0)
    assert sim.active == 0 and sim.completed == 0


def test_stop_and_start_again():
    node = SimVLLM().start()
    try:
        node.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{node.url}/health", timeout=1)
        node.start()
        assert httpx.get(f"{node.url}/health", timeout=1).status_code == 200
    finally:
        node.stop()


# --------------------------------------------------------------------------- control plane


def test_control_plane(api, sim):
    patched = httpx.patch(f"{sim.url}/_sim/behavior", json={"reply": "Remote.", "ttft": 0.0})
    assert patched.status_code == 200 and patched.json()["reply"] == "Remote."
    assert chat(api).json()["choices"][0]["message"]["content"] == "Remote."
    assert httpx.get(f"{sim.url}/_sim/behavior").json()["reply"] == "Remote."
    stats = httpx.get(f"{sim.url}/_sim/stats").json()
    assert stats == {"active": 0, "max_active": 1, "cancelled": 0, "completed": 1, "failed": 0, "requests": 1}
    method, path, body, headers = sim.requests[-1]
    assert (method, path, body["model"], headers["authorization"]) == (
        "POST",
        "/v1/chat/completions",
        "qwen",
        f"Bearer {KEY}",
    )


# --------------------------------------------------------------------------- restarting onto another model


@pytest.fixture
def node():
    """A vLLM sim of its own: restarts take it down."""
    running = SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen"]).start()
    yield running
    running.stop()


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=0.5)
    except httpx.ConnectError:
        return True
    return False


def test_restart_answers_then_goes_down_and_comes_back_with_the_new_model(node):
    port = node.port
    answer = httpx.post(
        f"{node.url}/_sim/restart",
        json={"model": "meta-llama/Llama-3.1-8B-Instruct", "served_model_name": "llama", "downtime": 0.2},
    )
    assert answer.status_code == 202  # answered in full before the socket closed
    assert answer.json() == {
        "status": "restarting",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "served_model_names": ["llama"],
        "downtime": 0.2,
        "outcome": "ok",
    }
    assert node.restarting and node.restarts == 1
    assert wait_for(lambda: refused(node.url), timeout=1.0)  # connections refused, like a process that exited
    assert node.wait_restarted(timeout=3.0)
    assert node.port == port and httpx.get(f"{node.url}/health").status_code == 200
    card = httpx.get(f"{node.url}/v1/models").json()["data"]
    assert [(c["id"], c["root"]) for c in card] == [("llama", "meta-llama/Llama-3.1-8B-Instruct")]
    old = httpx.post(f"{node.url}/v1/chat/completions", json={"model": "qwen", "messages": USER})
    assert old.status_code == 404
    assert httpx.post(f"{node.url}/v1/chat/completions", json={"model": "llama", "messages": USER}).status_code == 200


def test_restart_outcomes_old_model_and_never(node):
    node.restart("meta-llama/Llama-3.1-8B-Instruct", downtime=0.1, outcome="old_model")
    assert node.wait_restarted(timeout=3.0)
    assert [c["id"] for c in httpx.get(f"{node.url}/v1/models").json()["data"]] == ["qwen"]
    node.restart("other/model", downtime=0, outcome="never")
    assert wait_for(lambda: not node.restarting, timeout=2.0)  # the restart is over: nothing will bind again
    assert not node.wait_restarted(timeout=0.1)  # finished, but not serving
    assert refused(node.url)


def test_restart_cuts_streams_in_flight(node):
    node.behavior = Behavior(tokens_per_second=10)
    long = [{"role": "user", "content": " ".join(["word"] * 30)}]
    with httpx.stream(
        "POST", f"{node.url}/v1/chat/completions", json={"model": "qwen", "messages": long, "stream": True}
    ) as response:
        lines = response.iter_lines()
        next(lines)
        node.restart(downtime=0.1)
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in lines:
                pass
    assert node.wait_restarted(timeout=3.0)
    assert [c["id"] for c in httpx.get(f"{node.url}/v1/models").json()["data"]] == ["qwen"]  # a plain restart


def test_restart_validation_and_one_at_a_time(node):
    for body, message in (
        ({"outcome": "maybe"}, "outcome must be one of ok, never, old_model"),
        ({"model": ""}, "model must be a non-empty string"),
        ({"downtime": -1}, "downtime must be a non-negative number of seconds"),
        ({"served_model_name": [1]}, "served_model_name must be a name or a list of names"),
        ({"colour": "red"}, "unknown restart field(s): colour"),
    ):
        response = httpx.post(f"{node.url}/_sim/restart", json=body)
        assert (response.status_code, response.json()) == (400, {"error": message})
    assert not node.restarting and node.restarts == 0
    node.restart(downtime=0.3)
    with pytest.raises(RuntimeError, match="already under way"):
        node.restart(downtime=0.3)


def test_stop_abandons_a_restart_in_its_downtime(node):
    node.restart("meta-llama/Llama-3.1-8B-Instruct", downtime=0.2)
    assert wait_for(lambda: refused(node.url), timeout=1.0)
    node.stop()
    assert wait_for(lambda: not node.restarting, timeout=2.0)  # the abandoned restart has ended ...
    assert refused(node.url)  # ... without bringing the node back
    node.start()  # and the node can still be started by hand, with the model it had
    assert [c["id"] for c in httpx.get(f"{node.url}/v1/models").json()["data"]] == ["qwen"]


def test_switch_command_triggers_a_restart_and_exits_at_once(node):
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.sim",
            "switch",
            "--url",
            node.url,
            "meta-llama/Llama-3.1-8B-Instruct",
            "--served-model-name",
            "llama",
            "--downtime",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert node.restarting  # it did not wait for the node to come back
    assert node.wait_restarted(timeout=5.0)
    assert time.monotonic() - started >= 0.3
    assert [c["id"] for c in httpx.get(f"{node.url}/v1/models").json()["data"]] == ["llama"]


def test_switch_command_fails_when_the_simulator_is_unreachable(node, capsys):
    url = node.url
    node.stop()
    assert sim_main(["switch", "--url", url, "some/model", "--timeout", "1"]) == 1
    assert f"cannot reach the vLLM simulator at {url}" in capsys.readouterr().err
    node.start()
    assert sim_main(["switch", "--url", url, "some/model", "--downtime", "-1"]) == 1
    assert "refused the switch (HTTP 400): downtime must be a non-negative number" in capsys.readouterr().err
    assert not node.restarting and node.restarts == 0
