"""The simulated Ollama node speaks Ollama's native protocol and fails on request."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from datetime import datetime

import httpx
import openai
import pytest

from proxy.sim import Behavior, ModelSpec, PullBehavior, SimOllama
from tests.support import wait_for

USER = [{"role": "user", "content": "one two three"}]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


@pytest.fixture(scope="module")
def sim():
    with SimOllama() as running:
        yield running


@pytest.fixture
def api(sim):
    """The shared sim with default behaviour, models and counters for each test."""
    models = list(sim.models)
    sim.behavior = Behavior()
    sim.reset()
    with httpx.Client(base_url=sim.url, timeout=5) as client:
        yield client
    sim.models[:] = models
    sim.behavior = Behavior()


def lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


# --------------------------------------------------------------------------- basic endpoints


def test_root_and_version(api):
    assert api.get("/").text == "Ollama is running"
    assert api.head("/").status_code == 200
    assert api.get("/api/version").json() == {"version": "0.12.3"}
    assert api.head("/api/version").status_code == 200


def test_tags_lists_installed_models_with_details(api):
    models = {m["name"]: m for m in api.get("/api/tags").json()["models"]}
    assert set(models) == {"llama3.1:8b", "qwen3:4b", "gemma3:1b", "nomic-embed-text:latest"}
    llama = models["llama3.1:8b"]
    assert llama["model"] == "llama3.1:8b"
    assert RFC3339.match(llama["modified_at"])
    assert re.fullmatch(r"[0-9a-f]{64}", llama["digest"])
    assert llama["size"] == 4_920_753_328
    assert llama["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "8.0B",
        "quantization_level": "Q4_K_M",
    }


def test_show_reports_capabilities_model_info_and_template(api):
    qwen = api.post("/api/show", json={"model": "qwen3:4b"}).json()
    assert qwen["capabilities"] == ["completion", "tools", "thinking"]
    assert qwen["model_info"]["general.architecture"] == "qwen3"
    assert qwen["model_info"]["qwen3.context_length"] == 40960
    assert "qwen3.embedding_length" in qwen["model_info"]
    assert ".System" in qwen["template"]
    assert {"modelfile", "parameters", "details", "modified_at"} <= set(qwen)
    gemma = api.post("/api/show", json={"name": "gemma3:1b"}).json()  # legacy field name
    assert ".System" not in gemma["template"]
    embed = api.post("/api/show", json={"model": "nomic-embed-text"}).json()
    assert embed["model_info"]["nomic-bert.embedding_length"] == 768


def test_show_errors(api):
    missing = api.post("/api/show", json={"model": "nope"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' not found"})
    assert api.post("/api/show", json={}).json() == {"error": "model is required"}


def test_unknown_path_is_gin_404(api):
    response = api.get("/api/nothing")
    assert (response.status_code, response.text) == (404, "404 page not found")


# --------------------------------------------------------------------------- chat


def test_chat_streams_ndjson_by_default(api):
    response = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER})
    assert response.headers["content-type"] == "application/x-ndjson"
    body = lines(response)
    *pieces, final = body
    assert all(p["done"] is False and p["message"]["role"] == "assistant" for p in pieces)
    assert all(RFC3339.match(p["created_at"]) for p in body)
    assert "".join(p["message"]["content"] for p in pieces) == "You said: one two three"
    assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
    assert final["eval_count"] == len(pieces) == 5
    assert final["prompt_eval_count"] == 3 + 4
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0


def test_chat_stream_false_returns_one_object(api):
    response = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False})
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "You said: one two three"}
    assert body["done"] is True and body["done_reason"] == "stop" and body["eval_count"] == 5
    assert body["model"] == "llama3.1:8b"


def test_model_names_resolve_latest_tag_and_are_echoed(api, sim):
    sim.models.append(ModelSpec("llama3.2"))
    for name in ("llama3.2", "llama3.2:latest", "library/llama3.2"):
        body = api.post("/api/chat", json={"model": name, "messages": USER, "stream": False}).json()
        assert body["model"] == name and body["done"] is True


def test_chat_request_errors(api):
    unknown = api.post("/api/chat", json={"model": "mystery", "messages": USER})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "model 'mystery' not found"})
    assert api.post("/api/chat", json={"messages": USER}).json() == {"error": "model is required"}
    bad = api.post("/api/chat", content=b"{not json")
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    empty = api.post("/api/chat", content=b"")
    assert (empty.status_code, empty.json()) == (400, {"error": "missing request body"})
    wrong_type = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": "hi"})
    assert wrong_type.status_code == 400 and "cannot unmarshal string" in wrong_type.json()["error"]


def test_num_predict_limits_tokens_with_length_reason(api):
    body = api.post(
        "/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False, "options": {"num_predict": 2}}
    ).json()
    assert body["message"]["content"] == "You said:"
    assert (body["done_reason"], body["eval_count"]) == ("length", 2)


def test_stop_option_cuts_reply(api):
    body = api.post(
        "/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False, "options": {"stop": [" two"]}}
    ).json()
    assert body["message"]["content"] == "You said: one"
    assert body["done_reason"] == "stop"


def test_canned_reply_and_roles_are_case_insensitive(api, sim):
    body = api.post(
        "/api/chat", json={"model": "llama3.1:8b", "stream": False, "messages": [{"role": "USER", "content": "shout"}]}
    ).json()
    assert body["message"]["content"] == "You said: shout"
    sim.behavior.reply = "Canned answer."
    assert (
        api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}).json()["message"][
            "content"
        ]
        == "Canned answer."
    )


def test_format_json_and_schema(api, sim):
    sim.behavior.json_reply = {"city": "Paris"}
    plain = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False, "format": "json"})
    assert json.loads(plain.json()["message"]["content"]) == {"city": "Paris"}
    sim.behavior.json_reply = None
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    shaped = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False, "format": schema})
    document = json.loads(shaped.json()["message"]["content"])
    assert set(document) == {"name", "age", "tags"} and isinstance(document["age"], int)


def test_thinking_model_thinks_by_default_and_first(api, sim):
    sim.behavior.thinking = "pondering deeply"
    body = lines(api.post("/api/chat", json={"model": "qwen3:4b", "messages": USER}))
    thinking = [b["message"]["thinking"] for b in body if b["message"].get("thinking")]
    assert "".join(thinking) == "pondering deeply"
    first_content = next(i for i, b in enumerate(body) if b["message"]["content"])
    assert all("thinking" in b["message"] for b in body[:first_content])
    off = api.post("/api/chat", json={"model": "qwen3:4b", "messages": USER, "stream": False, "think": False}).json()
    assert "thinking" not in off["message"]
    level = api.post("/api/chat", json={"model": "qwen3:4b", "messages": USER, "stream": False, "think": "high"})
    assert level.json()["message"]["thinking"] == "pondering deeply"


def test_think_errors(api):
    unsupported = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "think": True})
    assert (unsupported.status_code, unsupported.json()) == (400, {"error": '"llama3.1:8b" does not support thinking'})
    invalid = api.post("/api/chat", json={"model": "qwen3:4b", "messages": USER, "think": "extreme"})
    assert invalid.status_code == 400
    assert invalid.json()["error"].startswith('invalid think value: "extreme"')


def test_tools_on_model_without_tools_capability(api):
    response = api.post(
        "/api/chat",
        json={"model": "gemma3:1b", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
    )
    assert response.status_code == 400
    assert response.json()["error"].endswith("gemma3:1b does not support tools")


def test_tool_calls_stream_then_done(api, sim):
    sim.behavior.tool_calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
        {"name": "get_time", "arguments": {}},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    body = lines(api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "tools": tools}))
    calls = [c for b in body for c in b["message"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [c["function"]["index"] for c in calls] == [0, 1]
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", c["id"]) for c in calls)
    assert calls[0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert body[-1]["done"] is True and body[-1]["done_reason"] == "stop"
    whole = api.post(
        "/api/chat", json={"model": "llama3.1:8b", "messages": USER, "tools": tools, "stream": False}
    ).json()
    assert whole["message"]["content"] == "" and len(whole["message"]["tool_calls"]) == 2
    # Without tools in the request the scripted calls do not apply.
    plain = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}).json()
    assert "tool_calls" not in plain["message"] and plain["message"]["content"]


def test_logprobs_follow_ollama_layout(api):
    body = lines(
        api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "logprobs": True, "top_logprobs": 3})
    )
    piece = body[0]
    assert len(piece["logprobs"]) == 1
    entry = piece["logprobs"][0]
    assert entry["token"] == piece["message"]["content"]
    assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
    assert len(entry["top_logprobs"]) == 3
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    too_many = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "top_logprobs": 21})
    assert too_many.json() == {"error": "top_logprobs must be between 0 and 20"}


def test_empty_messages_load_and_keep_alive_zero_unloads(api):
    load = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": []}).json()
    assert (load["done"], load["done_reason"], load["message"]) == (True, "load", {"role": "assistant", "content": ""})
    assert "llama3.1:8b" in [m["name"] for m in api.get("/api/ps").json()["models"]]
    unload = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": [], "keep_alive": 0}).json()
    assert unload["done_reason"] == "unload"
    assert "llama3.1:8b" not in [m["name"] for m in api.get("/api/ps").json()["models"]]


def test_images_need_vision(api):
    image = [{"role": "user", "content": "what is this", "images": ["aGVsbG8="]}]
    refused = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": image})
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "this model is missing data required for image input",
    )
    assert api.post("/api/chat", json={"model": "gemma3:1b", "messages": image, "stream": False}).status_code == 200


def test_ps_lists_loaded_models(api):
    api.post("/api/chat", json={"model": "gemma3:1b", "messages": USER, "stream": False})
    loaded = {m["name"]: m for m in api.get("/api/ps").json()["models"]}
    gemma = loaded["gemma3:1b"]
    assert RFC3339.match(gemma["expires_at"])
    assert gemma["size_vram"] == gemma["size"] and gemma["context_length"] == 32768


# --------------------------------------------------------------------------- generate


def test_generate_streams_response_pieces_and_context(api):
    body = lines(api.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "hello there"}))
    *pieces, final = body
    assert "".join(p["response"] for p in pieces) == "You said: hello there"
    assert final["done"] is True and final["response"] == "" and final["done_reason"] == "stop"
    assert final["context"] and all(isinstance(t, int) for t in final["context"])
    raw = api.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "hi", "raw": True, "stream": False})
    assert "context" not in raw.json() and raw.json()["response"] == "You said: hi"


def test_generate_load_and_raw_conflicts(api):
    load = api.post("/api/generate", json={"model": "llama3.1:8b"}).json()
    assert (load["done_reason"], load["response"]) == ("load", "")
    conflict = api.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "x", "raw": True, "system": "s"})
    assert conflict.json() == {"error": "raw mode does not support template, system, or context"}
    missing = api.post("/api/generate", json={"model": "ghost", "prompt": "x"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'ghost' not found"})


# --------------------------------------------------------------------------- embeddings


def test_embed_vectors_are_normalised_and_deterministic(api):
    body = api.post("/api/embed", json={"model": "nomic-embed-text", "input": ["alpha", "beta", "alpha"]}).json()
    first, second, again = body["embeddings"]
    assert body["model"] == "nomic-embed-text" and body["prompt_eval_count"] > 0
    assert len(first) == 768
    assert math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-5)
    assert first == again and first != second
    single = api.post("/api/embed", json={"model": "nomic-embed-text", "input": "alpha"}).json()
    assert single["embeddings"] == [first]


def test_embed_dimensions_truncate_and_renormalise(api):
    full = api.post("/api/embed", json={"model": "nomic-embed-text", "input": "alpha"}).json()["embeddings"][0]
    short = api.post("/api/embed", json={"model": "nomic-embed-text", "input": "alpha", "dimensions": 8}).json()[
        "embeddings"
    ][0]
    assert len(short) == 8
    assert math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-5)
    norm = math.sqrt(sum(x * x for x in full[:8]))
    assert all(math.isclose(s, f / norm, rel_tol=1e-4) for s, f in zip(short, full))


def test_embed_edge_cases(api):
    assert api.post("/api/embed", json={"model": "nomic-embed-text", "input": []}).json() == {
        "model": "nomic-embed-text",
        "embeddings": [],
    }
    bad = api.post("/api/embed", json={"model": "nomic-embed-text", "input": ["ok", 3]})
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid input type"})
    chat_model = api.post("/api/embed", json={"model": "llama3.1:8b", "input": "x"})
    assert chat_model.status_code == 501
    assert chat_model.json() == {"error": "this model does not support embeddings"}


def test_legacy_embeddings_are_not_normalised(api):
    body = api.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": "alpha"}).json()
    assert len(body["embedding"]) == 768
    assert not math.isclose(sum(x * x for x in body["embedding"]), 1.0, rel_tol=1e-3)
    assert api.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": ""}).json() == {"embedding": []}


# --------------------------------------------------------------------------- model management


def test_pull_streams_progress_and_installs(api):
    body = lines(api.post("/api/pull", json={"model": "phi3:mini"}))
    statuses = [b["status"] for b in body]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    layer = next(b for b in body if b["status"].startswith("pulling ") and "digest" in b)
    assert layer["status"] == f"pulling {layer['digest'][7:19]}" and layer["total"] > 0
    assert "phi3:mini" in [m["name"] for m in api.get("/api/tags").json()["models"]]
    quiet = api.post("/api/pull", json={"model": "phi3:mini", "stream": False})
    assert quiet.json() == {"status": "success"}


def test_delete_removes_model(api, sim):
    deleted = api.request("DELETE", "/api/delete", json={"model": "gemma3:1b"})
    assert (deleted.status_code, deleted.content) == (200, b"")
    assert sim.find("gemma3:1b") is None
    again = api.request("DELETE", "/api/delete", json={"model": "gemma3:1b"})
    assert (again.status_code, again.json()) == (404, {"error": "model 'gemma3:1b' not found"})


# --------------------------------------------------------------------------- failure modes


def test_http_500_and_busy_and_not_found(api, sim):
    sim.behavior.fail = "http_500"
    failed = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER})
    assert failed.status_code == 500 and isinstance(failed.json()["error"], str)
    sim.behavior.fail = "busy"
    busy = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER})
    assert (busy.status_code, busy.json()) == (
        503,
        {"error": "server busy, please try again.  maximum pending requests exceeded"},
    )
    sim.behavior.fail = "not_found"
    gone = api.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "x"})
    assert (gone.status_code, gone.json()) == (404, {"error": "model 'llama3.1:8b' not found"})
    assert sim.completed == 0 and sim.failed == 3


def test_fail_times_counts_down(api, sim):
    sim.behavior = Behavior(fail="http_500", fail_times=2)
    codes = [
        api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}).status_code
        for _ in range(3)
    ]
    assert codes == [500, 500, 200]
    assert sim.behavior.fail_times == 0


def test_invalid_requests_do_not_consume_failures(api, sim):
    sim.behavior = Behavior(fail="http_500", fail_times=1)
    assert api.post("/api/chat", json={"model": "nope", "messages": USER}).status_code == 404
    assert api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER}).status_code == 500


def test_die_mid_stream_cuts_connection_after_n_lines(api, sim):
    sim.behavior = Behavior(fail="die_mid_stream", fail_after_chunks=2)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with api.stream("POST", "/api/chat", json={"model": "llama3.1:8b", "messages": USER}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                received.append(json.loads(line))
    assert len(received) == 2 and not any(r["done"] for r in received)
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False})


def test_error_mid_stream_sends_error_line_without_done(api, sim):
    sim.behavior = Behavior(fail="error_mid_stream", fail_after_chunks=1)
    response = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER})
    body = lines(response)
    assert response.status_code == 200 and len(body) == 2
    assert body[0]["done"] is False and set(body[1]) == {"error"}
    not_started = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False})
    assert not_started.status_code == 500 and "error" in not_started.json()


def test_hang_never_answers_and_counts_as_cancelled(api, sim):
    sim.behavior.fail = "hang"
    with pytest.raises(httpx.ReadTimeout):
        api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER}, timeout=0.2)
    assert wait_for(lambda: sim.cancelled == 1 and sim.active == 0)


# --------------------------------------------------------------------------- pacing and disconnects


def test_ttft_and_tokens_per_second_pace_the_reply(api, sim):
    sim.behavior = Behavior(ttft=0.3)
    started = time.monotonic()
    api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False})
    assert time.monotonic() - started >= 0.3
    sim.behavior = Behavior(tokens_per_second=20)  # 5 tokens -> 4 gaps of 50 ms
    started = time.monotonic()
    api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER})
    assert time.monotonic() - started >= 0.2


def test_client_disconnect_mid_stream_stops_generation(api, sim):
    sim.behavior = Behavior(tokens_per_second=10)
    many = [{"role": "user", "content": " ".join(["word"] * 30)}]  # ~3 s at 10 tokens/s
    with api.stream("POST", "/api/chat", json={"model": "llama3.1:8b", "messages": many}) as response:
        iterator = response.iter_lines()
        next(iterator), next(iterator)
    assert wait_for(lambda: sim.cancelled == 1, timeout=1.0)
    assert sim.active == 0 and sim.completed == 0


def test_client_disconnect_during_ttft_is_noticed(api, sim):
    sim.behavior = Behavior(ttft=5)
    with pytest.raises(httpx.ReadTimeout):
        api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}, timeout=0.2)
    assert wait_for(lambda: sim.cancelled == 1, timeout=1.0)
    assert sim.active == 0 and sim.completed == 0


def test_active_and_max_active_track_concurrency(api, sim):
    sim.behavior = Behavior(ttft=0.3)
    threads = [
        threading.Thread(
            target=httpx.post,
            args=(f"{sim.url}/api/chat",),
            kwargs={"json": {"model": "llama3.1:8b", "messages": USER}, "timeout": 5},
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: sim.active == 3, timeout=1.0)
    for thread in threads:
        thread.join()
    assert (sim.active, sim.max_active, sim.completed) == (0, 3, 3)


def test_stop_refuses_connections_and_start_rebinds_same_port():
    node = SimOllama().start()
    try:
        port = node.port
        node.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{node.url}/api/version", timeout=1)
        node.start()
        assert node.port == port
        assert httpx.get(f"{node.url}/api/version", timeout=1).status_code == 200
    finally:
        node.stop()


# --------------------------------------------------------------------------- recording and control plane


def test_requests_are_recorded_in_order(api, sim):
    api.get("/api/tags")
    api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER}, headers={"X-Trace": "abc"})
    api.get("/_sim/stats")  # control traffic is not recorded
    (m1, p1, b1, _), (m2, p2, b2, h2) = sim.requests
    assert (m1, p1, b1) == ("GET", "/api/tags", None)
    assert (m2, p2, b2["model"], h2["x-trace"]) == ("POST", "/api/chat", "llama3.1:8b", "abc")


def test_control_plane_reads_and_patches_behavior(api, sim):
    assert api.get("/_sim/behavior").json()["ttft"] == 0.0
    patched = api.patch("/_sim/behavior", json={"reply": "From afar.", "fail_after_chunks": 1})
    assert patched.status_code == 200 and patched.json()["reply"] == "From afar."
    assert sim.behavior.reply == "From afar."
    body = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}).json()
    assert body["message"]["content"] == "From afar."
    assert api.patch("/_sim/behavior", json={"fail": "explode"}).status_code == 400
    assert api.patch("/_sim/behavior", json={"nonsense": 1}).status_code == 400
    assert api.patch("/_sim/behavior", json={"fail_times": "twice"}).status_code == 400
    assert sim.behavior.fail is None
    stats = api.get("/_sim/stats").json()
    assert stats["completed"] == 1 and stats["active"] == 0 and stats["requests"] == 1


# --------------------------------------------------------------------------- OpenAI-compatible /v1 layer


@pytest.fixture
def oai(sim, api):
    """The real OpenAI SDK pointed at the sim's /v1 (no retries: they would hide status codes)."""
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="ollama", max_retries=0, timeout=5) as client:
        yield client


def sse(response: httpx.Response) -> list:
    """``data:`` payloads of an SSE body, checking the framing; ``[DONE]`` stays a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text[:-2].split("\n\n")
    assert response.text.endswith("\n\n") and all(f.startswith("data: ") for f in frames)
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


def settled(sim: SimOllama) -> None:
    """Start from zero counters: an earlier test's generation is counted just after its client is done."""
    assert wait_for(lambda: sim.active == 0)
    sim.reset()


def v1_chat(api: httpx.Client, **fields) -> httpx.Response:
    return api.post("/v1/chat/completions", json={"model": "llama3.1:8b", "messages": USER, **fields})


def test_v1_chat_non_stream_with_the_sdk(oai, sim):
    settled(sim)
    completion = oai.chat.completions.create(model="llama3.1:8b", messages=USER)
    assert re.fullmatch(r"chatcmpl-\d{1,3}", completion.id) and int(completion.id[9:]) < 999
    assert (completion.object, completion.model, completion.system_fingerprint) == (
        "chat.completion",
        "llama3.1:8b",
        "fp_ollama",
    )
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "You said: one two three",
        "stop",
    )
    # The same accounting as the native endpoint: 5 tokens out, 3 words + template overhead in.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        7,
        5,
        12,
    )
    assert wait_for(lambda: sim.completed == 1) and sim.requests[-1][1] == "/v1/chat/completions"


def test_v1_chat_stream_shape(api):
    frames = sse(v1_chat(api, stream=True, stream_options={"include_usage": True}))
    *chunks, finish, usage, done = frames
    assert done == "[DONE]"
    assert len({c["id"] for c in frames[:-1]}) == 1 and len({c["created"] for c in frames[:-1]}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["system_fingerprint"] == "fp_ollama" for c in frames[:-1])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "You"}  # the role rides only on the first chunk
    assert all(set(d) == {"content"} for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == "You said: one two three"
    assert all(c["choices"][0]["finish_reason"] is None and "logprobs" not in c["choices"][0] for c in chunks)
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    plain = sse(v1_chat(api, stream=True))
    assert plain[-1] == "[DONE]" and all("usage" not in c for c in plain[:-1])


def test_v1_chat_stream_with_the_sdk(oai):
    stream = oai.chat.completions.create(
        model="llama3.1:8b", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: one two three"
    assert chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_v1_reasoning_comes_first_and_reasoning_effort_maps_to_think(api, sim):
    sim.behavior.thinking = "pondering deeply"
    frames = sse(api.post("/v1/chat/completions", json={"model": "qwen3:4b", "messages": USER, "stream": True}))
    deltas = [f["choices"][0]["delta"] for f in frames[:-2]]
    assert deltas[0] == {"role": "assistant", "content": "", "reasoning": "pondering"}
    assert "".join(d.get("reasoning", "") for d in deltas) == "pondering deeply"
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning" in d for d in deltas[:first_content])
    whole = api.post("/v1/chat/completions", json={"model": "qwen3:4b", "messages": USER}).json()
    assert whole["choices"][0]["message"]["reasoning"] == "pondering deeply"  # not reasoning_content
    off = api.post("/v1/chat/completions", json={"model": "qwen3:4b", "messages": USER, "reasoning_effort": "none"})
    assert "reasoning" not in off.json()["choices"][0]["message"]
    refused = api.post(
        "/v1/chat/completions", json={"model": "llama3.1:8b", "messages": USER, "reasoning_effort": "high"}
    )
    assert (
        refused.status_code == 400 and refused.json()["error"]["message"] == '"llama3.1:8b" does not support thinking'
    )
    bad = api.post("/v1/chat/completions", json={"model": "qwen3:4b", "messages": USER, "reasoning_effort": "extreme"})
    assert bad.json()["error"] == {
        "message": "invalid reasoning value: 'extreme'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_v1_tool_calls(api, oai, sim):
    sim.behavior.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    frames = sse(v1_chat(api, tools=tools, stream=True))
    call_chunk, finish, done = frames
    call = call_chunk["choices"][0]["delta"]["tool_calls"][0]  # complete in one delta, unlike vLLM
    assert re.fullmatch(r"call_[a-z0-9]{8}", call["id"])
    assert (call["index"], call["type"], call["function"]["name"]) == (0, "function", "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert finish["choices"][0]["finish_reason"] == "tool_calls" and done == "[DONE]"
    completion = oai.chat.completions.create(model="llama3.1:8b", messages=USER, tools=tools)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and message.content == ""  # "" rather than null
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "c"}


def test_v1_request_translation_quirks(api, sim):
    capped = v1_chat(api, max_tokens=2).json()["choices"][0]
    assert (capped["message"]["content"], capped["finish_reason"]) == ("You said:", "length")
    ignored = v1_chat(api, max_completion_tokens=2).json()["choices"][0]  # Ollama does not read it
    assert ignored["message"]["content"] == "You said: one two three"
    stopped = v1_chat(api, stop=" two").json()["choices"][0]["message"]["content"]
    assert stopped == "You said: one"
    sim.behavior.json_reply = {"city": "Paris"}
    shaped = v1_chat(api, response_format={"type": "json_object"}).json()["choices"][0]["message"]["content"]
    assert json.loads(shaped) == {"city": "Paris"}
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
            ],
        }
    ]
    assert api.post("/v1/chat/completions", json={"model": "gemma3:1b", "messages": parts}).status_code == 200
    refused = api.post("/v1/chat/completions", json={"model": "llama3.1:8b", "messages": parts})
    assert refused.json()["error"]["message"] == "this model is missing data required for image input"


def test_v1_errors_are_openai_shaped(api, oai, sim):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="mystery", messages=USER)
    assert missing.value.body == {
        "message": "model 'mystery' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    cases = [
        ({"model": "llama3.1:8b", "messages": []}, "[] is too short - 'messages'"),
        ({"messages": USER}, "model is required"),
        (
            {"model": "llama3.1:8b", "messages": [{"role": "user", "content": 2}]},
            "invalid message content type: float64",
        ),
        (
            {
                "model": "llama3.1:8b",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/cat.png"}]}
                ],
            },
            "image URLs are not currently supported, please use base64 encoded data instead",
        ),
    ]
    for body, message in cases:
        response = api.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, body
        assert response.json() == {
            "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        }
    sim.behavior = Behavior(fail="busy", fail_times=1)
    with pytest.raises(openai.InternalServerError) as busy:
        oai.chat.completions.create(model="llama3.1:8b", messages=USER)
    assert busy.value.status_code == 503 and busy.value.body["type"] == "api_error"
    assert sim.behavior.fail_times == 0  # the /v1 request consumed the scripted failure like a native one


def test_v1_mid_stream_failures(api, sim):
    settled(sim)
    sim.behavior = Behavior(fail="die_mid_stream", fail_after_chunks=2)
    with pytest.raises(httpx.RemoteProtocolError):
        v1_chat(api, stream=True)
    # error_mid_stream: the native {"error"} line decodes as an empty chunk, then the stream just ends.
    sim.behavior = Behavior(fail="error_mid_stream", fail_after_chunks=1)
    response = v1_chat(api, stream=True)
    frames = [json.loads(f[6:]) for f in response.text.strip().split("\n\n")]
    assert response.status_code == 200 and len(frames) == 2
    assert frames[1]["choices"][0] == {"index": 0, "delta": {"content": ""}, "finish_reason": None}
    assert "[DONE]" not in response.text
    whole = v1_chat(api)
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "api_error"
    assert wait_for(lambda: sim.failed == 3 and sim.active == 0) and sim.completed == 0


def test_v1_and_native_pace_tokens_identically(api, sim):
    settled(sim)
    sim.behavior = Behavior(ttft=0.1, tokens_per_second=20)  # 5 tokens: 0.1 s + 4 gaps of 50 ms
    timings = {}
    for name, path, body in (
        ("native", "/api/chat", {"model": "llama3.1:8b", "messages": USER}),
        ("v1", "/v1/chat/completions", {"model": "llama3.1:8b", "messages": USER, "stream": True}),
    ):
        arrivals = []
        started = time.monotonic()
        with api.stream("POST", path, json=body) as response:
            for line in response.iter_lines():
                if line.strip() and "[DONE]" not in line:
                    arrivals.append(time.monotonic() - started)
        timings[name] = arrivals
    native, v1 = timings["native"], timings["v1"]
    assert len(native) == 6 and len(v1) == 6  # 5 pieces + the done line / the finish chunk
    assert native[0] >= 0.1 and v1[0] >= 0.1
    assert abs(native[-1] - v1[-1]) < 0.15 and min(native[-1], v1[-1]) >= 0.3
    assert wait_for(lambda: sim.completed == 2) and sim.max_active == 1


def test_v1_disconnect_is_counted_as_cancelled(api, sim):
    sim.behavior = Behavior(tokens_per_second=10)
    long = [{"role": "user", "content": " ".join(["word"] * 30)}]
    with api.stream(
        "POST", "/v1/chat/completions", json={"model": "llama3.1:8b", "messages": long, "stream": True}
    ) as response:
        next(response.iter_lines())
    assert wait_for(lambda: sim.cancelled == 1 and sim.active == 0, timeout=1.0)


def test_v1_completions(api, oai):
    completion = oai.completions.create(model="llama3.1:8b", prompt="hello there")
    assert re.fullmatch(r"cmpl-\d{1,3}", completion.id) and completion.object == "text_completion"
    assert (completion.choices[0].text, completion.choices[0].finish_reason) == ("You said: hello there", "stop")
    frames = sse(
        api.post(
            "/v1/completions",
            json={
                "model": "llama3.1:8b",
                "prompt": "hello there",
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    )
    *chunks, usage, done = frames
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert all(c["usage"] == zero for c in chunks)  # Ollama's quirk: zero usage on every chunk
    assert "".join(c["choices"][0]["text"] for c in chunks) == "You said: hello there"
    assert chunks[-1]["choices"][0] == {"text": "", "index": 0, "finish_reason": "stop"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4 and done == "[DONE]"
    bad_stop = api.post("/v1/completions", json={"model": "llama3.1:8b", "prompt": "x", "stop": [1, 2]})
    assert bad_stop.json()["error"]["message"] == "invalid type for 'stop' field: float64"


def test_v1_embeddings(api, oai):
    native = api.post("/api/embed", json={"model": "nomic-embed-text", "input": ["alpha", "beta"]}).json()
    result = oai.embeddings.create(model="nomic-embed-text", input=["alpha", "beta"])  # the SDK asks for base64
    assert [list(d.embedding) == pytest.approx(v, rel=1e-6) for d, v in zip(result.data, native["embeddings"])] == [
        True,
        True,
    ]
    assert result.model == "nomic-embed-text" and result.usage.prompt_tokens == native["prompt_eval_count"]
    floats = api.post(
        "/v1/embeddings", json={"model": "nomic-embed-text", "input": "alpha", "encoding_format": "FLOAT"}
    ).json()
    assert floats["data"] == [{"object": "embedding", "embedding": native["embeddings"][0], "index": 0}]
    assert floats["object"] == "list" and floats["usage"]["total_tokens"] == floats["usage"]["prompt_tokens"]
    bad = api.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": "x", "encoding_format": "hex"})
    assert (
        bad.json()["error"]["message"]
        == "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64']."
    )
    for empty in ({"model": "nomic-embed-text"}, {"model": "nomic-embed-text", "input": []}):
        assert api.post("/v1/embeddings", json=empty).json()["error"]["message"] == "invalid input"
    chat_model = api.post("/v1/embeddings", json={"model": "llama3.1:8b", "input": "x"})
    assert chat_model.status_code == 501 and chat_model.json()["error"]["type"] == "api_error"


def test_v1_models(api, oai, sim):
    listed = api.get("/v1/models").json()
    assert listed["object"] == "list"
    assert {m["id"] for m in listed["data"]} == {"llama3.1:8b", "qwen3:4b", "gemma3:1b", "nomic-embed-text:latest"}
    assert all(m["object"] == "model" and m["owned_by"] == "library" and m["created"] > 0 for m in listed["data"])
    model = oai.models.retrieve("llama3.1:8b")
    assert (model.id, model.owned_by) == ("llama3.1:8b", "library")
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("ghost")
    sim.models.clear()
    assert api.get("/v1/models").json() == {"object": "list", "data": None}


def test_v1_requests_load_the_model(api):
    api.post("/api/generate", json={"model": "gemma3:1b", "keep_alive": 0})
    assert "gemma3:1b" not in [m["name"] for m in api.get("/api/ps").json()["models"]]
    api.post("/v1/chat/completions", json={"model": "gemma3:1b", "messages": USER})
    assert "gemma3:1b" in [m["name"] for m in api.get("/api/ps").json()["models"]]


# --------------------------------------------------------------------------- /api/pull


def pull(api: httpx.Client, name: str, **fields) -> httpx.Response:
    return api.post("/api/pull", json={"model": name, **fields}, timeout=10)


def layer_lines(body: list[dict]) -> list[dict]:
    return [b for b in body if "digest" in b]


def test_pull_reports_each_layer_over_time_and_installs_at_the_end(api, sim):
    installed_midway = []
    started = time.monotonic()
    received: list[dict] = []
    with api.stream("POST", "/api/pull", json={"model": "phi3:mini"}) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        for line in response.iter_lines():
            received.append(json.loads(line))
            if len(received) == 4:
                installed_midway = [m["name"] for m in api.get("/api/tags").json()["models"]]
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5  # ~0.3 s by default, whatever the model's size
    statuses = [b["status"] for b in received]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = layer_lines(received)
    digests = list(dict.fromkeys(b["digest"] for b in layers))
    assert len(digests) == 5  # weights, template, license, params, config
    for line in layers:
        assert line["status"] == f"pulling {line['digest'][7:19]}" and re.fullmatch(
            r"sha256:[0-9a-f]{64}", line["digest"]
        )
    weights = [b for b in layers if b["digest"] == digests[0]]
    assert "completed" not in weights[0]  # omitted while 0
    progress = [b["completed"] for b in weights[1:]]
    assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] == weights[0]["total"]
    assert "phi3:mini" not in installed_midway
    tags = {m["name"]: m for m in api.get("/api/tags").json()["models"]}
    total = sum(next(b["total"] for b in layers if b["digest"] == d) for d in digests)
    assert tags["phi3:mini"]["size"] == total and tags["phi3:mini"]["digest"] == digests[0][7:]
    again = lines(pull(api, "phi3:mini"))  # already on disk: one full line per layer, no transfer
    assert [b.get("completed") for b in layer_lines(again)] == [b["total"] for b in layer_lines(again)]
    assert sim.stats()["pulls"] == {
        "started": 2,
        "completed": 2,
        "failed": 0,
        "cancelled": 0,
        "active": 0,
        "max_active": 1,
    }


def test_pull_speed_is_configurable(api, sim):
    speed = ModelSpec("x").size / 0.2  # guessed models are this size: about 0.2 s at this speed
    sim.behavior.pull = PullBehavior(bytes_per_second=speed, interval=0.05)
    started = time.monotonic()
    body = lines(pull(api, "speedy:1b"))
    assert body[-1] == {"status": "success"} and time.monotonic() - started >= 0.18
    first = layer_lines(body)[0]["digest"]
    weights = [b.get("completed", 0) for b in layer_lines(body) if b["digest"] == first]
    steps = {later - earlier for earlier, later in zip(weights, weights[1:-1])}
    assert steps == {int(speed * 0.05)}  # each 50 ms tick moved exactly that many bytes


def test_pull_error_midway_then_resume_where_it_stopped(api, sim):
    sim.behavior.pull = PullBehavior(seconds=0.1, fail="error", fail_at=0.5, fail_times=1)
    first = pull(api, "resumable:7b")
    body = lines(first)
    assert first.status_code == 200 and body[-1] == {"error": "max retries exceeded: unexpected EOF"}
    assert not any(b.get("status") == "success" for b in body)
    assert sim.find("resumable:7b") is None
    total = ModelSpec("x").size
    stopped_at = sim.pulled_bytes("resumable:7b")
    assert stopped_at == total // 2 and layer_lines(body)[-1]["completed"] == stopped_at
    assert sim.behavior.pull.fail_times == 0
    second = lines(pull(api, "resumable:7b"))
    assert layer_lines(second)[0]["completed"] == stopped_at  # picks up the partial blob
    assert second[-1] == {"status": "success"} and sim.find("resumable:7b") is not None
    pulls = sim.pull_stats()
    assert (pulls["started"], pulls["completed"], pulls["failed"]) == (2, 1, 1)


def test_pull_failures_without_streaming_and_dropped_connections(api, sim):
    sim.behavior.pull = PullBehavior(seconds=0.05, fail="error", fail_at=0.25, fail_message="disk full")
    quiet = pull(api, "quiet:1b", stream=False)
    assert (quiet.status_code, quiet.json()) == (500, {"error": "disk full"})
    sim.behavior.pull = PullBehavior(seconds=0.05, fail="drop", fail_at=0.75)
    with pytest.raises(httpx.RemoteProtocolError):
        pull(api, "quiet:1b")
    assert sim.pulled_bytes("quiet:1b") == int(0.75 * ModelSpec("x").size)
    sim.behavior.pull = PullBehavior(seconds=0.05)
    done = pull(api, "quiet:1b", stream=False)
    assert (done.status_code, done.json()) == (200, {"status": "success"})
    assert sim.pull_stats()["failed"] == 2


def test_pull_stalls(api, sim):
    sim.behavior.pull = PullBehavior(seconds=0.05, stall_at=0.5, stall_seconds=0.25)
    started = time.monotonic()
    body = lines(pull(api, "stalling:1b"))
    assert time.monotonic() - started >= 0.25
    half = ModelSpec("x").size // 2
    assert sum(1 for b in layer_lines(body) if b.get("completed") == half) >= 3  # the ticker repeats itself
    sim.behavior.pull = PullBehavior(seconds=0.05, stall_at=0.5, stall_seconds=0.25, stall_silent=True)
    gaps, last = [], None
    with api.stream("POST", "/api/pull", json={"model": "silent:1b"}) as response:
        for _ in response.iter_lines():
            now = time.monotonic()
            gaps.append(now - last if last else 0.0)
            last = now
    assert max(gaps) >= 0.23  # nothing at all for the length of the stall


def test_pull_unknown_names(api, sim):
    sim.behavior.pull = PullBehavior(unknown_models=["ghost"])
    streamed = pull(api, "ghost")
    assert streamed.status_code == 200
    assert lines(streamed) == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    quiet = pull(api, "ghost:latest", stream=False)
    assert (quiet.status_code, quiet.json()) == (500, {"error": "pull model manifest: file does not exist"})
    sim.behavior.pull = PullBehavior(seconds=0.05, registry=["library/known:1b"])
    assert lines(pull(api, "other:1b"))[-1] == {"error": "pull model manifest: file does not exist"}
    assert lines(pull(api, "known:1b"))[-1] == {"status": "success"}
    assert sim.pull_stats()["failed"] == 3


def test_pull_client_disconnect_stops_the_download_and_keeps_its_bytes(api, sim):
    sim.behavior.pull = PullBehavior(seconds=3)
    with api.stream("POST", "/api/pull", json={"model": "abandoned:7b"}) as response:
        iterator = response.iter_lines()
        for _ in range(4):
            next(iterator)
    assert wait_for(lambda: sim.pull_stats()["cancelled"] == 1 and sim.pull_stats()["active"] == 0)
    kept = sim.pulled_bytes("abandoned:7b")
    time.sleep(0.15)
    assert 0 < kept == sim.pulled_bytes("abandoned:7b") < ModelSpec("x").size  # stopped, not thrown away
    sim.behavior.pull = PullBehavior(seconds=0.05)
    resumed = lines(pull(api, "abandoned:7b"))
    assert layer_lines(resumed)[0]["completed"] == kept and resumed[-1] == {"status": "success"}


def test_concurrent_pulls_are_counted(api, sim):
    sim.behavior.pull = PullBehavior(seconds=5)  # slow enough that all of them are in flight together
    readers = []  # kept: a line iterator that is garbage-collected closes its response
    with contextlib.ExitStack() as open_pulls:
        for name in ["par-a:1b", "par-b:1b", "par-c:1b", "par-a:1b"]:
            response = open_pulls.enter_context(api.stream("POST", "/api/pull", json={"model": name}))
            readers.append(response.iter_lines())
            assert json.loads(next(readers[-1])) == {"status": "pulling manifest"}
        assert sim.pull_stats() == {
            "started": 4,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "active": 4,
            "max_active": 4,
        }
    assert wait_for(lambda: sim.pull_stats()["active"] == 0)
    assert sim.pull_stats() == {"started": 4, "completed": 0, "failed": 0, "cancelled": 4, "active": 0, "max_active": 4}
    assert sim.find("par-a:1b") is None


def test_pulls_of_one_model_share_its_download(api, sim):
    # One scripted failure, consumed by the download: a second pull that joins it fails with it,
    # where a download of its own would have succeeded.
    sim.behavior.pull = PullBehavior(seconds=0.6, fail="error", fail_at=0.9, fail_times=1)
    with api.stream("POST", "/api/pull", json={"model": "shared:7b"}) as first:
        iterator = first.iter_lines()
        next(iterator), next(iterator), next(iterator)
        joined = lines(pull(api, "shared:7b"))
        rest = [json.loads(line) for line in iterator]
    assert joined[0] == {"status": "pulling manifest"} and joined[-1] == rest[-1] == {
        "error": "max retries exceeded: unexpected EOF"
    }
    assert layer_lines(joined)[0]["completed"] > 0  # it joined midway, at the download's current count
    assert sim.behavior.pull.fail_times == 0 and sim.pull_stats()["failed"] == 2


def test_pull_behavior_over_the_control_plane(api, sim):
    patched = api.patch("/_sim/behavior", json={"pull": {"fail": "error", "fail_times": 1, "seconds": 0.05}})
    assert patched.status_code == 200 and patched.json()["pull"]["fail"] == "error"
    assert sim.behavior.pull.seconds == 0.05 and sim.behavior.pull.fail_at == 0.5  # merged, not replaced
    assert lines(pull(api, "remote:1b"))[-1] == {"error": "max retries exceeded: unexpected EOF"}
    assert lines(pull(api, "remote:1b"))[-1] == {"status": "success"}
    assert api.patch("/_sim/behavior", json={"pull": {"fail": "explode"}}).status_code == 400
    assert api.patch("/_sim/behavior", json={"pull": {"nonsense": 1}}).status_code == 400
    assert api.patch("/_sim/behavior", json={"pull": {"fail_at": 2}}).status_code == 400
    assert api.get("/_sim/stats").json()["pulls"]["completed"] == 1
    api.post("/_sim/reset")
    assert api.get("/_sim/stats").json()["pulls"]["started"] == 0


def test_delete_forgets_the_blobs(api, sim):
    sim.behavior.pull = PullBehavior(seconds=0.05)
    pull(api, "fleeting:1b")
    assert api.request("DELETE", "/api/delete", json={"model": "fleeting:1b"}).status_code == 200
    assert sim.pulled_bytes("fleeting:1b") == 0
    assert "completed" not in layer_lines(lines(pull(api, "fleeting:1b")))[0]


# --------------------------------------------------------------------------- loaded models and keep_alive


def expiry(api: httpx.Client, name: str) -> float | None:
    for model in api.get("/api/ps").json()["models"]:
        if model["name"] == name:
            return datetime.fromisoformat(model["expires_at"]).timestamp() - time.time()
    return None


def test_generate_without_prompt_loads_and_keep_alive_sets_expiry(api, sim):
    load = api.post("/api/generate", json={"model": "qwen3:4b", "keep_alive": "5m"})
    assert load.headers["content-type"].startswith("application/json")
    body = load.json()
    assert (body["model"], body["response"], body["done"], body["done_reason"]) == ("qwen3:4b", "", True, "load")
    assert RFC3339.match(body["created_at"])
    assert 295 < expiry(api, "qwen3:4b") <= 300
    api.post("/api/generate", json={"model": "qwen3:4b", "keep_alive": "1h30m"})
    assert 5395 < expiry(api, "qwen3:4b") <= 5400
    api.post("/api/generate", json={"model": "qwen3:4b", "keep_alive": -1})
    assert expiry(api, "qwen3:4b") > 10 * 365 * 86400  # negative: loaded for good
    unload = api.post("/api/generate", json={"model": "qwen3:4b", "keep_alive": 0}).json()
    assert (unload["done_reason"], unload["response"]) == ("unload", "")
    assert expiry(api, "qwen3:4b") is None and "qwen3:4b" not in sim.loaded_models()


def test_requests_load_with_the_default_keep_alive_and_expire(api, sim):
    sim.unload("llama3.1:8b")
    api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False})
    assert 295 < expiry(api, "llama3.1:8b") <= 300
    api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False, "keep_alive": 0})
    assert expiry(api, "llama3.1:8b") is None  # 0 unloads once the request is done
    api.post("/api/embed", json={"model": "nomic-embed-text", "input": "x", "keep_alive": 0.15})
    assert expiry(api, "nomic-embed-text:latest") is not None
    assert wait_for(lambda: expiry(api, "nomic-embed-text:latest") is None, timeout=1.0)
    bad = api.post("/api/generate", json={"model": "llama3.1:8b", "keep_alive": "soon"})
    assert (bad.status_code, bad.json()) == (400, {"error": 'time: invalid duration "soon"'})


def test_loaded_models_python_api(api, sim):
    sim.load("gemma3:1b", keep_alive="10m")
    assert 595 < sim.loaded_models()["gemma3:1b"] - time.time() <= 600
    assert "gemma3:1b" in [m["name"] for m in api.get("/api/ps").json()["models"]]
    sim.unload("gemma3:1b")
    assert "gemma3:1b" not in sim.loaded_models()
    with pytest.raises(KeyError):
        sim.load("ghost")
