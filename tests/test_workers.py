"""``llm-proxy serve --workers 2`` behaves as one proxy (issue 11, step 1).

One real two-worker server over simulated Ollama nodes, for the whole module.
Every check reads through fresh connections (``Connection: close``), so the
kernel spreads the reads over both workers; ``test_both_workers_answer`` shows
that it does. Each point is checked with counts: N of N reads agree.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import httpx
import pytest
import yaml

from proxy.sim import ModelSpec, SimOllama
from proxy.sim.behavior import PullBehavior
from tests.support import wait_for
from tests.test_cli import ROOT, free_port, wait_until_up

N = 24
MSG = [{"role": "user", "content": "hi"}]
ACTIVE = ("queued", "running")


@pytest.fixture(scope="module")
def sims():
    # pair:1b is asked for by the last test only: no node has it loaded before, so the router's
    # preference for a node where the model is loaded cannot steer "pair" away from flaky.
    n1 = SimOllama(models=[ModelSpec("llama3.1:8b"), ModelSpec("qwen3:4b"), ModelSpec("pair:1b")])
    n2 = SimOllama(models=[])
    spare = SimOllama(models=[ModelSpec("phi3:mini")])
    flaky = SimOllama(models=[ModelSpec("pair:1b")])
    for sim in (n1, n2, spare, flaky):
        sim.start()
    yield {"n1": n1, "n2": n2, "spare": spare, "flaky": flaky}
    for sim in (n1, n2, spare, flaky):
        sim.stop()


@pytest.fixture(scope="module")
def fleet(sims, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp / "proxy.db")},
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        # Long intervals: what one worker learns must reach the other through the store, not its own probes.
        "health": {"interval": 60, "cooldown": 30, "max_cooldown": 60},
        "routing": {"retries": 2},
        "pulls": {"backoff": 0.02, "max_parallel": 1},
        "distribution": {"manifest_path": str(tmp / "manifest.json")},
        "backends": [
            {"name": "n1", "kind": "ollama", "url": sims["n1"].url},
            {"name": "n2", "kind": "ollama", "url": sims["n2"].url},
            {"name": "flaky", "kind": "ollama", "url": sims["flaky"].url, "weight": 1000000},
        ],
        "models": [
            {"name": "chat", "target": "llama3.1:8b", "backends": ["n1"]},
            {"name": "pair", "target": "pair:1b", "backends": ["n1", "flaky"]},
        ],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    # The workers' log goes to a file beside the database (a pipe nobody reads would block them once full).
    log = open(tmp / "stderr.log", "w")  # noqa: SIM115 - closed after the server, in the finally below
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, timeout=40)
        yield {"url": url, "db": tmp / "proxy.db", "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def fresh(fleet, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on its own connection, so either worker may take it."""
    with httpx.Client(base_url=fleet["url"], timeout=20, headers={"Connection": "close"}) as http:
        return http.request(method, path, **kwargs)


def reads(fleet, path: str, n: int = N) -> list[httpx.Response]:
    return [fresh(fleet, "GET", path) for _ in range(n)]


def chat(fleet, model: str) -> httpx.Response:
    return fresh(fleet, "POST", "/v1/chat/completions", json={"model": model, "messages": MSG})


def node_names(response: httpx.Response) -> set[str]:
    return {n["name"] for n in response.json()["data"]}


def wait_op(fleet, op_id: str, timeout: float = 20.0) -> dict:
    seen: dict = {}

    def done() -> bool:
        seen.update(fresh(fleet, "GET", f"/admin/operations/{op_id}").json())
        return seen.get("state") not in ACTIVE

    assert wait_for(done, timeout), seen
    return seen


def runner_pid(fleet, op_id: str) -> int:
    with sqlite3.connect(fleet["db"]) as db:
        return db.execute("SELECT pid FROM model_operations WHERE id = ?", (op_id,)).fetchone()[0]


def test_both_workers_answer(fleet):
    pids = {fresh(fleet, "GET", "/admin/status").json()["process"]["pid"] for _ in range(N)}
    assert len(pids) == 2  # fresh connections reach both workers, so the counts below mean something


def test_a_registered_node_is_in_every_worker_and_routed_by_all(fleet, sims):
    created = fresh(fleet, "POST", "/admin/nodes", json={"name": "gpu-9", "kind": "ollama", "url": sims["spare"].url})
    assert created.status_code == 201, created.text
    answers = reads(fleet, "/admin/nodes")
    assert sum("gpu-9" in node_names(r) for r in answers) == N  # at once: an admin read catches up first
    # Routing: the other worker adds the node within about a second.
    assert wait_for(lambda: all(chat(fleet, "phi3:mini").status_code == 200 for _ in range(4)), 5)
    routed = [chat(fleet, "phi3:mini") for _ in range(N)]
    assert sum(r.status_code == 200 and r.headers["x-proxy-backend"] == "gpu-9" for r in routed) == N


def test_a_drain_applies_in_every_worker_and_is_stored(fleet):
    assert fresh(fleet, "POST", "/admin/nodes/gpu-9/drain").status_code == 200
    answers = reads(fleet, "/admin/nodes/gpu-9")
    assert sum(r.json()["draining"] is True for r in answers) == N
    with sqlite3.connect(fleet["db"]) as db:
        assert db.execute("SELECT name FROM node_drains").fetchall() == [("gpu-9",)]
    # A drained node takes nothing new in any worker: its only model is served by nobody now.
    assert wait_for(lambda: all(chat(fleet, "phi3:mini").status_code != 200 for _ in range(4)), 5)
    assert sum(chat(fleet, "phi3:mini").status_code != 200 for _ in range(N)) == N
    assert fresh(fleet, "POST", "/admin/nodes/gpu-9/resume").status_code == 200
    assert sum(r.json()["draining"] is False for r in reads(fleet, "/admin/nodes/gpu-9")) == N
    assert wait_for(lambda: all(chat(fleet, "phi3:mini").status_code == 200 for _ in range(4)), 5)


def test_a_removal_applies_in_every_worker(fleet):
    removed = fresh(fleet, "DELETE", "/admin/nodes/gpu-9")
    assert removed.status_code == 200, removed.text
    assert sum("gpu-9" not in node_names(r) for r in reads(fleet, "/admin/nodes")) == N
    assert wait_for(lambda: all(chat(fleet, "phi3:mini").status_code == 404 for _ in range(4)), 5)
    assert sum(chat(fleet, "phi3:mini").status_code == 404 for _ in range(N)) == N


def test_an_activation_applies_in_every_worker(fleet):
    answer = fresh(fleet, "POST", "/admin/models/activate", json={"alias": "chat", "model": "qwen3:4b"})
    assert answer.status_code == 202, answer.text
    assert wait_op(fleet, answer.json()["id"])["state"] == "succeeded"
    # Ten in a row, so both workers (each reached by about half of the fresh connections) have applied it.
    assert wait_for(lambda: all(chat(fleet, "chat").headers.get("x-proxy-model") == "qwen3:4b" for _ in range(10)), 15)
    assert sum(chat(fleet, "chat").headers.get("x-proxy-model") == "qwen3:4b" for _ in range(N)) == N


def test_an_operation_is_read_followed_cancelled_and_retried_from_any_worker(fleet, sims):
    node = sims["n2"]
    node.behavior.pull = PullBehavior(seconds=4)
    answer = fresh(fleet, "POST", "/admin/models/pull", json={"model": "gemma3:1b", "nodes": ["n2"]})
    assert answer.status_code == 202, answer.text
    op_id = answer.json()["data"][0]["id"]

    # Followed over SSE from fresh connections (both workers): every stream sees progress and the end.
    # Opened first, so the counted reads below cannot outlast the pull on a loaded machine.
    streams: list[list[dict]] = [[] for _ in range(4)]

    def follow(frames: list[dict]) -> None:
        with httpx.Client(base_url=fleet["url"], timeout=30, headers={"Connection": "close"}) as http:
            with http.stream("GET", f"/admin/operations/{op_id}/events") as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        frames.append(json.loads(line[6:]))

    threads = [threading.Thread(target=follow, args=(frames,)) for frames in streams]
    for thread in threads:
        thread.start()
    found = reads(fleet, f"/admin/operations/{op_id}")
    assert sum(r.status_code == 200 and r.json()["id"] == op_id for r in found) == N
    listed = reads(fleet, "/admin/operations?kind=pull&limit=5")
    assert sum(op_id in {o["id"] for o in r.json()["data"]} for r in listed) == N
    for thread in threads:
        thread.join(30)
    for frames in streams:
        assert frames[-1]["state"] == "succeeded"
        fractions = [f["fraction"] for f in frames]
        assert fractions == sorted(fractions) and len(set(fractions)) >= 2  # progress, never backwards
    assert node.pull_stats()["started"] == 1  # one runner

    # Cancelled from whichever worker takes the request, several times: both workers get to do it.
    node.behavior.pull = PullBehavior(seconds=30)
    cancelled = []
    for model in ("m1:1b", "m2:1b", "m3:1b", "m4:1b"):
        op = fresh(fleet, "POST", "/admin/models/pull", json={"model": model, "nodes": ["n2"]}).json()["data"][0]
        assert wait_for(
            lambda op=op: fresh(fleet, "GET", f"/admin/operations/{op['id']}").json()["state"] == "running", 5
        )
        stopped = fresh(fleet, "DELETE", f"/admin/operations/{op['id']}")
        assert stopped.status_code == 200, stopped.text
        cancelled.append(op["id"])
    for op_id in cancelled:
        assert wait_op(fleet, op_id)["state"] == "cancelled"
    assert wait_for(lambda: node.pull_stats()["active"] == 0, 5)

    # Retried from any worker: it runs once more, to the end.
    node.behavior.pull = PullBehavior(seconds=0.3)
    retried = fresh(fleet, "POST", f"/admin/operations/{cancelled[0]}/retry")
    assert retried.status_code == 202, retried.text
    assert wait_op(fleet, cancelled[0])["state"] == "succeeded"
    again = fresh(fleet, "POST", f"/admin/operations/{cancelled[0]}/retry")
    assert again.status_code == 409  # succeeded: nothing to retry


def test_pull_limits_hold_across_workers(fleet, sims):
    """pulls.max_parallel is 1: never two pulls at once in the fleet, though both workers submit."""
    nodes = [sims["n1"], sims["n2"]]
    for sim in nodes:
        sim.behavior.pull = PullBehavior(seconds=0.6)
        sim._reset_pull_stats()
    busiest = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            busiest.append(sum(s.pull_stats()["active"] for s in nodes))
            stop.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    ops, pids = [], set()
    try:
        for i in range(12):
            if len(pids) == 2 and len(ops) >= 4:
                break
            answer = fresh(fleet, "POST", "/admin/models/pull", json={"model": f"lim{i}:1b", "nodes": ["n1", "n2"]})
            assert answer.status_code == 202, answer.text
            for op in answer.json()["data"]:
                ops.append(op["id"])
                pids.add(runner_pid(fleet, op["id"]))
        assert len(pids) == 2  # submitted (and run) by both workers
        for op_id in ops:
            assert wait_op(fleet, op_id, timeout=60)["state"] == "succeeded"
    finally:
        stop.set()
        sampler.join()
    assert max(busiest) == 1
    assert all(s.pull_stats()["max_active"] == 1 for s in nodes)


def test_a_killed_workers_operation_becomes_interrupted_and_can_be_retried(fleet, sims):
    node = sims["n2"]
    node.behavior.pull = PullBehavior(seconds=60)
    started = node.pull_stats()["started"]
    op = fresh(fleet, "POST", "/admin/models/pull", json={"model": "big:70b", "nodes": ["n2"]}).json()["data"][0]
    assert wait_for(lambda: node.pull_stats()["active"] == 1, 5)
    os.kill(runner_pid(fleet, op["id"]), signal.SIGKILL)
    ended = wait_op(fleet, op["id"], timeout=30)
    # Marked interrupted by the surviving worker once the lease lapsed; nobody took it over on its own.
    assert ended["state"] == "interrupted" and "retry" in ended["error"]
    assert node.pull_stats()["started"] == started + 1
    node.behavior.pull = PullBehavior(seconds=1)
    # Retried from both workers at once: the lease (a claim on the row) lets one of them run it.
    answers: list[int] = []
    barrier = threading.Barrier(4)

    def retry() -> None:
        barrier.wait()
        answers.append(fresh(fleet, "POST", f"/admin/operations/{op['id']}/retry").status_code)

    retries = [threading.Thread(target=retry) for _ in range(4)]
    for thread in retries:
        thread.start()
    for thread in retries:
        thread.join(30)
    assert sorted(answers) == [202, 409, 409, 409], answers
    assert wait_op(fleet, op["id"])["state"] == "succeeded"
    assert node.pull_stats()["started"] == started + 2  # one runner for the retry


def test_a_dead_node_costs_one_failed_attempt_in_the_whole_fleet(fleet, sims):
    # Both workers up: the one killed by the test before is restarted by uvicorn, which takes a while
    # on a loaded machine; it must learn the cooldown even if it comes up after it was published.
    assert wait_for(lambda: len({fresh(fleet, "GET", "/admin/status").json()["process"]["pid"]
                                 for _ in range(10)}) == 2, 40)  # fmt: skip
    sims["flaky"].stop()  # "pair" prefers flaky (weight 10^6 to n1's 1); it is gone now
    first = chat(fleet, "pair")
    assert first.status_code == 200 and first.headers["x-proxy-backend"] == "n1"
    assert first.headers["x-proxy-attempts"] == "2"  # flaky was tried first and failed: the cooldown starts

    def offline_everywhere() -> bool:
        states = [next(b for b in fresh(fleet, "GET", "/admin/status").json()["backends"] if b["name"] == "flaky")
                  for _ in range(10)]  # fmt: skip
        return all(s["state"] == "offline" and s["cooldown_seconds"] > 0 for s in states)

    # The other worker never tried flaky, yet shows it in cooldown: it learned it from the store.
    assert wait_for(offline_everywhere, 15)  # about a second when the machine is idle
    answers = [chat(fleet, "pair") for _ in range(N)]
    assert sum(r.status_code == 200 and r.headers["x-proxy-backend"] == "n1" for r in answers) == N

    def attempts() -> list[int]:
        with sqlite3.connect(fleet["db"]) as db:
            return [a for (a,) in db.execute("SELECT attempts FROM requests WHERE requested_model = 'pair'")]

    assert wait_for(lambda: len(attempts()) == N + 1, 5)
    assert sum(a - 1 for a in attempts()) == 1  # one failed attempt on the dead node, in all
