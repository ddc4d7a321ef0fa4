"""Routing on what backends report: loaded models, queues, KV cache, conversation affinity, and why."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from proxy.admission import Slots
from proxy.affinity import AffinityTable, conversation_key
from proxy.config import HealthConfig, RoutingConfig
from proxy.health import BackendHealth
from proxy.resolve import Candidate, Route
from proxy.routing import Router
from proxy.signals import Load, parse_ollama_ps, parse_vllm_metrics
from proxy.sim import Behavior, ModelSpec, SimOllama, SimVLLM
from tests.support import running_proxy, wait_for

MSG = [{"role": "user", "content": "hi"}]

# --- parsing ---------------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 2.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 5.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.7
vllm:prompt_tokens_total{engine="0",model_name="qwen"} 1234.0
"""


def test_vllm_metrics_are_summed_over_engines():
    load = parse_vllm_metrics(VLLM_METRICS)
    assert (load.running, load.waiting) == (4, 7)
    assert load.kv_cache == pytest.approx(0.6)  # a share: the engines' average


def test_vllm_metrics_older_names_and_other_servers():
    old = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.25\n"
    assert parse_vllm_metrics(old) == Load(1, 0, 0.25)
    assert parse_vllm_metrics("# llama.cpp\nllamacpp:requests_processing 1\n") is None


def test_ollama_ps_gives_each_model_its_unload_time():
    body = {"models": [
        {"name": "llama3.1:8b", "model": "llama3.1:8b", "expires_at": "2030-01-02T03:04:05.123456789Z"},
        {"name": "qwen3:4b", "model": "qwen3:4b", "expires_at": "2030-01-02T04:04:05.5+01:00"},
        {"name": "odd", "expires_at": "not a time"},
    ]}  # fmt: skip
    loaded = parse_ollama_ps(body)
    assert loaded["llama3.1:8b"] == pytest.approx(1893553445.123456)
    assert loaded["qwen3:4b"] == pytest.approx(1893553445.5)
    assert loaded["odd"] > time.time()  # no readable expiry: assume Ollama's default keep-alive
    assert parse_ollama_ps({"models": None}) == {} and parse_ollama_ps("x") == {}


# --- affinity --------------------------------------------------------------------------------------


def test_conversation_keys_follow_the_user_or_the_first_messages():
    turn1 = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    turn2 = {"messages": turn1["messages"] + [{"role": "assistant", "content": "Hello"},
                                              {"role": "user", "content": "More"}]}  # fmt: skip
    assert conversation_key("chat", turn1) == conversation_key("chat", turn2)
    assert conversation_key("chat", turn1) != conversation_key("other", turn1)
    other = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye"}]}
    assert conversation_key("chat", other) != conversation_key("chat", turn1)
    assert conversation_key("chat", {**other, "user": "alice"}) == conversation_key("chat", {**turn1, "user": "alice"})
    assert conversation_key("chat", {"prompt": ""}) is None


def test_the_affinity_table_is_a_bounded_lru_with_a_ttl(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("proxy.affinity.time.monotonic", lambda: now[0])
    table = AffinityTable(size=2, ttl=60)
    table.remember("a", "n1")
    table.remember("b", "n2")
    assert table.get("a") == "n1"
    table.remember("c", "n1")  # "b" is the least recently remembered: it goes
    assert len(table) == 2 and table.get("b") is None
    now[0] += 61
    assert table.get("a") is None and len(table) == 1
    table.remember("d", "n2")
    table.forget_backend("n2")
    assert table.get("d") is None


# --- the router's order, without HTTP --------------------------------------------------------------


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name

    def model_key(self, model: str) -> str:
        return model


def _router(names_weights: dict[str, float], **routing) -> tuple[Router, dict[str, Candidate], Route]:
    health = {n: BackendHealth(n, w, HealthConfig()) for n, w in names_weights.items()}
    slots = {n: Slots(n, 0, 64, 30) for n in names_weights}
    router = Router(RoutingConfig(**routing), health, slots, rng=random.Random(7))
    candidates = {n: Candidate(FakeBackend(n), "m") for n in names_weights}  # type: ignore[arg-type]
    return router, candidates, Route("m", "m", (tuple(candidates.values()),))


def test_a_node_with_the_model_loaded_wins_over_a_heavier_cold_one():
    router, cands, route = _router({"cold": 1e6, "warm": 1})
    router.health["cold"].signals.reported(None, {})
    router.health["warm"].signals.reported(None, {"m": time.time() + 300})
    plan, reason = router.plan(route)
    assert [c.backend.name for c in plan] == ["warm", "cold"] and reason == "loaded"


def test_requests_for_a_cold_model_gather_where_it_is_loading_until_that_node_is_busy():
    router, cands, route = _router({"a": 1, "b": 1}, cold_after_in_flight=3)
    for n in ("a", "b"):
        router.health[n].signals.reported(None, {})
    router.health["b"].signals.loading["m"] = 1  # one of our requests is loading it on b
    router.health["b"].in_flight = 2
    assert [c.backend.name for c in router.plan(route)[0]][0] == "b"
    router.health["b"].in_flight = 3  # now b is busy: loading it on a too is worth it
    firsts = {router.plan(route)[0][0].backend.name for _ in range(50)}
    assert firsts == {"a", "b"}


def test_the_shortest_queue_and_free_kv_cache_win():
    router, cands, route = _router({"busy": 1e6, "idle": 1})
    router.health["busy"].signals.reported(Load(running=8, waiting=4, kv_cache=0.4), None)
    router.health["idle"].signals.reported(Load(running=8, waiting=0, kv_cache=0.4), None)
    plan, reason = router.plan(route)
    assert plan[0].backend.name == "idle" and reason == "shortest-queue"
    router.health["busy"].signals.reported(Load(running=1, waiting=0, kv_cache=0.99), None)  # KV cache full
    router.health["idle"].signals.reported(Load(running=1, waiting=2, kv_cache=0.2), None)
    assert router.plan(route)[0][0].backend.name == "idle"


def test_affinity_holds_while_the_backend_is_healthy_and_not_overloaded():
    router, cands, route = _router({"a": 1e6, "b": 1})
    for name in ("a", "b"):  # two vLLM replicas, both idle
        router.health[name].signals.reported(Load(running=0, waiting=0, kv_cache=0.1), None)
    plan, reason = router.plan(route, sticky="b")
    assert plan[0].backend.name == "b" and reason == "affinity"
    router.health["b"].signals.reported(Load(running=4, waiting=3, kv_cache=0.5), None)
    plan, reason = router.plan(route, sticky="b")
    assert plan[0].backend.name == "a" and reason == "shortest-queue"
    router.health["b"].signals.reported(Load(running=0, waiting=0, kv_cache=0.1), None)
    router.health["b"].failed("reset")  # in cooldown: not eligible, affinity or not
    assert router.plan(route, sticky="b")[0][0].backend.name == "a"


def test_without_signals_the_weights_decide():
    router, cands, route = _router({"a": 3, "b": 1})
    firsts = [router.plan(route) for _ in range(400)]
    assert {reason for _, reason in firsts} == {"weight"}
    share = sum(plan[0].backend.name == "a" for plan, _ in firsts) / 400
    assert 0.6 < share < 0.9


def test_latency_is_compared_like_for_like():
    config = HealthConfig()
    quick, long_answer = BackendHealth("quick", 1, config), BackendHealth("long", 1, config)
    quick.succeeded(per_token=0.5 / 25)  # a short answer: 25 tokens in 0.5 s
    long_answer.succeeded(per_token=40 / 2000)  # one long answer: 2,000 tokens in 40 s, the same pace
    best = min(quick.per_token, long_answer.per_token)
    assert long_answer.score(None, best) == pytest.approx(quick.score(None, best))
    streaming = BackendHealth("streams", 1, config)
    streaming.succeeded(ttft=0.05)  # only time-to-first-token samples: not compared with per-token ones
    assert streaming.score(0.05, best) == pytest.approx(quick.score(0.05, best))
    slow = BackendHealth("slow", 1, config)
    slow.succeeded(ttft=1.0)  # 20 times the fastest first token: really slow
    assert slow.score(0.05, None) < 0.2 * streaming.score(0.05, None)


def test_one_very_long_prompt_does_not_push_a_node_out_of_rotation():
    config = HealthConfig()
    steady, unlucky = BackendHealth("steady", 1, config), BackendHealth("unlucky", 1, config)
    for _ in range(5):
        steady.succeeded(ttft=0.1)
        unlucky.succeeded(ttft=0.1)
    unlucky.succeeded(ttft=30.0)  # one 100k-token prompt took half a minute to its first token
    assert unlucky.ttft < 0.15
    assert unlucky.score(steady.ttft) == pytest.approx(steady.score(steady.ttft))  # under twice the best: no penalty
    for _ in range(10):  # but a node that really got slow is found out within a few requests
        unlucky.succeeded(ttft=3.0)
    assert unlucky.score(steady.ttft) < 0.2 * steady.score(steady.ttft)


# --- end to end ------------------------------------------------------------------------------------


def _status(server) -> dict:
    return {b["name"]: b for b in httpx.get(f"{server.url}/admin/status").json()["backends"]}


def _chat(server, model: str = "chat", **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": model, "messages": MSG, **extra}, timeout=10)


def _ollama_pair_config(cold, warm) -> dict:
    return {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "health": {"interval": 0.2},
        "backends": [
            {"name": "cold", "kind": "ollama", "url": cold.url, "weight": 1_000_000},
            {"name": "warm", "kind": "ollama", "url": warm.url, "weight": 1},
        ],
        "models": [{"name": "chat", "target": "llama3.1:8b"}],
    }


def test_ollama_requests_go_where_the_model_is_loaded():
    models = [ModelSpec("llama3.1:8b")]
    with SimOllama(models=list(models)) as cold, SimOllama(models=list(models)) as warm:
        warm.load("llama3.1:8b", keep_alive="10m")
        with running_proxy(_ollama_pair_config(cold, warm)) as server:
            answers = [_chat(server) for _ in range(5)]
            status = _status(server)
    assert {(a.headers["x-proxy-backend"], a.headers["x-proxy-route-reason"]) for a in answers} == {("warm", "loaded")}
    loaded = status["warm"]["signals"]["loaded_models"]
    assert 0 < loaded["llama3.1:8b"] <= 600  # seconds until Ollama unloads it, from expires_at
    assert status["cold"]["signals"]["loaded_models"] == {}


def test_a_cold_model_is_loaded_on_one_node_not_everywhere():
    models = [ModelSpec("llama3.1:8b")]
    with SimOllama(models=list(models)) as a, SimOllama(models=list(models)) as b:
        for sim in (a, b):
            sim.behavior = Behavior(ttft=0.5)  # the cold load
        config = _ollama_pair_config(a, b)
        config["backends"][0]["weight"] = config["backends"][1]["weight"] = 1
        with running_proxy(config) as server:

            async def burst():
                async with httpx.AsyncClient(timeout=10) as http:
                    body = {"model": "chat", "messages": MSG}
                    return await asyncio.gather(*(http.post(f"{server.url}/v1/chat/completions", json=body)
                                                  for _ in range(3)))  # fmt: skip

            answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    assert len({r.headers["x-proxy-backend"] for r in answers}) == 1, [r.headers for r in answers]
    assert sorted(r.headers["x-proxy-route-reason"] for r in answers).count("loaded") >= 2
    assert sum(1 for sim in (a, b) for r in sim.requests if r[1] == "/api/chat") == 3


@pytest.fixture(scope="module")
def replicas():
    with SimVLLM(model="qwen") as one, SimVLLM(model="qwen") as two:
        config = {
            "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
            "health": {"interval": 0.2},
            "routing": {"affinity": True},
            "backends": [
                {"name": "one", "kind": "vllm", "url": one.url, "weight": 1_000_000},
                {"name": "two", "kind": "vllm", "url": two.url, "weight": 1},
            ],
            "models": [{"name": "chat", "target": "qwen"}],
        }
        with running_proxy(config) as server:
            yield server, one, two


@pytest.fixture
def fleet(replicas):
    server, one, two = replicas
    for sim in (one, two):
        sim.behavior = Behavior(reply="ok")
        sim.extra_waiting, sim.kv_cache_usage = 0, None
        sim.reset()
    assert wait_for(lambda: all(s["signals"]["requests_waiting"] == 0 for s in _status(server).values()))
    return replicas


def test_vllm_replicas_are_chosen_by_their_queue(fleet):
    server, one, two = fleet
    assert _chat(server).headers["x-proxy-backend"] == "one"  # by weight, while both queues are empty
    one.extra_waiting = 6  # another client's requests pile up on "one"
    assert wait_for(lambda: _status(server)["one"]["signals"]["requests_waiting"] == 6)
    answer = _chat(server, user="q1")
    assert answer.headers["x-proxy-backend"] == "two"
    assert answer.headers["x-proxy-route-reason"] == "shortest-queue"
    one.extra_waiting, one.kv_cache_usage = 0, 0.99  # no queue, but no room in its KV cache
    assert wait_for(lambda: _status(server)["one"]["signals"]["kv_cache_usage"] == 0.99)
    assert _chat(server, user="q2").headers["x-proxy-backend"] == "two"


def test_a_conversation_stays_on_its_replica_while_it_can_take_it(fleet):
    server, one, two = fleet
    two.extra_waiting = 1  # the first turn goes to "two" ...
    assert wait_for(lambda: _status(server)["two"]["signals"]["requests_waiting"] == 1)
    two.extra_waiting, one.extra_waiting = 0, 2
    assert wait_for(lambda: _status(server)["one"]["signals"]["requests_waiting"] == 2)
    first = _chat(server, user="alice")
    assert first.headers["x-proxy-backend"] == "two"
    one.extra_waiting = 0  # ... and once both are idle the weight would pick "one", but affinity holds
    assert wait_for(lambda: _status(server)["one"]["signals"]["requests_waiting"] == 0)
    later = [_chat(server, user="alice") for _ in range(4)]
    assert {(r.headers["x-proxy-backend"], r.headers["x-proxy-route-reason"]) for r in later} == {("two", "affinity")}
    assert _chat(server, user="bob").headers["x-proxy-backend"] == "one"  # a new conversation: the weights
    two.extra_waiting = 3  # overloaded: alice moves on rather than wait
    assert wait_for(lambda: _status(server)["two"]["signals"]["requests_waiting"] == 3)
    assert _chat(server, user="alice").headers["x-proxy-backend"] == "one"


def test_a_failover_says_fallback(fleet):
    server, one, two = fleet
    one.behavior = Behavior(fail="http_500", fail_times=1)
    answer = _chat(server, user="carol")
    assert answer.headers["x-proxy-backend"] == "two" and answer.headers["x-proxy-route-reason"] == "fallback"


def test_status_shows_the_signals_per_backend(fleet):
    server, one, two = fleet
    signals = _status(server)["one"]["signals"]
    assert set(signals) >= {"requests_running", "requests_waiting", "kv_cache_usage", "loaded_models", "age_seconds"}
    assert signals["loaded_models"] is None  # vLLM does not list loaded models: it serves one
    assert signals["age_seconds"] is not None and signals["error"] is None


def test_the_simulators_command_line_sets_the_new_knobs():
    from proxy.sim.__main__ import _parser, build

    vllm = build(_parser().parse_args(["vllm", "--no-stream-usage", "--max-num-seqs", "1", "--port", "0"]))
    assert (vllm.stream_usage, vllm.max_num_seqs) == (False, 1)
    ollama = build(_parser().parse_args(["ollama", "--num-ctx", "2048", "--port", "0"]))
    assert ollama.num_ctx == 2048


def test_the_simulated_vllm_counts_generations_beyond_max_num_seqs_as_waiting():
    with SimVLLM(model="qwen", max_num_seqs=1, behavior=Behavior(ttft=0.5)) as sim:

        async def two_and_look():
            async with httpx.AsyncClient(timeout=10) as http:
                body = {"model": "qwen", "messages": MSG}
                calls = [
                    asyncio.ensure_future(http.post(f"{sim.url}/v1/chat/completions", json=body)) for _ in range(2)
                ]
                seen = None
                for _ in range(200):
                    seen = parse_vllm_metrics((await http.get(f"{sim.url}/metrics")).text)
                    if seen.running == 1 and seen.waiting == 1:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.gather(*calls)
                return seen

        seen = asyncio.run(two_and_look())
    assert seen == Load(running=1, waiting=1, kv_cache=1.0)
