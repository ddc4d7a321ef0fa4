"""Activation: an alias repointed to another model on Ollama (preload, unload) and on vLLM (the
node's activate_command restarts a simulated vLLM), persisted across restarts, failing safely."""

from __future__ import annotations

import sys
import threading

from proxy.sim import Behavior, ModelSpec, SimOllama, SimVLLM
from proxy.sim.behavior import PullBehavior
from tests.support import running_proxy, wait_for
from tests.test_admin_pull import client, fleet_config, together, wait_op

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def ask(http, model: str):
    return http.post("/v1/chat/completions", json={"model": model, **CHAT})


def models(*names: str) -> list[ModelSpec]:
    return [ModelSpec(n) for n in names]


def test_ollama_activation_preloads_switches_unloads_and_persists(tmp_path):
    installed = models("llama3.1:8b", "qwen3:4b", "gemma3:1b")
    with together(SimOllama(models=list(installed)), SimOllama(models=list(installed))) as (one, two):
        config = fleet_config(tmp_path, {"one": one, "two": two},
                              models=[{"name": "chat", "target": "llama3.1:8b"}])  # fmt: skip
        with running_proxy(config) as proxy, client(proxy) as http:
            assert ask(http, "chat").headers["x-proxy-model"] == "llama3.1:8b"
            one.load("llama3.1:8b")
            two.load("llama3.1:8b")
            answer = http.post(
                "/admin/models/activate", json={"alias": "chat", "model": "qwen3:4b", "unload_old": True}
            )
            assert answer.status_code == 202, answer.text
            op = answer.json()
            assert (op["kind"], op["alias"], op["model"], op["params"]["nodes"]) == ("activate", "chat", "qwen3:4b",
                                                                                     ["one", "two"])  # fmt: skip
            final = wait_op(http, op["id"])
            assert final["state"] == "succeeded", final
            assert final["result"]["previous"] == "llama3.1:8b" and final["result"]["target"] == "qwen3:4b"
            assert final["result"]["unloaded"] == {"one": "unloaded", "two": "unloaded"}
            for sim in (one, two):
                assert set(sim.loaded_models()) == {"qwen3:4b"}  # preloaded; the old one unloaded
            load = [r[2] for r in one.requests if r[1] == "/api/generate" and r[2].get("model") == "qwen3:4b"]
            assert load == [{"model": "qwen3:4b", "keep_alive": "30m"}]
            assert {ask(http, "chat").headers["x-proxy-model"] for _ in range(4)} == {"qwen3:4b"}
            cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
            assert cards["chat"]["target"] == "qwen3:4b"
        with running_proxy(config) as proxy, client(proxy) as http:
            assert ask(http, "chat").headers["x-proxy-model"] == "qwen3:4b"  # the override outlived the process
        # An operator who edits the alias in the config file afterwards means it: the file wins.
        config["models"] = [{"name": "chat", "target": "gemma3:1b"}]
        with running_proxy(config) as proxy, client(proxy) as http:
            assert ask(http, "chat").headers["x-proxy-model"] == "gemma3:1b"


def test_ollama_activation_needs_the_model_everywhere_or_pulls_it_first(tmp_path):
    with together(SimOllama(models=models("llama3.1:8b", "qwen3:4b")), SimOllama(models=models("llama3.1:8b"))) as (
        one,
        two,
    ):
        two.behavior.pull = PullBehavior(seconds=0.4)
        config = fleet_config(tmp_path, {"one": one, "two": two},
                              models=[{"name": "chat", "target": "llama3.1:8b"}])  # fmt: skip
        with running_proxy(config) as proxy, client(proxy) as http:
            refused = http.post("/admin/models/activate", json={"alias": "chat", "model": "qwen3:4b"})
            assert refused.status_code == 409
            error = refused.json()["error"]
            assert error["code"] == "model_not_installed" and error["missing_nodes"] == ["two"]
            assert "two" in error["message"]
            op = http.post("/admin/models/activate", json={"alias": "chat", "model": "qwen3:4b", "pull": True}).json()
            (child,) = op["params"]["children"]
            busy = http.post("/admin/models/activate", json={"alias": "chat", "model": "llama3.1:8b"})
            assert busy.status_code == 409 and op["id"] in busy.json()["error"]["message"]
            assert wait_for(lambda: 0 < http.get(f"/admin/operations/{op['id']}").json()["fraction"] < 1, 5)
            final = wait_op(http, op["id"])
            assert final["state"] == "succeeded", final
            pulled = http.get(f"/admin/operations/{child}").json()
            assert (pulled["kind"], pulled["node"], pulled["state"]) == ("pull", "two", "succeeded")
            assert two.find("qwen3:4b") is not None
            assert {ask(http, "chat").headers["x-proxy-model"] for _ in range(4)} == {"qwen3:4b"}


def test_a_failed_ollama_activation_leaves_the_alias_where_it_was(tmp_path):
    with SimOllama(models=models("llama3.1:8b")) as node:
        node.behavior.pull = PullBehavior(unknown_models=["ghost:7b"])
        config = fleet_config(tmp_path, {"one": node}, models=[{"name": "chat", "target": "llama3.1:8b"}])
        with running_proxy(config) as proxy, client(proxy) as http:
            op = http.post("/admin/models/activate", json={"alias": "chat", "model": "ghost:7b", "pull": True}).json()
            final = wait_op(http, op["id"])
            assert final["state"] == "failed"
            assert "file does not exist" in final["error"] and "stays on llama3.1:8b" in final["error"]
            assert ask(http, "chat").headers["x-proxy-model"] == "llama3.1:8b"


def switch_command(vllm: SimVLLM, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy.sim", "switch", "--url", vllm.url, "{model}", "--downtime", "0.2", *extra]


def test_vllm_activation_restarts_the_node_lets_requests_finish_and_switches(tmp_path):
    slow = Behavior(ttft=0.3)
    with SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"], behavior=slow) as vllm:
        config = fleet_config(tmp_path, {}, models=[{"name": "qwen", "target": "qwen2.5-7b", "backends": ["vllm-1"]}])
        config["backends"] = [{"name": "vllm-1", "kind": "vllm", "url": vllm.url, "activate_timeout": 10,
                               "activate_command": switch_command(vllm, "--served-model-name", "{served_name}")}]  # fmt: skip
        with running_proxy(config) as proxy, client(proxy) as http:
            before = []
            worker = threading.Thread(target=lambda: before.append(ask(http, "qwen")))
            worker.start()
            health = proxy.app.state.services.catalog.health["vllm-1"]
            assert wait_for(lambda: health.in_flight == 1, 3)
            op = http.post("/admin/models/activate", json={"alias": "qwen", "model": "Qwen/Qwen3-8B"}).json()
            final = wait_op(http, op["id"], timeout=15)
            worker.join()
            assert final["state"] == "succeeded", final
            assert final["result"]["target"] == "Qwen/Qwen3-8B" and final["result"]["previous"] == "qwen2.5-7b"
            # The request that was running on the old model finished before the restart.
            assert before[0].status_code == 200 and before[0].headers["x-proxy-model"] == "qwen2.5-7b"
            assert vllm.restarts == 1 and vllm.model == "Qwen/Qwen3-8B"
            assert ask(http, "qwen").headers["x-proxy-model"] == "Qwen/Qwen3-8B"
            assert health.draining is False
            # With a served name: the alias points at the name vLLM serves the model under.
            op = http.post("/admin/models/activate", json={"alias": "qwen", "model": "Qwen/Qwen3-14B",
                                                           "served_name": "qwen3"}).json()  # fmt: skip
            final = wait_op(http, op["id"], timeout=15)
            assert final["state"] == "succeeded", final
            assert vllm.served_model_names == ["qwen3"]
            assert ask(http, "qwen").headers["x-proxy-model"] == "qwen3"


def test_vllm_activation_failures_leave_the_alias_and_say_why(tmp_path):
    sims = (SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"]),
            SimVLLM(model="mistralai/Mistral-7B", served_model_names=["mistral"]),
            SimVLLM(model="plain", served_model_names=["plain"]))  # fmt: skip
    with together(*sims) as (back, broken, manual):
        fail = [sys.executable, "-c", "import sys; sys.stderr.write('unit vllm@gpu2 not found'); sys.exit(5)"]
        config = fleet_config(tmp_path, {}, models=[
            {"name": "qwen", "target": "qwen2.5-7b", "backends": ["back"]},
            {"name": "mistral", "target": "mistral", "backends": ["broken"]},
            {"name": "plain", "target": "plain", "backends": ["manual"]},
        ])  # fmt: skip
        config["backends"] = [
            {"name": "back", "kind": "vllm", "url": back.url, "activate_timeout": 1.5,
             "activate_command": switch_command(back, "--outcome", "old_model")},
            {"name": "broken", "kind": "vllm", "url": broken.url, "activate_command": fail},
            {"name": "manual", "kind": "vllm", "url": manual.url},
        ]  # fmt: skip
        with running_proxy(config) as proxy, client(proxy) as http:
            ops = [http.post("/admin/models/activate", json={"alias": alias, "model": "Qwen/Qwen3-8B"}).json()["id"]
                   for alias in ("qwen", "mistral")]  # fmt: skip
            came_back_old, exited = (wait_op(http, i, timeout=10) for i in ops)
            assert came_back_old["state"] == "failed"
            assert "did not serve 'Qwen/Qwen3-8B' within 1.5s" in came_back_old["error"]
            assert "it serves qwen2.5-7b" in came_back_old["error"] and "stays on qwen2.5-7b" in came_back_old["error"]
            assert exited["state"] == "failed"
            assert "exited with status 5" in exited["error"] and "unit vllm@gpu2 not found" in exited["error"]
            assert ask(http, "qwen").headers["x-proxy-model"] == "qwen2.5-7b"
            assert ask(http, "mistral").headers["x-proxy-model"] == "mistral"
            assert not any(h.draining for h in proxy.app.state.services.catalog.health.values())
            cases = [
                ({"alias": "plain", "model": "x"}, 409, "activate_command"),
                ({"alias": "nope", "model": "x"}, 404, "No alias"),
                ({"alias": "qwen"}, 400, "model is required"),
                ({"alias": "qwen", "model": "x", "pull": "yes"}, 400, "pull must be"),
                ({"alias": "qwen", "model": "--config=/etc/shadow"}, 400, "cannot be passed to activate_command"),
                ({"alias": "qwen", "model": "x", "served_name": "a b"}, 400, "cannot be passed"),
            ]
            for body, status, words in cases:
                answer = http.post("/admin/models/activate", json=body)
                assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
