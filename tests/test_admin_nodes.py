"""Nodes through the admin API: listing, registering (persisted), draining, removing, the model matrix,
automatic distribution by GPU tier, the pull window, and admin authentication."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timedelta

import httpx

from proxy.sim import Behavior, ModelSpec, SimOllama, SimVLLM
from proxy.sim.behavior import PullBehavior
from tests.support import running_proxy, wait_for
from tests.test_admin_pull import client, fleet_config, together, wait_op

TIERS = [
    {"min_gpu_memory_gb": 0, "models": ["gemma3:1b"]},
    {"min_gpu_memory_gb": 4.5, "models": ["qwen3:4b"]},
    {"min_gpu_memory_gb": 8, "models": ["llama3.1:8b"]},
    {"min_gpu_memory_gb": 16, "models": ["gpt-oss:20b"]},
]


def node_view(http: httpx.Client, name: str) -> dict:
    answer = http.get(f"/admin/nodes/{name}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_nodes_show_kind_state_models_loaded_and_gpu(tmp_path):
    sims = SimOllama(models=[ModelSpec("llama3.1:8b"), ModelSpec("qwen3:4b")]), \
        SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"])  # fmt: skip
    with together(*sims) as (ollama, vllm):
        ollama.load("qwen3:4b", keep_alive="10m")
        config = fleet_config(tmp_path, {"gpu-1": ollama})
        config["backends"][0]["gpu_memory_gb"] = 8
        config["backends"].append({"name": "vllm-1", "kind": "vllm", "url": vllm.url, "gpu_memory_gb": 24})
        config["distribution"]["tiers"] = TIERS
        with running_proxy(config) as proxy, client(proxy) as http:
            listing = http.get("/admin/nodes").json()
    assert listing["object"] == "list"
    gpu, served = listing["data"]
    assert (gpu["name"], gpu["kind"], gpu["source"], gpu["state"]) == ("gpu-1", "ollama", "config", "online")
    assert gpu["version"] and gpu["gpu_memory_gb"] == 8 and gpu["tier_models"] == ["llama3.1:8b"]
    assert gpu["in_flight"] == 0 and gpu["draining"] is False and gpu["error"] is None
    installed = {m["model"]: m for m in gpu["installed"]}
    assert set(installed) == {"llama3.1:8b", "qwen3:4b"}
    assert installed["qwen3:4b"]["size"] == ModelSpec("qwen3:4b").size
    assert installed["qwen3:4b"]["digest"] == ModelSpec("qwen3:4b").digest
    assert [m["model"] for m in gpu["loaded"]] == ["qwen3:4b"] and gpu["loaded"][0]["expires_at"]
    assert (served["kind"], served["gpu_memory_gb"], served["tier_models"]) == ("vllm", 24, ["gpt-oss:20b"])
    assert [m["model"] for m in served["installed"]] == ["qwen2.5-7b"]
    assert [m["model"] for m in served["loaded"]] == ["qwen2.5-7b"]


def test_a_registered_node_serves_at_once_and_survives_a_restart(tmp_path):
    with together(SimOllama(models=[ModelSpec("phi3:mini")]), SimOllama(models=[ModelSpec("llama3.1:8b")])) as (
        base,
        new,
    ):
        config = fleet_config(tmp_path, {"base": base})
        with running_proxy(config) as proxy, client(proxy) as http:
            spec = {"name": "gpu-9", "kind": "ollama", "url": new.url, "weight": 2, "gpu_memory_gb": 8}
            created = http.post("/admin/nodes", json=spec)
            assert created.status_code == 201, created.text
            body = created.json()
            assert body["node"]["source"] == "registered" and body["node"]["weight"] == 2
            assert body["operations"] == []  # no tiers configured: nothing to distribute
            assert http.post("/admin/nodes", json=spec).status_code == 409
            chat = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
            assert wait_for(lambda: http.post("/v1/chat/completions", json=chat).status_code == 200, 5)
            assert http.post("/v1/chat/completions", json=chat).headers["x-proxy-backend"] == "gpu-9"
        with running_proxy(config) as proxy, client(proxy) as http:
            restored = node_view(http, "gpu-9")
            assert (restored["source"], restored["url"], restored["weight"], restored["gpu_memory_gb"]) == (
                "registered", new.url, 2, 8)  # fmt: skip
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
            removed = http.delete("/admin/nodes/gpu-9")
            assert removed.status_code == 200 and removed.json() == {"removed": "gpu-9", "in_flight_left": 0}
            assert http.get("/admin/nodes/gpu-9").status_code == 404
            assert http.post("/v1/chat/completions", json=chat).status_code == 404
        with running_proxy(config) as proxy, client(proxy) as http:
            assert [n["name"] for n in http.get("/admin/nodes").json()["data"]] == ["base"]
    rows = sqlite3.connect(tmp_path / "proxy.db").execute(
        "SELECT endpoint, backend FROM requests WHERE endpoint LIKE 'admin:%' ORDER BY started_at").fetchall()  # fmt: skip
    assert rows == [("admin:register_node", "gpu-9"), ("admin:remove_node", "gpu-9")]


def test_registration_is_checked_like_the_config_file(tmp_path):
    with SimOllama(models=[]) as node, running_proxy(fleet_config(tmp_path, {"gpu-1": node})) as proxy, \
            client(proxy) as http:  # fmt: skip
        cases = [
            ({"name": "x", "kind": "tgi", "url": node.url}, "kind", "expected one of ollama, vllm, openai"),
            ({"name": "x", "kind": "ollama", "url": "ftp://host"}, "url", "http"),
            ({"name": "x", "kind": "ollama"}, "url", "required"),
            ({"name": "x", "kind": "ollama", "url": node.url, "weight": -1}, "weight", "0 or greater"),
            ({"name": "x", "kind": "ollama", "url": node.url, "colour": "red"}, "colour", "unknown key"),
            ({"name": "x", "kind": "vllm", "url": node.url, "activate_command": ["rm", "-rf", "/"]},
             "activate_command", "config file"),
        ]  # fmt: skip
        for spec, param, words in cases:
            answer = http.post("/admin/nodes", json=spec)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == param and words in error["message"], error
        assert http.post("/admin/nodes", json={"name": "gpu-1", "kind": "ollama", "url": node.url}).status_code == 409
        # "$" is literal in registration data: the proxy's environment is not the caller's to read.
        secret = http.post("/admin/nodes", json={"name": "k", "kind": "ollama", "url": node.url, "api_key": "a$HOME"})
        assert secret.status_code == 201
        assert proxy.app.state.services.catalog.backends["k"].config.api_key == "a$HOME"
        assert http.delete("/admin/nodes/nope").status_code == 404


def test_a_config_node_can_be_drained_and_resumed_but_not_removed(tmp_path):
    models = [ModelSpec("llama3.1:8b")]
    with together(SimOllama(models=list(models)), SimOllama(models=list(models))) as (one, two):
        for node in (one, two):  # loaded on both: otherwise requests rightly stay where it is loaded
            node.load("llama3.1:8b")
        with running_proxy(fleet_config(tmp_path, {"one": one, "two": two})) as proxy, client(proxy) as http:
            refused = http.delete("/admin/nodes/one")
            assert refused.status_code == 409
            assert "config file" in refused.json()["error"]["message"]
            drained = http.post("/admin/nodes/one/drain")
            assert drained.status_code == 200 and drained.json()["draining"] is True
            chat = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
            used = {http.post("/v1/chat/completions", json=chat).headers["x-proxy-backend"] for _ in range(8)}
            assert used == {"two"}
            assert http.post("/admin/nodes/one/resume").json()["draining"] is False
            used = {http.post("/v1/chat/completions", json=chat).headers["x-proxy-backend"] for _ in range(30)}
            assert used == {"one", "two"}


def test_removing_a_node_waits_for_its_requests_in_flight(tmp_path):
    with SimOllama(models=[ModelSpec("llama3.1:8b")], behavior=Behavior(ttft=0.4)) as slow:
        with running_proxy(fleet_config(tmp_path, {})) as proxy, client(proxy) as http:
            assert (
                http.post("/admin/nodes", json={"name": "slow", "kind": "ollama", "url": slow.url}).status_code == 201
            )
            chat = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
            assert wait_for(lambda: http.get("/v1/models/llama3.1:8b").status_code == 200, 5)
            results = []
            worker = threading.Thread(target=lambda: results.append(http.post("/v1/chat/completions", json=chat)))
            worker.start()
            assert wait_for(lambda: node_view(http, "slow")["in_flight"] == 1, 3)
            busy = http.delete("/admin/nodes/slow", params={"timeout": 0.05})
            assert busy.status_code == 409 and "in flight" in busy.json()["error"]["message"]
            assert node_view(http, "slow")["draining"] is True  # it stays drained
            removed = http.delete("/admin/nodes/slow")  # waits (drain_timeout) for the request to finish
            worker.join()
            assert removed.status_code == 200 and removed.json()["in_flight_left"] == 0
            assert results[0].status_code == 200
            assert results[0].json()["choices"][0]["message"]["content"]


def test_auto_distribution_by_gpu_tier(tmp_path):
    with together(SimOllama(models=[]), SimOllama(models=[])) as (small, big):
        for sim in (small, big):
            sim.behavior.pull = PullBehavior(seconds=0.05)
        config = fleet_config(tmp_path, {"small": small})
        config["backends"][0]["gpu_memory_gb"] = 6
        config["distribution"]["tiers"] = TIERS
        with running_proxy(config) as proxy, client(proxy) as http:
            created = http.post("/admin/nodes", json={"name": "big", "kind": "ollama", "url": big.url,
                                                      "gpu_memory_gb": 12}).json()  # fmt: skip
            ops = created["operations"]
            assert [(o["node"], o["model"], o["params"]["scheduled"]) for o in ops] == [("big", "llama3.1:8b", True)]
            assert wait_op(http, ops[0]["id"])["state"] == "succeeded"
            assert big.find("llama3.1:8b") is not None
            # "auto": the nodes whose own tier lists the model.
            auto = http.post("/admin/models/pull", json={"model": "qwen3:4b", "nodes": "auto"}).json()["data"]
            assert [o["node"] for o in auto] == ["small"]
            assert wait_op(http, auto[0]["id"])["state"] == "succeeded"
            matrix = http.get("/admin/models/matrix").json()
    assert matrix["nodes"] == ["small", "big"]
    cells = {row["model"]: row["nodes"] for row in matrix["models"]}
    assert cells["llama3.1:8b"]["big"]["installed"] and not cells["llama3.1:8b"]["small"]["installed"]
    assert cells["qwen3:4b"]["small"]["installed"] and not cells["qwen3:4b"]["big"]["installed"]


def test_the_pull_window_holds_scheduled_pulls_and_the_matrix_shows_downloads(tmp_path):
    soon = datetime.now() + timedelta(hours=2)
    window = f"{soon:%H}:00-{(soon + timedelta(hours=1)):%H}:00"  # not now, whenever now is
    with SimOllama(models=[ModelSpec("llama3.1:8b")]) as node:
        node.behavior.pull = PullBehavior(seconds=0.05)
        node.load("llama3.1:8b")
        config = fleet_config(tmp_path, {}, pulls={"window": window})
        config["distribution"]["tiers"] = TIERS
        with running_proxy(config) as proxy, client(proxy) as http:
            ops = http.post("/admin/nodes", json={"name": "n", "kind": "ollama", "url": node.url,
                                                  "gpu_memory_gb": 4}).json()["operations"]  # fmt: skip
            scheduled = ops[0]["id"]
            assert wait_for(lambda: "pull window" in http.get(f"/admin/operations/{scheduled}").json()["status"], 3)
            explicit = http.post("/admin/models/pull", json={"model": "qwen3:4b", "nodes": ["n"]}).json()["data"][0]
            assert wait_op(http, explicit["id"])["state"] == "succeeded"
            waiting = http.get(f"/admin/operations/{scheduled}").json()
            assert waiting["state"] == "queued" and window in waiting["status"]
            assert node.pull_stats()["started"] == 1

            node.behavior.pull = PullBehavior(seconds=20)
            op = http.post("/admin/models/pull", json={"model": "phi3:mini", "nodes": ["n"]}).json()["data"][0]
            assert wait_for(lambda: http.get(f"/admin/operations/{op['id']}").json()["fraction"] > 0, 5)
            matrix = http.get("/admin/models/matrix").json()
            listing = node_view(http, "n")
            assert http.delete(f"/admin/operations/{op['id']}").json()["state"] == "cancelled"
            assert http.delete(f"/admin/operations/{scheduled}").json()["state"] == "cancelled"
    cells = {row["model"]: row["nodes"]["n"] for row in matrix["models"]}
    assert cells["llama3.1:8b"] == {"installed": True, "loaded": True, "downloading": False, "fraction": None,
                                    "operation": None}  # fmt: skip
    assert cells["qwen3:4b"]["installed"] and not cells["qwen3:4b"]["downloading"]
    pulling = cells["phi3:mini"]
    assert pulling["downloading"] and not pulling["installed"] and pulling["operation"] == op["id"]
    assert 0 < pulling["fraction"] < 1
    # The scheduled pull waits for its window: listed as downloading, at 0.
    assert cells["gemma3:1b"]["downloading"] and cells["gemma3:1b"]["fraction"] == 0
    assert {d["operation"] for d in listing["downloading"]} == {op["id"], scheduled}


def test_the_admin_api_needs_an_admin_key_when_keys_are_set(tmp_path):
    with SimOllama(models=[]) as node:
        config = fleet_config(tmp_path, {"gpu-1": node}, server={"admin_keys": ["adm-key"], "api_keys": ["sk-app"]})
        with running_proxy(config) as proxy, client(proxy) as http:
            for method, path in (("GET", "/admin/nodes"), ("POST", "/admin/models/pull"), ("GET", "/admin/operations"),
                                 ("POST", "/admin/models/activate"), ("DELETE", "/admin/nodes/gpu-1")):  # fmt: skip
                assert http.request(method, path).status_code == 401
                assert http.request(method, path, headers={"authorization": "Bearer sk-app"}).status_code == 401
            ok = http.get("/admin/nodes", headers={"authorization": "Bearer adm-key"})
            assert ok.status_code == 200 and ok.json()["data"][0]["name"] == "gpu-1"
            wrong = http.get("/admin/models/matrix", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
