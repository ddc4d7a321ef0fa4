"""Pulls and deletes through the admin API, against simulated Ollama nodes over real HTTP.

The simulated nodes stream ``/api/pull`` like Ollama (layers, a progress line every 60 ms,
pauses, failures half-way, resumed partial layers) and count the pull requests they get, so
the tests check what the proxy did from the node's side too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import httpx

from proxy.sim import ModelSpec, SimOllama
from proxy.sim.behavior import PullBehavior
from tests.support import running_proxy, wait_for

ACTIVE = ("queued", "running")


def fleet_config(tmp_path, nodes: dict, *, pulls: dict | None = None, **extra) -> dict:
    """A proxy config over ``nodes`` (name -> sim or URL), its database in ``tmp_path``."""
    return {
        "storage": {"path": str(tmp_path / "proxy.db")},
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "health": {"interval": 30},
        "pulls": {"backoff": 0.02, **(pulls or {})},
        "distribution": {"manifest_path": str(tmp_path / "manifest.json")},
        "backends": [
            {"name": n, "kind": "ollama", "url": s if isinstance(s, str) else s.url} for n, s in nodes.items()
        ],
        **extra,
    }


@contextlib.contextmanager
def together(*sims):
    """Start simulated nodes; stop them all at once at the end (each stop waits ~0.2 s for uvicorn)."""
    with contextlib.ExitStack() as stack:
        for sim in sims:
            stack.enter_context(sim)
        try:
            yield sims
        finally:
            stack.pop_all()
            stoppers = [threading.Thread(target=sim.stop) for sim in sims]
            for thread in stoppers:
                thread.start()
            for thread in stoppers:
                thread.join()


def client(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=15)


def wait_op(http: httpx.Client, op_id: str, timeout: float = 10.0) -> dict:
    seen = {}

    def done() -> bool:
        seen.update(http.get(f"/admin/operations/{op_id}").json())
        return seen["state"] not in ACTIVE

    assert wait_for(done, timeout), seen
    return seen


def events(http: httpx.Client, op_id: str) -> list[dict]:
    frames = []
    with http.stream("GET", f"/admin/operations/{op_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                frames.append(json.loads(line[len("data: ") :]))
    return frames


def test_progress_streams_monotonically_and_matches_the_simulated_bytes(tmp_path):
    with SimOllama(models=[]) as node:
        # A pause at 40% (the ticker repeats the same count), half a second in all.
        node.behavior.pull = PullBehavior(seconds=0.35, stall_at=0.4, stall_seconds=0.15)
        with running_proxy(fleet_config(tmp_path, {"gpu-1": node})) as proxy, client(proxy) as http:
            answer = http.post("/admin/models/pull", json={"model": "llama3.2:3b", "nodes": ["gpu-1"]})
            assert answer.status_code == 202
            (op,) = answer.json()["data"]
            assert (op["kind"], op["node"], op["model"], op["state"]) == ("pull", "gpu-1", "llama3.2:3b", "queued")
            frames = events(http, op["id"])
    assert frames[-1]["state"] == "succeeded"
    assert all(f["state"] in ACTIVE for f in frames[:-1])  # the stream ends with the operation
    for before, after in zip(frames, frames[1:]):
        assert after["completed"] >= before["completed"]
        assert after["fraction"] >= before["fraction"]
    statuses = [f["status"] for f in frames]
    assert "verifying sha256 digest" in statuses and statuses[-1] == "success"
    assert any(s.startswith("pulling ") and s != "pulling manifest" for s in statuses)
    size = node.pulled_bytes("llama3.2:3b")
    assert frames[-1]["completed"] == frames[-1]["total"] == size
    assert frames[-1]["fraction"] == 1.0
    mid = [f for f in frames if 0 < f["fraction"] < 1]
    assert mid, "no progress between start and end"
    assert any(f["speed"] and f["eta_seconds"] is not None for f in mid)
    assert frames[-1]["result"]["digest"] == node.find("llama3.2:3b").digest
    assert node.pull_stats()["started"] == 1


def test_retries_resume_give_up_after_pulls_attempts_and_skip_what_cannot_succeed(tmp_path):
    with SimOllama(models=[]) as node:
        node.behavior.pull = PullBehavior(seconds=0.3, fail="error", fail_at=0.5, fail_times=1)
        config = fleet_config(tmp_path, {"gpu-1": node}, pulls={"attempts": 2})
        with running_proxy(config) as proxy, client(proxy) as http:
            op = http.post("/admin/models/pull", json={"model": "qwen3:4b", "nodes": "all"}).json()["data"][0]
            frames = events(http, op["id"])
            final = frames[-1]
            assert final["state"] == "succeeded" and final["attempts"] == 2
            assert any("attempt 1 of 2 failed" in f["status"] and "unexpected EOF" in f["status"] for f in frames)
            fractions = [f["fraction"] for f in frames]
            assert fractions == sorted(fractions)  # the retry did not start the count again
            stats = node.pull_stats()
            assert (stats["started"], stats["failed"], stats["completed"]) == (2, 1, 1)
            assert final["completed"] == node.pulled_bytes("qwen3:4b")

            node.reset()
            node.behavior.pull = PullBehavior(seconds=0.1, fail="drop", fail_at=0.3)  # fails every time
            op = http.post("/admin/models/pull", json={"model": "gemma3:1b"}).json()["data"][0]
            final = wait_op(http, op["id"])
            assert (final["state"], final["attempts"]) == ("failed", 2)
            assert "attempt 2 of 2" in final["error"]
            assert node.pull_stats()["started"] == 2

            node.reset()
            node.behavior.pull = PullBehavior(unknown_models=["no-such-model:1b"])
            op = http.post("/admin/models/pull", json={"model": "no-such-model:1b"}).json()["data"][0]
            final = wait_op(http, op["id"])
            assert (final["state"], final["attempts"]) == ("failed", 1)  # not in the registry: no retry
            assert "file does not exist" in final["error"]
            assert node.pull_stats()["started"] == 1


def test_cancel_stops_the_download_and_the_node_keeps_the_partial_layers(tmp_path):
    with SimOllama(models=[]) as node:
        node.behavior.pull = PullBehavior(seconds=20)
        with running_proxy(fleet_config(tmp_path, {"gpu-1": node})) as proxy, client(proxy) as http:
            op = http.post("/admin/models/pull", json={"model": "qwen3:4b"}).json()["data"][0]
            again = http.post("/admin/models/pull", json={"model": "qwen3:4b"}).json()["data"][0]
            assert again["id"] == op["id"]  # the same pull asked twice is one operation
            assert wait_for(lambda: http.get(f"/admin/operations/{op['id']}").json()["completed"] > 0, 5)
            cancelled = http.delete(f"/admin/operations/{op['id']}")
            assert cancelled.status_code == 200
            assert cancelled.json()["state"] == "cancelled"
            assert wait_for(lambda: node.pull_stats()["active"] == 0, 5)
            again = http.delete(f"/admin/operations/{op['id']}")
            assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
            kept = node.pulled_bytes("qwen3:4b")
            assert 0 < kept < ModelSpec("qwen3:4b").size
            assert node.find("qwen3:4b") is None  # not installed
            # Retrying resumes from what is on disk.
            node.behavior.pull = PullBehavior(seconds=0.2)
            retried = http.post(f"/admin/operations/{op['id']}/retry")
            assert retried.status_code == 202 and retried.json()["id"] == op["id"]
            final = wait_op(http, op["id"])
    assert final["state"] == "succeeded"
    assert node.pull_stats()["cancelled"] == 1


def test_parallel_limits_one_per_node_and_max_parallel_in_all(tmp_path):
    nodes = {f"gpu-{i}": SimOllama(models=[]) for i in range(3)}
    for sim in nodes.values():
        sim.behavior.pull = PullBehavior(seconds=0.12)
    with together(*nodes.values()):
        config = fleet_config(tmp_path, nodes, pulls={"max_parallel": 2})
        with running_proxy(config) as proxy, client(proxy) as http:
            busiest = []
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    busiest.append(sum(s.pull_stats()["active"] for s in nodes.values()))
                    time.sleep(0.003)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                ids = [op["id"] for model in ("qwen3:4b", "gemma3:1b")
                       for op in http.post("/admin/models/pull", json={"model": model, "nodes": "all"}).json()["data"]]  # fmt: skip
                finals = [wait_op(http, i) for i in ids]
            finally:
                stop.set()
                sampler.join()
            manager = proxy.app.state.services.fleet.manager
            assert manager.pulls_running_max == 2
    assert [f["state"] for f in finals] == ["succeeded"] * 6
    assert all(s.pull_stats()["max_active"] == 1 for s in nodes.values())  # one pull at a time per node
    assert all(s.pull_stats()["completed"] == 2 for s in nodes.values())
    assert max(busiest) <= 2
    assert any(f["status"] for f in finals)


def test_an_offline_node_fails_at_once_and_holds_up_nobody(tmp_path):
    with together(SimOllama(models=[]), SimOllama(models=[])) as (up, down):
        up.behavior.pull = PullBehavior(seconds=0.4)
        config = fleet_config(tmp_path, {"up": up, "down": down}, pulls={"max_parallel": 1})
        with running_proxy(config) as proxy, client(proxy) as http:
            down.stop()
            ops = {op["node"]: op for op in http.post("/admin/models/pull", json={"model": "qwen3:4b"}).json()["data"]}
            failed = wait_op(http, ops["down"]["id"], timeout=3)
            still = http.get(f"/admin/operations/{ops['up']['id']}").json()
            assert still["state"] == "running"  # the offline node's failure came first, and took no slot
            done = wait_op(http, ops["up"]["id"])
    assert failed["state"] == "failed"
    assert "not answering" in failed["error"] and "down" in failed["error"]
    assert failed["attempts"] == 0
    assert done["state"] == "succeeded"


def test_installed_models_succeed_at_once_unless_forced_and_can_be_deleted(tmp_path):
    models = [ModelSpec("llama3.1:8b"), ModelSpec("qwen3:4b")]
    with together(SimOllama(models=list(models)), SimOllama(models=list(models))) as (one, two):
        one.behavior.pull = PullBehavior(seconds=0.05)
        config = fleet_config(tmp_path, {"one": one, "two": two},
                              models=[{"name": "chat", "target": "llama3.1:8b", "backends": ["one"]}])  # fmt: skip
        with running_proxy(config) as proxy, client(proxy) as http:
            op = http.post("/admin/models/pull", json={"model": "llama3.1:8b", "nodes": ["one"]}).json()["data"][0]
            final = wait_op(http, op["id"])
            assert final["state"] == "succeeded" and final["status"] == "already installed"
            assert final["fraction"] == 1.0 and final["completed"] == one.find("llama3.1:8b").size
            assert one.pull_stats()["started"] == 0
            body = {"model": "llama3.1:8b", "nodes": ["one"], "force": True}
            forced = http.post("/admin/models/pull", json=body).json()["data"][0]
            assert wait_op(http, forced["id"])["state"] == "succeeded"
            assert one.pull_stats()["started"] == 1

            gone = http.request("DELETE", "/admin/models/qwen3:4b", json={"nodes": ["one", "two"]})
            assert gone.status_code == 200
            assert [(o["node"], o["state"], o["result"]) for o in gone.json()["data"]] == [
                ("one", "succeeded", {"removed": True}), ("two", "succeeded", {"removed": True})]  # fmt: skip
            assert one.find("qwen3:4b") is None and two.find("qwen3:4b") is None
            # The alias "chat" uses llama3.1:8b on "one": refused there unless forced, fine on "two".
            refused = http.request("DELETE", "/admin/models/llama3.1:8b", json={"nodes": ["one", "two"]})
            assert refused.status_code == 409 and "alias chat on one" in refused.json()["error"]["message"]
            assert http.request("DELETE", "/admin/models/llama3.1:8b", json={"nodes": ["two"]}).status_code == 200
            forced = http.request("DELETE", "/admin/models/llama3.1:8b", json={"nodes": "all", "force": True})
            assert [o["result"]["removed"] for o in forced.json()["data"]] == [True, False]
            listed = http.get("/admin/operations", params={"kind": "delete"}).json()["data"]
            assert len(listed) == 5 and all(o["kind"] == "delete" for o in listed)


def test_bad_requests(tmp_path):
    with SimOllama(models=[]) as node:
        config = fleet_config(tmp_path, {"gpu-1": node})
        config["backends"].append({"name": "vllm-1", "kind": "vllm", "url": "http://127.0.0.1:9"})
        with running_proxy(config) as proxy, client(proxy) as http:
            cases = [
                (http.post("/admin/models/pull", json={"nodes": "all"}), 400, "model"),
                (http.post("/admin/models/pull", json={"model": "x", "nodes": ["nope"]}), 404, "node"),
                (http.post("/admin/models/pull", json={"model": "x", "nodes": ["vllm-1"]}), 409, "nodes"),
                (http.post("/admin/models/pull", json={"model": "x", "nodes": 5}), 400, "nodes"),
                (http.post("/admin/models/pull", json={"model": "x", "nodes": "auto"}), 409, "nodes"),
                (http.post("/admin/models/pull", json={"model": "x", "force": "yes"}), 400, "force"),
                (
                    http.post("/admin/models/pull", content=b"{", headers={"content-type": "application/json"}),
                    400,
                    None,
                ),
                (http.get("/admin/operations", params={"state": "bogus"}), 400, "state"),
                (http.get("/admin/operations", params={"colour": "red"}), 400, "colour"),
                (http.get("/admin/operations/op_nope"), 404, "id"),
                (http.get("/admin/operations/op_nope/events"), 404, "id"),
                (http.post("/admin/operations/op_nope/retry"), 404, "id"),
                (http.request("DELETE", "/admin/models/x", json={}), 400, "nodes"),
            ]
            for response, status, param in cases:
                assert response.status_code == status, response.text
                error = response.json()["error"]
                assert error["message"] and error["type"] == "invalid_request_error"
                assert error["param"] == param, error


def test_operations_survive_a_restart_and_interrupted_ones_can_be_retried(tmp_path):
    with SimOllama(models=[]) as node:
        config = fleet_config(tmp_path, {"gpu-1": node})
        node.behavior.pull = PullBehavior(seconds=0.1)
        with running_proxy(config) as proxy, client(proxy) as http:
            done = http.post("/admin/models/pull", json={"model": "gemma3:1b"}).json()["data"][0]
            assert wait_op(http, done["id"])["state"] == "succeeded"
            node.behavior.pull = PullBehavior(seconds=20)
            slow = http.post("/admin/models/pull", json={"model": "qwen3:4b"}).json()["data"][0]
            assert wait_for(lambda: http.get(f"/admin/operations/{slow['id']}").json()["fraction"] > 0.01, 5)
        # The proxy stopped with the pull running. A proxy that crashed leaves its rows "running":
        # one is planted here, owned by a process that is gone.
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        with sqlite3.connect(tmp_path / "proxy.db") as db:
            db.execute(
                "INSERT INTO model_operations (id, kind, node, model, state, status, instance, host, pid, created_at) "
                "VALUES ('op_crashed', 'pull', 'gpu-1', 'phi3:mini', 'running', 'pulling', 'x', ?, ?, ?)",
                (os.uname().nodename, gone.pid, time.time()),
            )
        node.behavior.pull = PullBehavior(seconds=0.2)
        with running_proxy(config) as proxy, client(proxy) as http:
            ops = {o["id"]: o for o in http.get("/admin/operations").json()["data"]}
            assert ops[done["id"]]["state"] == "succeeded"
            assert ops[done["id"]]["completed"] == ops[done["id"]]["total"] > 0
            interrupted = ops[slow["id"]]
            assert interrupted["state"] == "interrupted"
            assert "retry" in interrupted["error"]
            assert 0 < interrupted["completed"] < interrupted["total"]  # its last progress was kept
            assert ops["op_crashed"]["state"] == "interrupted"
            assert (
                http.get("/admin/operations", params={"state": "interrupted"}).json()["data"][0]["state"]
                == "interrupted"
            )
            assert http.post(f"/admin/operations/{done['id']}/retry").status_code == 409
            retried = http.post(f"/admin/operations/{slow['id']}/retry")
            assert retried.status_code == 202
            final = wait_op(http, slow["id"])
            assert final["state"] == "succeeded"
            assert final["completed"] >= interrupted["completed"]
        history = (
            sqlite3.connect(tmp_path / "proxy.db")
            .execute(
                "SELECT endpoint, status, backend, requested_model FROM requests WHERE endpoint = 'admin:pull' "
                "ORDER BY started_at"
            )
            .fetchall()
        )
    assert ("admin:pull", "ok", "gpu-1", "gemma3:1b") in history
    assert ("admin:pull", "interrupted", "gpu-1", "qwen3:4b") in history
    assert ("admin:pull", "ok", "gpu-1", "qwen3:4b") in history


def test_sse_sends_a_heartbeat_frame_while_nothing_changes(tmp_path, monkeypatch):
    import proxy.admin.operations as admin_operations

    monkeypatch.setattr(admin_operations, "HEARTBEAT", 0.1)
    with SimOllama(models=[]) as node:
        # A silent stall: no lines for a while, as a hung server or a long verification would do.
        node.behavior.pull = PullBehavior(seconds=0.2, stall_at=0.5, stall_seconds=0.6, stall_silent=True)
        with running_proxy(fleet_config(tmp_path, {"gpu-1": node})) as proxy, client(proxy) as http:
            op = http.post("/admin/models/pull", json={"model": "qwen3:4b"}).json()["data"][0]
            with http.stream("GET", f"/admin/operations/{op['id']}/events") as response:
                next(response.iter_lines())  # a client that leaves early disturbs nothing
            frames = events(http, op["id"])
    stalled = [f for f in frames if 0.45 < f["fraction"] < 0.55]
    assert len(stalled) >= 3  # heartbeats with the same numbers during the silent stall
    assert frames[-1]["state"] == "succeeded"
