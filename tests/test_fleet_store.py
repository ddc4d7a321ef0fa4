"""The fleet store on SQLite, as several processes see it: two stores on one file stand for two workers.

Also ``distribution.schedule`` (the cron parser, its config checks, one run per firing in the
fleet) and drains that outlive a restart.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import datetime, timedelta

import httpx
import pytest

from proxy.config import ConfigError, parse_config
from proxy.cron import Cron, CronError
from proxy.operations.schedule import Scheduler
from proxy.sim import ModelSpec, SimOllama
from proxy.storage import Database
from proxy.store import ChangeFeed, SQLiteStore
from proxy.store.base import DRAIN, NODES
from proxy.store.health import HealthShare
from tests.support import running_proxy, wait_for


def two_workers(path):
    async def open_two():
        first, second = await Database.open(str(path)), await Database.open(str(path))
        return (first, SQLiteStore(first)), (second, SQLiteStore(second))

    return open_two()


# --- changes, leases, operations ----------------------------------------------------------------


def test_changes_reach_the_other_process_in_order(tmp_path):
    async def main():
        (db_a, a), (db_b, b) = await two_workers(tmp_path / "p.db")
        try:
            feed = ChangeFeed(b)
            await feed.begin()
            seen = []
            feed.on(NODES, lambda c: seen.append(("nodes", c.key, c.origin == a.instance)))
            feed.on(DRAIN, lambda c: seen.append(("drain", c.key, c.data["draining"])))
            assert await a.add_node("gpu-1", "ollama", "http://127.0.0.1:1", "{}")
            assert not await b.add_node("gpu-1", "ollama", "http://127.0.0.1:1", "{}")  # one name, one node
            await a.set_drain("gpu-1", True)
            await a.set_drain("gpu-1", False)
            await a.set_drain("gpu-1", True)
            assert await feed.poll() == 4
            assert seen == [("nodes", "gpu-1", True), ("drain", "gpu-1", True), ("drain", "gpu-1", False),
                            ("drain", "gpu-1", True)]  # fmt: skip
            assert await b.drained() == {"gpu-1"}
            assert await feed.poll() == 0  # each change once
            await a.remove_node("gpu-1")
            assert await b.drained() == set() and await b.node_rows() == []
        finally:
            await db_a.close()
            await db_b.close()

    asyncio.run(main())


def test_a_lease_has_one_holder_until_it_lapses(tmp_path):
    async def main():
        (db_a, a), (db_b, b) = await two_workers(tmp_path / "p.db")
        try:
            assert await a.acquire("pull-node:n1", until=time.time() + 5)
            assert not await b.acquire("pull-node:n1", until=time.time() + 5)
            assert await a.acquire("pull-node:n1", until=time.time() + 5)  # its holder may renew it
            await a.release("pull-node:n1")
            assert await b.acquire("pull-node:n1", until=time.time() - 1)  # taken, but lapsed at once
            assert await a.acquire("pull-node:n1", until=time.time() + 5)
        finally:
            await db_a.close()
            await db_b.close()

    asyncio.run(main())


def test_an_operation_whose_runner_stops_renewing_is_interrupted_once(tmp_path):
    from proxy.operations.model import Operation
    from proxy.operations.store import OperationStore, to_row

    async def main():
        (db_a, a), (db_b, b) = await two_workers(tmp_path / "p.db")
        try:
            runner, other = OperationStore(a), OperationStore(b)
            op = Operation("pull", "llama3.1:8b", "n1", state="running")
            await a.save_operations([to_row(op)], lease_until=time.time() - 1)  # its runner stopped renewing
            assert await other.expire() == [op.id]
            assert await runner.expire() == []  # never twice
            stored = await other.load_one(op.id)
            assert stored.state == "interrupted" and "retry" in stored.error
            # A retry is claimed by one process only.
            assert await other.claim(op.id) is True
            assert await runner.claim(op.id) is False
        finally:
            await db_a.close()
            await db_b.close()

    asyncio.run(main())


def test_a_cooldown_learned_in_one_process_applies_in_the_other(tmp_path):
    from proxy.config import HealthConfig
    from proxy.health import BackendHealth

    async def main():
        (db_a, a), (db_b, b) = await two_workers(tmp_path / "p.db")
        try:
            health_a = {"n1": BackendHealth("n1", 1.0, HealthConfig(cooldown=20, max_cooldown=40))}
            health_b = {"n1": BackendHealth("n1", 1.0, HealthConfig(cooldown=20, max_cooldown=40))}
            share_a, share_b = HealthShare(a, health_a), HealthShare(b, health_b)
            feed_b = ChangeFeed(b)
            await feed_b.begin()
            feed_b.on("health", share_b.apply)
            await share_a.publish()
            assert await feed_b.poll() == 0  # nothing failed yet
            health_a["n1"].failed("connection refused")
            await share_a.publish()
            await share_a.publish()  # the same streak is published once
            assert await feed_b.poll() == 1
            assert health_b["n1"].state == "offline" and health_b["n1"].last_error == "connection refused"
            assert 15 < health_b["n1"].cooldown_until - time.monotonic() <= 20
            await share_b.publish()  # applied, not learned: not sent back
            feed_a = ChangeFeed(a)
            await feed_a.begin()
            assert await feed_a.poll() == 0
        finally:
            await db_a.close()
            await db_b.close()

    asyncio.run(main())


# --- distribution.schedule ------------------------------------------------------------------------


def test_cron_fields():
    daily = Cron.parse("0 3 * * *")
    assert daily.matches(datetime(2026, 1, 5, 3, 0)) and not daily.matches(datetime(2026, 1, 5, 3, 1))
    steps = Cron.parse("*/15 1-2 * * 1-5")  # weekdays only
    assert steps.matches(datetime(2026, 1, 5, 1, 45))  # a Monday
    assert not steps.matches(datetime(2026, 1, 4, 1, 45))  # a Sunday
    either = Cron.parse("0 0 1 * 0")  # the 1st, or any Sunday (cron's rule for two day fields)
    assert either.matches(datetime(2026, 1, 4, 0, 0)) and either.matches(datetime(2026, 2, 1, 0, 0))
    assert not either.matches(datetime(2026, 1, 5, 0, 0))
    assert Cron.parse("0 0 * * 7").matches(datetime(2026, 1, 4, 0, 0))  # 7 is Sunday too
    for bad in ("0 3 * *", "61 * * * *", "a * * * *", "*/0 * * * *", "5-1 * * * *"):
        with pytest.raises(CronError):
            Cron.parse(bad)


def test_schedule_config_is_checked_with_its_key_path():
    with pytest.raises(ConfigError) as bad:
        parse_config({"distribution": {"schedule": "0 25 * * *"}}, env={})
    assert bad.value.problems[0].startswith("distribution.schedule: not a cron expression")
    with pytest.raises(ConfigError) as outside:
        parse_config({"pulls": {"window": "01:00-05:00"}, "distribution": {"schedule": "0 12 * * *"}}, env={})
    assert outside.value.problems == ["distribution.schedule: '0 12 * * *' never fires inside pulls.window "
                                      "(01:00-05:00); pick a time in the window"]  # fmt: skip
    ok = parse_config({"pulls": {"window": "22:00-06:00"}, "distribution": {"schedule": "30 2 * * *"}}, env={})
    assert ok.distribution.schedule == "30 2 * * *"


def test_a_firing_runs_in_one_process_of_the_fleet(tmp_path):
    async def main():
        (db_a, a), (db_b, b) = await two_workers(tmp_path / "p.db")
        try:
            now = [datetime(2026, 1, 5, 2, 58, 30)]
            runs = []

            def scheduler(store, name):
                async def run():
                    runs.append((name, now[0].strftime("%H:%M")))

                return Scheduler("0 3 * * *", store, run, clock=lambda: now[0])

            first, second = scheduler(a, "a"), scheduler(b, "b")
            for minutes in (0, 1, 2, 3):  # 02:58, 02:59, 03:00, 03:01; both processes look every time
                now[0] = datetime(2026, 1, 5, 2, 58, 30) + timedelta(minutes=minutes)
                await first.tick()
                await second.tick()
            assert len(runs) == 1 and runs[0][1] == "03:00"
            now[0] += timedelta(days=1)  # the next day's firing (caught up after a long stall), once again
            await second.tick()
            await first.tick()
            assert len(runs) == 2 and runs[1][0] == "b"
        finally:
            await db_a.close()
            await db_b.close()

    asyncio.run(main())


# --- drains outlive a restart ---------------------------------------------------------------------


def test_a_drain_is_still_there_after_a_restart(tmp_path):
    with SimOllama(models=[ModelSpec("llama3.1:8b")]) as node:
        config = {"storage": {"path": str(tmp_path / "p.db")}, "health": {"interval": 30},
                  "backends": [{"name": "n1", "kind": "ollama", "url": node.url}]}  # fmt: skip
        with running_proxy(dict(config)) as proxy:
            assert httpx.post(f"{proxy.url}/admin/nodes/n1/drain").json()["draining"] is True
        with running_proxy(dict(config)) as proxy:
            assert httpx.get(f"{proxy.url}/admin/nodes/n1").json()["draining"] is True
            assert httpx.post(f"{proxy.url}/admin/nodes/n1/resume").json()["draining"] is False
        with running_proxy(dict(config)) as proxy:
            assert httpx.get(f"{proxy.url}/admin/nodes/n1").json()["draining"] is False


# --- a process that starts later ------------------------------------------------------------------


def test_a_process_started_after_a_failure_has_the_node_in_cooldown_without_trying_it(tmp_path):
    """A worker restarted after a crash (or a replica added) learns the cooldowns still running.

    Without that it read only the changes made after it started, and paid a failed attempt of its
    own on each dead node: what made the multi-worker test fail on a loaded machine, where the
    worker restarted after a SIGKILL came up only after the other had published the cooldown.
    """
    good, dead = SimOllama(models=[ModelSpec("llama3.1:8b")]), SimOllama(models=[ModelSpec("llama3.1:8b")])
    with good, dead:
        config = {"storage": {"path": str(tmp_path / "p.db")},
                  "health": {"interval": 60, "cooldown": 30, "max_cooldown": 60}, "routing": {"retries": 2},
                  "backends": [{"name": "good", "kind": "ollama", "url": good.url},
                               {"name": "dead", "kind": "ollama", "url": dead.url, "weight": 1000}],
                  "models": [{"name": "pair", "target": "llama3.1:8b"}]}  # fmt: skip
        body = {"model": "pair", "messages": [{"role": "user", "content": "hi"}]}
        with running_proxy(dict(config)) as first:
            dead.stop()
            answer = httpx.post(f"{first.url}/v1/chat/completions", json=body, timeout=20)
            assert answer.headers["x-proxy-backend"] == "good" and answer.headers["x-proxy-attempts"] == "2"

            def published() -> bool:
                with sqlite3.connect(tmp_path / "p.db") as db:
                    return db.execute("SELECT COUNT(*) FROM fleet_changes WHERE topic = 'health'").fetchone()[0] > 0

            assert wait_for(published, 5)
            with running_proxy(dict(config)) as second:  # the other process keeps running meanwhile
                state = next(b for b in httpx.get(f"{second.url}/admin/status").json()["backends"]
                             if b["name"] == "dead")  # fmt: skip
                assert state["state"] == "offline" and state["cooldown_seconds"] > 20
                answers = [httpx.post(f"{second.url}/v1/chat/completions", json=body, timeout=20) for _ in range(6)]
                assert all(a.headers["x-proxy-attempts"] == "1" and a.headers["x-proxy-backend"] == "good"
                           for a in answers)  # fmt: skip


def test_progress_from_the_bus_and_the_store_never_goes_backwards():
    """Redis brings a runner's progress at once, the store's row a little later: the older one is ignored."""
    from proxy.config import PullConfig
    from proxy.operations.manager import OperationManager
    from proxy.operations.model import Operation
    from proxy.operations.store import to_row
    from proxy.store.base import PROGRESS, Change

    class Bus:
        def __init__(self) -> None:
            self.handlers = {}

        def on(self, topic, handler) -> None:
            self.handlers[topic] = handler

    async def main():
        bus = Bus()
        manager = OperationManager(PullConfig(), bus=bus)
        op = Operation("pull", "llama3.1:8b", "n1", state="running")
        manager.ops[op.id] = follower = Operation(**{**op.__dict__})
        queue = manager.subscribe(op.id)

        def event(**fields) -> Change:
            return Change(0, PROGRESS, op.id, to_row(Operation(**{**op.__dict__, **fields})), "other")

        bus.handlers[PROGRESS](event(fraction=0.5, completed=50, total=100))
        assert follower.fraction == 0.5 and queue.get_nowait()["fraction"] == 0.5
        manager._take(Operation(**{**op.__dict__, "fraction": 0.3, "completed": 30, "total": 100}))  # the store, late
        assert follower.fraction == 0.5 and queue.empty()
        bus.handlers[PROGRESS](event(state="succeeded", fraction=1.0, completed=100, total=100))
        assert follower.state == "succeeded" and queue.get_nowait()["state"] == "succeeded"
        manager._take(Operation(**{**op.__dict__, "state": "queued"}))  # a retry after the end: news again
        assert follower.state == "queued"

    asyncio.run(main())
