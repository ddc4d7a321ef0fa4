"""The simulated Ollama node speaks Ollama's native protocol and fails on request."""

from __future__ import annotations

import json
import math
import re
import threading
import time

import httpx
import pytest

from proxy.sim import Behavior, ModelSpec, SimOllama
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
    assert llama["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                                "parameter_size": "8.0B", "quantization_level": "Q4_K_M"}


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
    body = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False,
                                          "options": {"num_predict": 2}}).json()
    assert body["message"]["content"] == "You said:"
    assert (body["done_reason"], body["eval_count"]) == ("length", 2)


def test_stop_option_cuts_reply(api):
    body = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False,
                                          "options": {"stop": [" two"]}}).json()
    assert body["message"]["content"] == "You said: one"
    assert body["done_reason"] == "stop"


def test_canned_reply_and_roles_are_case_insensitive(api, sim):
    body = api.post("/api/chat", json={"model": "llama3.1:8b", "stream": False,
                                          "messages": [{"role": "USER", "content": "shout"}]}).json()
    assert body["message"]["content"] == "You said: shout"
    sim.behavior.reply = "Canned answer."
    assert api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}
                       ).json()["message"]["content"] == "Canned answer."


def test_format_json_and_schema(api, sim):
    sim.behavior.json_reply = {"city": "Paris"}
    plain = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False, "format": "json"})
    assert json.loads(plain.json()["message"]["content"]) == {"city": "Paris"}
    sim.behavior.json_reply = None
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}}}
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
    response = api.post("/api/chat", json={"model": "gemma3:1b", "messages": USER,
                                              "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert response.status_code == 400
    assert response.json()["error"].endswith("gemma3:1b does not support tools")


def test_tool_calls_stream_then_done(api, sim):
    sim.behavior.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
                               {"name": "get_time", "arguments": {}}]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    body = lines(api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "tools": tools}))
    calls = [c for b in body for c in b["message"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [c["function"]["index"] for c in calls] == [0, 1]
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", c["id"]) for c in calls)
    assert calls[0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert body[-1]["done"] is True and body[-1]["done_reason"] == "stop"
    whole = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "tools": tools,
                                           "stream": False}).json()
    assert whole["message"]["content"] == "" and len(whole["message"]["tool_calls"]) == 2
    # Without tools in the request the scripted calls do not apply.
    plain = api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}).json()
    assert "tool_calls" not in plain["message"] and plain["message"]["content"]


def test_logprobs_follow_ollama_layout(api):
    body = lines(api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "logprobs": True,
                                                "top_logprobs": 3}))
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
    assert (refused.status_code, refused.json()["error"]) == (400, "this model is missing data required for image input")
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
    short = api.post("/api/embed", json={"model": "nomic-embed-text", "input": "alpha",
                                            "dimensions": 8}).json()["embeddings"][0]
    assert len(short) == 8
    assert math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-5)
    norm = math.sqrt(sum(x * x for x in full[:8]))
    assert all(math.isclose(s, f / norm, rel_tol=1e-4) for s, f in zip(short, full))


def test_embed_edge_cases(api):
    assert api.post("/api/embed", json={"model": "nomic-embed-text", "input": []}).json() == {
        "model": "nomic-embed-text", "embeddings": []}
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
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
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
        503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
    sim.behavior.fail = "not_found"
    gone = api.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "x"})
    assert (gone.status_code, gone.json()) == (404, {"error": "model 'llama3.1:8b' not found"})
    assert sim.completed == 0 and sim.failed == 3


def test_fail_times_counts_down(api, sim):
    sim.behavior = Behavior(fail="http_500", fail_times=2)
    codes = [api.post("/api/chat", json={"model": "llama3.1:8b", "messages": USER, "stream": False}).status_code
             for _ in range(3)]
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
    threads = [threading.Thread(target=httpx.post, args=(f"{sim.url}/api/chat",),
                                kwargs={"json": {"model": "llama3.1:8b", "messages": USER}, "timeout": 5})
               for _ in range(3)]
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
