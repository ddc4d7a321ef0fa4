"""The node agent as a real process: it supervises the vLLM simulator as its child (restarted when
killed, counted; no orphan when the agent stops), registers with a real proxy, which shows its
hardware, runtime and alerts, and reports GPUs from a fake ``nvidia-smi`` on PATH."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import httpx

from proxy.node import hardware
from proxy.sim import ModelSpec, SimOllama
from tests.node_support import (
    ADMIN_KEY,
    NODE_TOKEN,
    alive,
    free_port,
    running_agent,
    sim_command,
    stop_agent,
    wait_until,  # fmt: skip
)
from tests.support import running_proxy

FIXTURES = Path(__file__).parent / "fixtures"
SUPERVISION = "supervisor:\n  backoff: 0.2\n  max_backoff: 1\n  stop_timeout: 5\nheartbeat_interval: 0.5\n"


def proxy_config(tmp_path, **extra) -> dict:
    return {"server": {"admin_keys": [ADMIN_KEY]}, "storage": {"path": str(tmp_path / "proxy.db")},
            "timeouts": {"connect": 2, "first_byte": 10, "idle": 10}, "health": {"interval": 30},
            "pulls": {"backoff": 0.05}, "distribution": {"manifest_path": str(tmp_path / "manifest.json")},
            **extra}  # fmt: skip


def admin(proxy) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, timeout=20, headers={"authorization": f"Bearer {ADMIN_KEY}"})


def node(http: httpx.Client, name: str) -> dict | None:
    answer = http.get(f"/admin/nodes/{name}")
    return answer.json() if answer.status_code == 200 else None


def test_the_agent_restarts_its_runtime_counts_it_and_leaves_no_orphan(tmp_path):
    port = free_port()
    runtime_url = f"http://127.0.0.1:{port}"
    with running_proxy(proxy_config(tmp_path)) as proxy, admin(proxy) as http:
        with running_agent(tmp_path, name="gpu-a", runtime="vllm", runtime_url=runtime_url, proxy_url=proxy.url,
                           run=sim_command(port, "--served-model-name", "tiny"), config=SUPERVISION) as agent:  # fmt: skip
            view = wait_until(lambda: (v := node(http, "gpu-a")) and v["runtime"]["state"] == "running" and v, 60)
            assert view, agent.log()
            assert (view["agent"], view["kind"], view["url"], view["source"]) == (True, "vllm", runtime_url,
                                                                                  "registered")  # fmt: skip
            runtime = view["runtime"]
            assert (runtime["kind"], runtime["restarts"], runtime["version"]) == ("vllm", 0, "0.11.0")
            assert runtime["memory_bytes"] > 1_000_000 and runtime["uptime_seconds"] >= 0
            first = runtime["pid"]
            assert os.getpgid(first) == first  # its own process group, which is what stop signals
            assert os.getpgid(first) != os.getpgid(agent.proc.pid)

            # The sim answers a moment before it prints its line: wait for the line, so the log can be counted.
            log = tmp_path / "gpu-a-runtime.log"
            assert wait_until(lambda: log.exists() and "listening on" in log.read_text(), 30)
            os.kill(first, signal.SIGKILL)
            back = wait_until(lambda: (r := agent.status()["runtime"]) and r["state"] == "running"
                              and r["pid"] not in (None, first) and r, 60)  # fmt: skip
            assert back, agent.log()
            assert back["restarts"] == 1
            assert wait_until(lambda: node(http, "gpu-a")["runtime"]["restarts"] == 1, 30)
            assert "runtime exited" in agent.log()
            second = back["pid"]
            assert wait_until(lambda: log.read_text().count("listening on") == 2, 30)  # the new child's output too
            assert stop_agent(agent.proc) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
            assert "agent gpu-a stopped (runtime stopped)" in agent.log()
        assert not alive(first) and not alive(second)
        assert log.read_text().count("vllm sim listening on") == 2  # nothing lost or doubled at the stop


def test_an_agent_killed_outright_takes_its_runtime_with_it(tmp_path):
    port = free_port()
    with running_agent(tmp_path, name="gpu-k", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                       proxy_url="http://127.0.0.1:1", run=sim_command(port), config=SUPERVISION) as agent:  # fmt: skip
        pid = wait_until(lambda: (r := agent.status()["runtime"]) and r["state"] == "running" and r["pid"], 60)
        assert pid, agent.log()
        agent.proc.kill()  # no clean shutdown: the kernel's parent-death signal stops the child
        agent.proc.wait(10)
        assert wait_until(lambda: not alive(pid), 30)


def test_registration_carries_the_gpus_and_tier_distribution_uses_them(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat {FIXTURES / 'nvidia-smi-two-gpus.csv'}\n")
    fake.chmod(0o755)
    tiers = [{"min_gpu_memory_gb": 0, "models": ["gemma3:1b"]}, {"min_gpu_memory_gb": 80, "models": ["qwen3:4b"]}]
    config = proxy_config(tmp_path, distribution={"manifest_path": str(tmp_path / "m.json"), "tiers": tiers})
    with SimOllama(models=[ModelSpec("gemma3:1b")]) as ollama, running_proxy(config) as proxy, admin(proxy) as http:
        with running_agent(tmp_path, name="gpu-b", runtime="ollama", runtime_url=ollama.url, proxy_url=proxy.url,
                           env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, config=SUPERVISION) as agent:  # fmt: skip
            view = wait_until(lambda: node(http, "gpu-b"), 60)
            assert view, agent.log()
            expected = hardware.parse_nvidia_smi((FIXTURES / "nvidia-smi-two-gpus.csv").read_text())
            assert view["hardware"]["gpus"] == expected
            assert view["gpu_memory_gb"] == round(81559 * 1024 * 1024 / 1e9, 1)
            assert view["tier_models"] == ["qwen3:4b"]
            (vram,) = [a for a in view["alerts"] if a["kind"] == "gpu_memory"]  # 70321 of 81559 MiB: 86%
            assert (vram["value"], vram["threshold"]) == (86.2, 85.0)
            assert {a["kind"] for a in view["alerts"]} <= {"gpu_memory", "memory", "disk"}  # this machine's own
            # External runtime: watched over its API only.
            assert (view["runtime"]["state"], view["runtime"]["pid"], view["runtime"]["kind"]) == ("running", None,
                                                                                               "ollama")  # fmt: skip
            with open("/proc/meminfo") as f:
                assert view["hardware"]["memory_total_bytes"] == hardware.parse_meminfo(f.read())[0]
            (disk,) = view["hardware"]["disks"]
            assert disk["path"] == str(tmp_path / "models") and disk["total_bytes"] == os.statvfs(tmp_path).f_blocks \
                * os.statvfs(tmp_path).f_frsize  # fmt: skip
            pulls = wait_until(lambda: http.get("/admin/operations", params={"node": "gpu-b"}).json()["data"], 30)
            assert [(op["kind"], op["model"]) for op in pulls] == [("pull", "qwen3:4b")]


def test_the_node_token_is_required_and_never_stored_in_the_clear(tmp_path):
    port = free_port()
    with running_proxy(proxy_config(tmp_path)) as proxy, admin(proxy) as http:
        with running_agent(tmp_path, name="gpu-t", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                           proxy_url=proxy.url, config=SUPERVISION) as agent:  # fmt: skip
            assert wait_until(lambda: node(http, "gpu-t"), 60), agent.log()
            with httpx.Client(base_url=agent.url) as bare:
                assert bare.get("/health").status_code == 200
                refused = bare.get("/status")
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
                assert bare.get("/status", headers={"authorization": "Bearer wrong"}).status_code == 401
            view = http.get("/admin/nodes/gpu-t").text
            assert NODE_TOKEN not in view
            # Registration needs the admin key, like the rest of /admin.
            assert httpx.post(f"{proxy.url}/admin/agents", json={}).status_code == 401
            # A heartbeat for a node the proxy does not know asks the agent to register.
            assert http.post("/admin/agents/nobody/heartbeat", json={}).status_code == 404
    rows = sqlite3.connect(tmp_path / "proxy.db").execute("SELECT spec FROM nodes").fetchall()
    assert rows and all(NODE_TOKEN not in spec and "sealed:v1:" in spec for (spec,) in rows)


def test_the_agent_refuses_a_model_that_could_pass_for_an_option(tmp_path):
    port = free_port()
    with running_agent(tmp_path, name="gpu-o", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                       proxy_url="http://127.0.0.1:1", run=sim_command(port), config=SUPERVISION) as agent:  # fmt: skip
        with agent.client() as http:
            for body in ({"model": "--trust-remote-code"}, {"model": "acme/x", "served_name": "../../x"}, {}):
                refused = http.post("/runtime/activate", json=body)
                assert refused.status_code == 400, refused.text
            assert http.post("/hf/pull", json={"model": "not-a-repo"}).json()["error"]["param"] == "model"
        assert agent.status()["runtime"]["restarts"] == 0


def test_a_runtime_that_starts_after_registering_is_online_before_the_next_health_round(tmp_path):
    # The agent registers as it starts its runtime, so the proxy's first probe finds nothing; the agent
    # beats again as soon as the runtime runs, and the proxy looks again then: well before either's
    # ten- and thirty-second rounds. (A request would make the proxy look too; the overview would not.)
    port = free_port()
    slow = "supervisor:\n  backoff: 0.2\nheartbeat_interval: 10\n"
    with running_proxy(proxy_config(tmp_path)) as proxy, admin(proxy) as http:
        with running_agent(tmp_path, name="gpu-s", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                           proxy_url=proxy.url, config=slow,
                           run=f"sh -c 'sleep 2; exec {sim_command(port, '--served-model-name', 'tiny')}'") as agent:  # fmt: skip
            first = wait_until(lambda: node(http, "gpu-s"), 30)
            assert first and first["state"] != "online", agent.log()  # what the first probe found
            assert wait_until(lambda: node(http, "gpu-s")["state"] == "online", 7), (node(http, "gpu-s"), agent.log())
            loaded = node(http, "gpu-s")["loaded"]
            assert [m["model"] for m in loaded] == ["tiny"]
