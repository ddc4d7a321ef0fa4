"""An open ``/admin/operations/{id}/events`` stream does not hold up the server's shutdown.

uvicorn waits for open responses before it runs the shutdown (up to its
30-second grace), and a pull can run for an hour: the stream must end when the
server is told to stop. A real ``llm-proxy serve`` process, a real SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading

import httpx
import yaml

from proxy.sim import ModelSpec, SimOllama
from proxy.sim.behavior import PullBehavior
from tests.support import wait_for
from tests.test_cli import ROOT, free_port, wait_until_up


def test_an_open_operation_stream_ends_when_the_server_is_stopped(tmp_path):
    with SimOllama(models=[ModelSpec("llama3.1:8b")]) as node:
        node.behavior.pull = PullBehavior(seconds=120)
        port = free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": port},
            "storage": {"path": str(tmp_path / "proxy.db")},
            "backends": [{"name": "n1", "kind": "ollama", "url": node.url}],
            "models": [{"name": "chat", "target": "llama3.1:8b"}],
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        frames: list[dict] = []
        ended = threading.Event()

        def follow(op_id: str) -> None:
            try:
                with httpx.stream("GET", f"{url}/admin/operations/{op_id}/events", timeout=120) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            frames.append(json.loads(line[6:]))
            except httpx.HTTPError:
                pass
            ended.set()

        try:
            wait_until_up(f"{url}/health", proc, timeout=40)
            answer = httpx.post(f"{url}/admin/models/pull", json={"model": "big:70b", "nodes": ["n1"]}, timeout=20)
            assert answer.status_code == 202, answer.text
            op_id = answer.json()["data"][0]["id"]
            assert wait_for(lambda: node.pull_stats()["active"] == 1, 10)
            follower = threading.Thread(target=follow, args=(op_id,), daemon=True)
            follower.start()
            assert wait_for(lambda: bool(frames), 10)  # the stream is open

            proc.send_signal(signal.SIGTERM)
            # Well inside uvicorn's 30-second grace, which an endless stream would otherwise use up.
            assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
            assert ended.wait(5)
            assert frames[-1]["state"] in ("queued", "running")  # cut by the shutdown, not by the pull's end
            with sqlite3.connect(tmp_path / "proxy.db") as db:
                state = db.execute("SELECT state FROM model_operations WHERE id = ?", (op_id,)).fetchone()[0]
            assert state == "interrupted"  # and the shutdown ran to the end: the operation was closed properly
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
