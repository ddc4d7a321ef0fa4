"""What the proxy keeps of its agents, told by registrations sent as an agent would: the GPU memory
follows every registration (a GPU swapped or added), stored for a registered node, with the pulls of
its new tier; and GET /admin/nodes asks every agent at once, bounded by one connect timeout, saying
which agent did not answer."""

from __future__ import annotations

import socket

import httpx

from proxy.sim import ModelSpec, SimOllama
from tests.node_support import free_port, wait_until
from tests.support import running_proxy
from tests.test_node_agent import admin, node, proxy_config

TOKEN = "t" * 24


def _agent(name: str, kind: str, url: str, agent_url: str, gpu: float | None) -> dict:
    body = {"name": name, "kind": kind, "url": url, "agent_url": agent_url, "token": TOKEN}
    return body if gpu is None else {**body, "gpu_memory_gb": gpu}


def test_a_later_registration_updates_gpu_memory_and_the_tier_follows(tmp_path):
    tiers = [{"min_gpu_memory_gb": 0, "models": ["gemma3:1b"]}, {"min_gpu_memory_gb": 40, "models": ["qwen3:4b"]}]
    config = proxy_config(tmp_path, distribution={"manifest_path": str(tmp_path / "m.json"), "tiers": tiers})
    dead = f"http://127.0.0.1:{free_port()}"  # the agent's own URL: not needed to register
    with SimOllama(models=[ModelSpec("gemma3:1b")]) as ollama:
        with running_proxy(config) as proxy, admin(proxy) as http:
            first = http.post("/admin/agents", json=_agent("gpu-g", "ollama", ollama.url, dead, 24))
            assert first.status_code == 201, first.text
            assert [op["model"] for op in first.json()["operations"]] == ["gemma3:1b"]
            assert (node(http, "gpu-g")["gpu_memory_gb"], node(http, "gpu-g")["tier_models"]) == (24, ["gemma3:1b"])
            # A second GPU: 48 GB now. The node follows, and is sent its new tier's models only.
            again = http.post("/admin/agents", json=_agent("gpu-g", "ollama", ollama.url, dead, 48))
            assert again.status_code == 200, again.text
            assert [op["model"] for op in again.json()["operations"]] == ["qwen3:4b"]
            view = node(http, "gpu-g")
            assert (view["gpu_memory_gb"], view["tier_models"]) == (48, ["qwen3:4b"])
            # The same figure again changes nothing and starts nothing.
            same = http.post("/admin/agents", json=_agent("gpu-g", "ollama", ollama.url, dead, 48))
            assert same.json()["operations"] == []
        # Stored: a restarted proxy has the new figure before the agent says anything.
        with running_proxy(config) as proxy, admin(proxy) as http:
            assert node(http, "gpu-g")["gpu_memory_gb"] == 48


def test_a_config_file_gpu_figure_is_the_operators_word(tmp_path):
    config = proxy_config(tmp_path, backends=[{"name": "fixed", "kind": "vllm", "url": "http://127.0.0.1:9",
                                               "gpu_memory_gb": 24}, {"name": "free", "kind": "vllm",
                                                                       "url": "http://127.0.0.1:9"}])  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}"
    with running_proxy(config) as proxy, admin(proxy) as http:
        for name in ("fixed", "free"):
            answer = http.post("/admin/agents", json=_agent(name, "vllm", "http://127.0.0.1:9", dead, 80))
            assert answer.status_code == 200, answer.text
        assert node(http, "fixed")["gpu_memory_gb"] == 24
        assert node(http, "free")["gpu_memory_gb"] == 80  # none in the file: the agent's measure


def test_the_node_list_is_bounded_by_one_connect_timeout_and_names_the_agents_that_did_not_answer(tmp_path):
    config = proxy_config(tmp_path)
    config["timeouts"] = {"connect": 1, "first_byte": 30, "idle": 30}  # a hung agent must not get first_byte
    closed = f"http://127.0.0.1:{free_port()}"
    hung = []
    for _ in range(8):  # they accept (the kernel does) and never answer
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        hung.append(sock)
    try:
        with running_proxy(config) as proxy, admin(proxy) as http:
            agents = {"closed": closed, **{f"hung-{i}": f"http://127.0.0.1:{s.getsockname()[1]}"
                                           for i, s in enumerate(hung)}}  # fmt: skip
            for name, url in agents.items():
                answer = http.post("/admin/agents", json=_agent(name, "vllm", "http://127.0.0.1:9", url, None))
                assert answer.status_code == 201, answer.text
            assert wait_until(lambda: len(http.get("/admin/nodes").json()["data"]) == 9, 20)
            # Asked one after another, eight hung agents would take eight connect timeouts; a loose bound
            # (five) tells the two apart on a loaded machine.
            with httpx.Client(base_url=proxy.url, headers=http.headers, timeout=5) as quick:
                listed = quick.get("/admin/nodes")
            assert listed.status_code == 200
            views = {v["name"]: v for v in listed.json()["data"]}
            for i, sock in enumerate(hung):
                url = f"http://127.0.0.1:{sock.getsockname()[1]}"
                assert views[f"hung-{i}"]["agent"] is True
                assert views[f"hung-{i}"]["agent_error"] == f"the agent at {url} did not answer within 1s"
            assert views["closed"]["agent_error"].startswith(f"the agent at {closed}: ")
    finally:
        for sock in hung:
            sock.close()
