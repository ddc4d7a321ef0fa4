"""Routing across several simulated nodes: weights, health, cooldown, queues, fallbacks, task routing."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from proxy.sim import Behavior, ModelSpec, SimOllama
from tests.support import ollama_models, reset_health, running_proxy, wait_for

MSG = [{"role": "user", "content": "hi"}]


def chats(sim) -> int:
    return sum(1 for r in sim.requests if r[1] == "/api/chat")


@pytest.fixture(scope="module")
def trio():
    with SimOllama(models=ollama_models()) as a, SimOllama(models=ollama_models()) as b, \
            SimOllama(models=[ModelSpec("qwen2.5-coder:7b", capabilities=("completion", "tools")),
                              ModelSpec("gemma3:1b", capabilities=("completion",))]) as c:  # fmt: skip
        yield a, b, c


@pytest.fixture
def sims(trio):
    for sim in trio:
        sim.behavior = Behavior(reply="answered")
        sim.reset()
        if sim.url is None or not _listening(sim):
            sim.start()
    for sim in trio[:2]:
        # Loaded on both, as the proxy reads from /api/ps at start: the weights decide between them
        # (a node that would have to load it first is only used when the others are busy).
        sim.load("llama3.1:8b")
    return trio


def _listening(sim) -> bool:
    try:
        return httpx.get(f"{sim.url}/api/version", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _config(a, b, c, **overrides) -> dict:
    config = {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "health": {"interval": 0.2, "cooldown": 0.3, "max_cooldown": 1},
        "routing": {"default_model": "chat", "queue_timeout": 2},
        "backends": [
            {"name": "a", "kind": "ollama", "url": a.url, "weight": 3},
            {"name": "b", "kind": "ollama", "url": b.url, "weight": 1},
            {"name": "c", "kind": "ollama", "url": c.url},
        ],
        "models": [
            {"name": "chat", "target": "llama3.1:8b", "capabilities": ["chat"], "fallback": ["small"]},
            {"name": "small", "target": "gemma3:1b", "capabilities": ["chat"], "preference": 500},
            {"name": "coder", "target": "qwen2.5-coder:7b", "capabilities": ["code"]},
            {"name": "thinker", "target": "qwen3:4b", "capabilities": ["reasoning", "code"], "preference": 50},
            {"name": "seer", "target": "llava:7b", "capabilities": ["chat"], "preference": 900},
            {"name": "embed", "target": "nomic-embed-text"},
            {"name": "ghost", "target": "llama9:70b", "backends": ["a"]},
        ],
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.fixture
def proxy(sims):
    with running_proxy(_config(*sims)) as server:
        yield server


@pytest.fixture
def client(proxy):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)


# --- weights and health ---------------------------------------------------------------------------


def test_weights_split_traffic(client, sims):
    a, b, _ = sims
    for _ in range(200):
        client.chat.completions.create(model="chat", messages=MSG)
    # weight 3 : 1 -> expect 150 : 50; the tolerance is about five standard deviations
    assert chats(a) + chats(b) == 200
    assert 120 <= chats(a) <= 180, (chats(a), chats(b))


def test_a_backend_dying_under_load_fails_no_request(proxy, sims):
    a, b, _ = sims
    for sim in (a, b):
        sim.behavior = Behavior(reply="one two three four five", ttft=0.02, tokens_per_second=100)

    async def load() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)

        async def user() -> list[str]:
            return [(await client.chat.completions.create(model="chat", messages=MSG)).choices[0].message.content
                    for _ in range(8)]  # fmt: skip

        results = await asyncio.gather(*(user() for _ in range(8)))
        await client.close()
        return [text for batch in results for text in batch]

    def kill_a_once_it_serves() -> None:
        # Break "a" mid-load: once it has answered a few of the 64 requests, not after a fixed time.
        if wait_for(lambda: a.completed >= 4, timeout=20):
            a.behavior = Behavior(fail="die_mid_stream", fail_after_chunks=1)
        a.stop()

    killer = threading.Thread(target=kill_a_once_it_serves)
    killer.start()
    texts = asyncio.run(load())
    killer.join()
    assert len(texts) == 64 and all(t == "one two three four five" for t in texts)
    assert a.failed + (64 - chats(b)) >= 1  # "a" really took part and really broke
    status = httpx.get(f"{proxy.url}/admin/status").json()
    assert {s["name"]: s["state"] for s in status["backends"]}["a"] == "offline"


def test_a_backend_that_comes_back_is_used_again_after_cooldown(proxy, client, sims):
    a, b, _ = sims
    a.stop()
    for _ in range(5):
        assert client.chat.completions.create(model="chat", messages=MSG).choices[0].message.content == "answered"
    assert chats(b) == 5
    a.start()
    # cooldown 0.3 s and health checks every 0.2 s: "a" (weight 3) soon takes most requests again
    deadline = time.monotonic() + 5
    while chats(a) == 0 and time.monotonic() < deadline:
        client.chat.completions.create(model="chat", messages=MSG)
        time.sleep(0.05)
    assert chats(a) > 0
    # back: "degraded" while its recent errors still count against it, or "online" if the health
    # check took it out before any request failed there
    assert _state(proxy, "a") in ("online", "degraded")


def _state(proxy, name: str) -> str:
    return {s["name"]: s["state"] for s in httpx.get(f"{proxy.url}/admin/status").json()["backends"]}[name]


def test_failover_is_invisible_to_the_sdk_but_for_headers(proxy, client, sims):
    a, b, _ = sims
    reset_health(proxy)
    a.behavior = Behavior(fail="http_500")
    b.behavior = Behavior(fail="busy")
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG)
    # both nodes serving llama3.1:8b failed before answering: the alias's fallback model answered
    assert raw.parse().choices[0].message.content == "answered"
    assert raw.parse().model == "chat"  # the public name the client sent
    assert raw.headers["x-proxy-attempts"] == "3"
    assert raw.headers["x-proxy-backend"] == "c"
    assert raw.headers["x-proxy-model"] == "gemma3:1b"
    assert raw.headers["x-proxy-alias"] == "small"


def test_retry_count_is_bounded(sims):
    a, b, c = sims
    for sim in sims:
        sim.behavior = Behavior(fail="http_500")
    with running_proxy(_config(a, b, c, routing={"retries": 1})) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="chat", messages=MSG)
    assert info.value.status_code == 502
    assert chats(a) + chats(b) + chats(c) == 2
    assert "tried 2 backends" in info.value.message


def test_deadline_bounds_the_whole_request(sims):
    a, b, c = sims
    for sim in (a, b):
        sim.behavior = Behavior(fail="hang")
    with running_proxy(_config(a, b, c, routing={"deadline": 0.5})) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="chat", messages=MSG)
        elapsed = time.monotonic() - started
    assert info.value.status_code == 504
    assert "routing.deadline" in info.value.message
    assert elapsed < 4  # bounded by the deadline, not by first_byte (5 s) per attempt


# --- max_concurrent and the queue -----------------------------------------------------------------


def _burst(url: str, n: int, model: str = "chat") -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(timeout=10) as http:
            return await asyncio.gather(*(
                http.post(f"{url}/v1/chat/completions", json={"model": model, "messages": MSG}) for _ in range(n)
            ))  # fmt: skip

    return asyncio.run(run())


def test_max_concurrent_is_never_exceeded(sims):
    a, b, c = sims
    a.behavior = Behavior(reply="ok", ttft=0.1)
    config = _config(a, b, c)
    config["backends"] = [{"name": "a", "kind": "ollama", "url": a.url, "max_concurrent": 2}]
    config["models"] = [{"name": "chat", "target": "llama3.1:8b"}]
    config["routing"] = {"queue_size": 20}
    with running_proxy(config) as server:
        responses = _burst(server.url, 10)
    assert [r.status_code for r in responses] == [200] * 10  # the extra ones waited their turn
    assert a.max_active == 2  # asserted where it matters: on the backend


def test_a_full_queue_answers_429_with_retry_after(sims):
    a, b, c = sims
    a.behavior = Behavior(reply="ok", ttft=0.3)
    config = _config(a, b, c)
    config["backends"] = [{"name": "a", "kind": "ollama", "url": a.url, "max_concurrent": 1}]
    config["models"] = [{"name": "chat", "target": "llama3.1:8b"}]
    config["routing"] = {"queue_size": 1, "queue_timeout": 4}
    with running_proxy(config) as server:
        responses = _burst(server.url, 5)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    assert a.max_active == 1


# --- aliases ----------------------------------------------------------------------------------------


def test_an_alias_nobody_serves_is_reported_and_explained(proxy, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="ghost", messages=MSG)
    message = info.value.message
    assert "'ghost' (an alias for 'llama9:70b') is not served by any backend" in message
    assert "a serves " in message and "llama3.1:8b" in message
    status = httpx.get(f"{proxy.url}/admin/status").json()
    mismatch = next(m for m in status["alias_mismatches"] if m["alias"] == "ghost")
    assert mismatch["target"] == "llama9:70b"
    assert "llama3.1:8b" in mismatch["served_instead"]["a"]


def test_a_request_only_goes_to_backends_that_serve_the_target(client, sims):
    a, b, c = sims
    for _ in range(6):
        client.chat.completions.create(model="coder", messages=MSG)
    assert chats(c) == 6 and chats(a) == chats(b) == 0


# --- capability routing ----------------------------------------------------------------------------


def _routed(client, task: str | None = None, **kwargs):
    headers = {"X-Task-Type": task} if task else {}
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG, extra_headers=headers,
                                                           **kwargs)  # fmt: skip
    return raw.headers["x-proxy-model"], raw.parse()


def test_task_type_picks_the_model_by_capability_and_preference(client):
    assert _routed(client, "code_generation")[0] == "qwen2.5-coder:7b"  # lists code first
    assert _routed(client, "reasoning")[0] == "qwen3:4b"
    assert _routed(client, "general_chat")[0] == "llama3.1:8b"
    model, reply = _routed(client)  # no task: the general model
    assert model == "llama3.1:8b" and reply.model == "auto"


def test_task_type_in_the_body_works_and_is_not_forwarded(client, sims):
    model, _ = _routed(client, extra_body={"task_type": "code_analysis"})
    assert model == "qwen2.5-coder:7b"
    sent = [r[2] for sim in sims for r in sim.requests if r[1] == "/api/chat"][-1]
    assert "task_type" not in sent


def test_requirements_narrow_the_candidates(client):
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=image,
                                                           extra_headers={"X-Task-Type": "general_chat"})  # fmt: skip
    assert raw.headers["x-proxy-model"] == "llava:7b"  # the only vision model, though least preferred
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    model, _ = _routed(client, "general_chat", tools=tools)
    assert model == "llama3.1:8b"  # tools-capable; gemma3:1b is not
    embedding = client.embeddings.with_raw_response.create(model="auto", input="x")
    assert embedding.headers["x-proxy-model"] == "nomic-embed-text:latest"


def test_the_next_specialist_takes_over_when_the_best_fails(proxy, client, sims):
    a, b, c = sims
    c.behavior = Behavior(fail="http_500")
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                           extra_headers={"X-Task-Type": "code_generation"})  # fmt: skip
    assert raw.headers["x-proxy-model"] == "qwen3:4b"  # next best for code, on a or b
    assert raw.headers["x-proxy-alias"] == "thinker"


def test_falls_back_to_the_general_model_when_no_specialist_is_healthy(proxy, client, sims):
    a, b, c = sims
    for sim in (a, b):
        sim.behavior = Behavior(fail="http_500", fail_times=1)  # qwen3:4b, the only reasoner, fails on both
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG,
                                                           extra_headers={"X-Task-Type": "reasoning"})  # fmt: skip
    assert raw.headers["x-proxy-model"] == "llama3.1:8b"
    assert raw.headers["x-proxy-alias"] == "chat"
    assert raw.headers["x-proxy-attempts"] == "3"


def test_unknown_task_type_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        _routed(client, "juggling")
    assert info.value.code == "invalid_task_type"
    assert "code_generation" in info.value.message


# --- template detection ----------------------------------------------------------------------------

NO_SYSTEM_TEMPLATE = ('{{- range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n'
                      '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
                      '{{ end }}{{ end }}<start_of_turn>model\n')  # fmt: skip


def test_ollama_template_without_system_is_detected_and_adapted():
    spec = ModelSpec("oldgemma:2b", capabilities=("completion",), template=NO_SYSTEM_TEMPLATE)
    with (
        SimOllama(models=[spec, *ollama_models()]) as sim,
        running_proxy({"backends": [{"name": "n", "kind": "ollama", "url": sim.url}]}) as server,
    ):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        client.chat.completions.create(model="oldgemma:2b", messages=system)
        client.chat.completions.create(model="llama3.1:8b", messages=system)
        sent = [r[2]["messages"] for r in sim.requests if r[1] == "/api/chat"]
        caps = httpx.get(f"{server.url}/admin/models/oldgemma:2b/capabilities").json()
    assert sent[0] == [{"role": "user", "content": "Be brief.\n\nHi"}]  # its template would drop a system message
    assert sent[1][0]["role"] == "system"  # this template renders it
    assert caps["backends"]["n"]["system_role"] is False
    assert caps["backends"]["n"]["capabilities"] == ["completion"]


# --- admin views ----------------------------------------------------------------------------------


def test_admin_views_show_capabilities_and_placement(proxy):
    models = {m["name"]: m for m in httpx.get(f"{proxy.url}/admin/models").json()["models"]}
    assert set(models["chat"]["backends"]) == {"a", "b"}
    assert "tools" in models["chat"]["capabilities"]  # detected from /api/show, on top of the declared "chat"
    caps = httpx.get(f"{proxy.url}/admin/models/thinker/capabilities").json()
    assert caps["configured"]["capabilities"] == ["reasoning", "code"]
    assert caps["backends"]["a"]["context_length"] == 8192
    assert "thinking" in caps["capabilities"]
    cards = {c["id"]: c for c in httpx.get(f"{proxy.url}/v1/models").json()["data"]}
    assert cards["coder"]["served_by"] == ["c"] and "code" in cards["coder"]["capabilities"]
    status = httpx.get(f"{proxy.url}/admin/status").json()
    row = next(s for s in status["backends"] if s["name"] == "a")
    assert {"state", "weight", "in_flight", "queue_depth", "last_error", "served_models"} <= set(row)
    missing = httpx.get(f"{proxy.url}/admin/models/nope/capabilities")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_admin_needs_a_key_when_admin_keys_are_set(sims):
    a, b, c = sims
    with running_proxy(_config(a, b, c, server={"admin_keys": ["adm"], "api_keys": ["app"]})) as server:
        assert httpx.get(f"{server.url}/admin/status").status_code == 401
        app_key = httpx.get(f"{server.url}/admin/status", headers={"Authorization": "Bearer app"})
        assert app_key.status_code == 401  # an application's key does not open the admin API
        ok = httpx.get(f"{server.url}/admin/status", headers={"Authorization": "Bearer adm"})
        assert ok.status_code == 200
