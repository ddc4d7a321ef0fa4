"""An agent registers with ``llm-proxy serve --workers 2``: every worker shows the node with its agent
(the link comes through the fleet store), and when the agent goes away every worker says so and keeps
its last report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import yaml

from tests.node_support import free_port as agent_port
from tests.node_support import running_agent, sim_command, stop_agent, wait_until
from tests.test_cli import ROOT, free_port, wait_until_up

N = 16


def fresh(url: str, path: str) -> dict | None:
    # Connection: close, so the kernel spreads the reads over both workers.
    answer = httpx.get(url + path, headers={"connection": "close"}, timeout=15)
    return answer.json() if answer.status_code == 200 else None


def test_every_worker_shows_the_agent_and_notices_it_gone(tmp_path):
    port = free_port()
    config = {"server": {"host": "127.0.0.1", "port": port}, "storage": {"path": str(tmp_path / "proxy.db")},
              "timeouts": {"connect": 1, "first_byte": 5, "idle": 5}, "health": {"interval": 60},
              "distribution": {"manifest_path": str(tmp_path / "manifest.json")}}  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, timeout=60)
        runtime_port = agent_port()
        with running_agent(tmp_path, name="gpu-w", runtime="vllm", runtime_url=f"http://127.0.0.1:{runtime_port}",
                           proxy_url=url, run=sim_command(runtime_port),
                           config="heartbeat_interval: 0.5\n") as agent:  # fmt: skip
            assert wait_until(lambda: (v := fresh(url, "/admin/nodes/gpu-w")) and v["runtime"]["state"] == "running",
                              60), agent.log()  # fmt: skip
            views = [fresh(url, "/admin/nodes/gpu-w") for _ in range(N)]
            assert all(v and v["agent"] is True and v["hardware"]["cpu_count"] == os.cpu_count() for v in views)
            assert all(v["agent_error"] is None and v["runtime"]["kind"] == "vllm" for v in views)
            stop_agent(agent.proc)
            views = [fresh(url, "/admin/nodes/gpu-w") for _ in range(N)]
        assert all(v["agent"] is True and v["agent_error"] for v in views)  # not answering, said so
        assert all(v["hardware"] and v["hardware"]["memory_total_bytes"] > 0 for v in views)  # its last report
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
