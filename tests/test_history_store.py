"""proxy/history.py: write-behind batching, shutdown flush, interrupted rows, queries and retention."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from proxy.config import HistoryConfig
from proxy.history import History, RequestRecord, iso, key_id, parse_time
from proxy.storage import Database

DAY = 86400.0


def run(coro):
    return asyncio.run(coro)


async def opened(path: str = ":memory:", config: HistoryConfig | None = None, **kw) -> tuple[Database, History]:
    db = await Database.open(path)
    history = History(db, config or HistoryConfig(), **kw)
    await history.start()
    return db, history


def record(endpoint: str = "/v1/chat/completions", **fields) -> RequestRecord:
    return RequestRecord(endpoint, **fields)


def test_begin_and_finish_before_the_writer_runs_are_one_insert():
    async def main():
        db, history = await opened(linger=0.2)
        r = record(requested_model="chat", resolved_model="llama3.1:8b", backend="ollama-1", stream=True)
        history.begin(r)
        r.attempts, r.prompt_tokens, r.completion_tokens, r.ttft_seconds, r.http_status = 2, 10, 5, 0.25, 200
        history.finish(r)
        await history.flush()
        assert history.stats.written == 1 and history.stats.batches == 1
        row = await history.get(r.id)
        assert row["status"] == "ok" and row["http_status"] == 200 and row["attempts"] == 2
        assert row["stream"] is True and row["cache_hit"] is False
        assert row["prompt_tokens"] == 10 and row["completion_tokens"] == 5 and row["ttft_seconds"] == 0.25
        assert row["duration_seconds"] >= 0 and row["finished_at"] >= row["started_at"]
        await history.close()
        await db.close()

    run(main())


def test_in_progress_rows_serialise_with_null_end():
    async def main():
        db, history = await opened()
        r = record(requested_model="chat")
        history.begin(r)
        r.finished_at = time.time()  # set on the record, but the row is still in progress
        rows = (await history.list())["data"]
        assert [x["id"] for x in rows] == [r.id]
        assert rows[0]["status"] == "in_progress"
        assert rows[0]["finished_at"] is None and rows[0]["duration_seconds"] is None
        assert rows[0]["started_at"].endswith("Z")
        history.finish(r)
        row = await history.get(r.id)
        assert row["status"] == "ok" and row["finished_at"] is not None and row["duration_seconds"] is not None
        await history.close()
        await db.close()

    run(main())


def test_finish_derives_status_and_error():
    async def main():
        db, history = await opened()
        failed = record(http_status=502, error="backend error")
        cancelled = record(status="cancelled", http_status=499)
        ok = record(http_status=200)
        for r in (failed, cancelled, ok):
            history.begin(r)
            history.finish(r)
        assert [(await history.get(r.id))["status"] for r in (failed, cancelled, ok)] == ["error", "cancelled", "ok"]
        assert (await history.get(failed.id))["error"] == "backend error"
        await history.close()
        await db.close()

    run(main())


def test_close_flushes_every_row(tmp_path):
    path = str(tmp_path / "h.db")

    async def main():
        db, history = await opened(path)
        records = [record(requested_model=f"m{i % 3}") for i in range(2000)]
        for i, r in enumerate(records):
            history.begin(r)
            if i % 250 == 0:
                await asyncio.sleep(0)  # let the writer take a batch mid-way
        for i, r in enumerate(records):
            r.http_status = 200
            history.finish(r)
            if i % 333 == 0:
                await asyncio.sleep(0)
        await history.close()
        await db.close()
        return history

    history = run(main())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall() == [("ok", 2000)]
    assert history.stats.dropped == history.stats.deferred == 0


def test_close_marks_own_unfinished_rows_interrupted_and_late_calls_are_ignored():
    async def main():
        db, history = await opened()
        r = record()
        history.begin(r)
        await history.close()
        history.finish(r)  # after close: counted, not written
        assert history.stats.late == 1
        row = await db.fetchone("SELECT status, error FROM requests WHERE id = ?", (r.id,))
        assert row[0] == "interrupted" and "stopped" in row[1]
        assert await db.fetchall("SELECT id FROM instances") == []
        await db.close()

    run(main())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rows_of_dead_instances_become_interrupted_and_a_live_sibling_is_left_alone(tmp_path):
    path = str(tmp_path / "h.db")

    async def main():
        db, sibling = await opened(path)  # a live worker with a request in flight
        in_flight = record()
        sibling.begin(in_flight)
        await sibling.flush()

        now = time.time()
        host = socket.gethostname()
        fakes = {
            "stale": ("elsewhere", 1, now - 3600),  # another host, heartbeat an hour old
            "gone": (host, _dead_pid(), now),  # this host, fresh heartbeat, but the pid has exited
            "busy": ("elsewhere", 1, now - 5),  # another host, beating: alive
        }
        for iid, (h, pid, beat) in fakes.items():
            await db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?)", (iid, h, pid, beat, beat))
            await db.execute(
                "INSERT INTO requests (id, instance_id, endpoint, started_at, status) VALUES (?, ?, 'x', ?, 'in_progress')",
                (f"req-{iid}", iid, now - 10),
            )
        await db.execute(
            "INSERT INTO requests (id, instance_id, endpoint, started_at, status) VALUES ('req-orphan', 'nobody', 'x', ?, 'in_progress')",
            (now - 10,),
        )

        db2, starting = await opened(path)  # a worker (re)starting runs the sweep
        statuses = dict(await db2.fetchall("SELECT id, status FROM requests"))
        assert statuses == {
            in_flight.id: "in_progress",
            "req-stale": "interrupted",
            "req-gone": "interrupted",
            "req-busy": "in_progress",
            "req-orphan": "interrupted",
        }
        assert starting.stats.interrupted == 3
        remaining = {r[0] for r in await db2.fetchall("SELECT id FROM instances")}
        assert remaining == {sibling.instance_id, starting.instance_id, "busy"}
        row = await starting.get("req-stale")
        assert row["finished_at"] is None and row["duration_seconds"] is None

        in_flight.http_status = 200
        sibling.finish(in_flight)  # the sibling finishes its request normally
        assert (await starting.get(in_flight.id))["status"] == "in_progress"  # not flushed by the sibling yet
        await sibling.flush()
        assert (await starting.get(in_flight.id))["status"] == "ok"
        for h, d in ((sibling, db), (starting, db2)):
            await h.close()
            await d.close()

    run(main())


def test_heartbeat_keeps_an_instance_alive_and_reregisters_it():
    async def main():
        db, history = await opened(heartbeat_interval=0.02, stale_after=0.5)
        await db.execute("DELETE FROM instances")  # as if another worker took us for dead
        beat = None
        for _ in range(250):  # the next heartbeat (every 20 ms) registers it again
            await asyncio.sleep(0.02)
            beat = await db.fetchone("SELECT heartbeat_at FROM instances WHERE id = ?", (history.instance_id,))
            if beat is not None:
                break
        assert beat is not None and beat[0] > time.time() - 5
        await history.close()
        await db.close()

    run(main())


def test_filters_limit_and_pagination():
    async def main():
        db, history = await opened()
        base = 1_700_000_000.0
        made = []
        for i in range(30):
            r = record(
                endpoint="/v1/embeddings" if i % 5 == 0 else "/v1/chat/completions",
                started_at=base + i,
                requested_model="chat" if i % 2 else "auto",
                resolved_model="llama3.1:8b" if i % 2 else "qwen3:4b",
                backend="ollama-1" if i % 3 else "vllm-1",
                http_status=500 if i % 7 == 0 else 200,
            )
            history.begin(r)
            history.finish(r)
            made.append(r)

        everything = await history.list(limit=1000)
        assert [x["id"] for x in everything["data"]] == [r.id for r in reversed(made)]
        assert everything["next"] is None

        async def ids(**filters) -> list[str]:
            return [x["id"] for x in (await history.list(limit=1000, **filters))["data"]]

        def expect(pred) -> list[str]:
            return [r.id for r in reversed(made) if pred(r)]

        assert await ids(model="chat") == expect(lambda r: r.requested_model == "chat")
        assert await ids(model="qwen3:4b") == expect(lambda r: r.resolved_model == "qwen3:4b")  # resolved name too
        assert await ids(backend="vllm-1") == expect(lambda r: r.backend == "vllm-1")
        assert await ids(status="error") == expect(lambda r: r.http_status == 500)
        assert await ids(endpoint="/v1/embeddings") == expect(lambda r: r.endpoint == "/v1/embeddings")
        assert await ids(since=base + 10, until=iso(base + 20)) == expect(
            lambda r: base + 10 <= r.started_at < base + 20
        )
        assert await ids(model="chat", backend="ollama-1", status="ok") == expect(
            lambda r: r.requested_model == "chat" and r.backend == "ollama-1" and r.http_status == 200
        )

        pages, cursor = [], None
        while True:
            page = await history.list(limit=7, cursor=cursor)
            assert len(page["data"]) <= 7
            pages.append([x["id"] for x in page["data"]])
            cursor = page["next"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
        assert sum(pages, []) == [r.id for r in reversed(made)]
        assert [x["id"] for x in (await history.list(limit=5, offset=5))["data"]] == [r.id for r in reversed(made)][
            5:10
        ]

        with pytest.raises(ValueError):
            await history.list(status="weird")
        with pytest.raises(ValueError):
            await history.list(cursor="not-a-cursor")
        with pytest.raises(ValueError):
            await history.list(since="yesterday")
        await history.close()
        await db.close()

    run(main())


def test_rows_with_the_same_start_time_paginate_without_loss():
    async def main():
        db, history = await opened()
        for _ in range(10):
            r = record(started_at=1_700_000_000.0)
            history.begin(r)
            history.finish(r)
        seen, cursor = [], None
        while True:
            page = await history.list(limit=3, cursor=cursor)
            seen += [x["id"] for x in page["data"]]
            if not (cursor := page["next"]):
                break
        assert len(seen) == len(set(seen)) == 10
        await history.close()
        await db.close()

    run(main())


def test_retention_purges_old_rows_at_start_and_on_demand():
    now = [1_700_000_000.0]

    async def main():
        db = await Database.open(":memory:")
        config = HistoryConfig(retention_days=7)
        first = History(db, config, clock=lambda: now[0])
        await first.start()
        for age_days in (10, 8, 6, 1):
            r = record(started_at=now[0] - age_days * DAY)
            first.begin(r)
            first.finish(r)
        await first.close()
        second = History(db, config, clock=lambda: now[0])
        await second.start()  # purges at start
        assert second.stats.purged == 2
        assert (await db.fetchone("SELECT COUNT(*) FROM requests"))[0] == 2
        now[0] += 2 * DAY
        assert await second.purge_expired() == 1
        await second.close()
        await db.close()

    run(main())


def test_bodies_only_when_captured_and_capped():
    async def main():
        db = await Database.open(":memory:")
        off = History(db, HistoryConfig())
        on = History(db, HistoryConfig(capture_bodies=True, max_body_bytes=10))
        await off.start()
        await on.start()
        rows = []
        for history in (off, on):
            r = record(request_body=b'{"messages": "a long request body"}', response_body="short")
            history.begin(r)
            history.finish(r)
            rows.append(await history.get(r.id))
        assert rows[0]["request_body"] is None and rows[0]["response_body"] is None
        assert rows[1]["request_body"] == '{"messages' and rows[1]["response_body"] == "short"
        assert "request_body" not in (await on.list())["data"][0]
        await off.close()
        await on.close()
        await db.close()

    run(main())


def test_a_full_buffer_never_blocks_and_counts_what_it_lost():
    async def main():
        db = await Database.open(":memory:")
        history = History(db, HistoryConfig(), max_pending=10)  # not started: nothing drains the buffer
        queued = [record() for _ in range(10)]
        extra = [record() for _ in range(5)]
        for r in queued + extra:
            history.begin(r)
        assert history.stats.deferred == 5
        for r in queued + extra:
            history.finish(r)  # the queued ones merge in place; the others find no room
        assert history.stats.dropped == 5
        await history.flush()
        assert (await db.fetchone("SELECT COUNT(*) FROM requests WHERE status = 'ok'"))[0] == 10
        late = record()
        history.finish(late)  # room again: a deferred begin shows up when the request finishes
        await history.flush()
        assert (await history.get(late.id))["status"] == "ok"
        await db.close()

    run(main())


def test_a_failed_write_is_retried():
    async def main():
        db, history = await opened()
        real = db.executemany
        calls = []

        async def flaky(sql, rows):
            calls.append(sql)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database is locked")
            return await real(sql, rows)

        db.executemany = flaky
        r = record(http_status=200)
        history.begin(r)
        history.finish(r)
        for _ in range(100):
            await asyncio.sleep(0.02)
            row = await db.fetchone("SELECT status FROM requests WHERE id = ?", (r.id,))
            if row:
                break
        assert row == ("ok",) and len(calls) == 2
        await history.close()
        await db.close()

    run(main())


def test_disabled_history_records_nothing():
    async def main():
        db, history = await opened(config=HistoryConfig(enabled=False))
        r = record()
        history.begin(r)
        history.finish(r)
        await history.close()
        assert (await db.fetchone("SELECT COUNT(*) FROM requests"))[0] == 0
        await db.close()

    run(main())


def test_key_id_is_short_stable_and_never_the_key():
    key = "sk-proxy-0123456789abcdef"
    assert key_id(key) == key_id(key) == History.key_id(key)
    assert len(key_id(key)) == 12 and key not in key_id(key) and key[:8] not in key_id(key)
    assert key_id(key) != key_id(key + "x")
    assert key_id(None) is None and key_id("") is None


def test_request_ids_are_short_url_safe_and_distinct():
    ids = {record().id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 16 and i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_time_parsing():
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000.0  # naive means UTC
    assert parse_time("1700000000") == parse_time(1_700_000_000) == 1_700_000_000.0
    assert iso(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    with pytest.raises(ValueError):
        parse_time("last tuesday")


def test_pid_check_sees_this_process_alive():
    from proxy.storage.background import pid_alive as _pid_alive

    assert _pid_alive(os.getpid())
    assert not _pid_alive(_dead_pid())


def test_a_query_waits_for_a_batch_being_written():
    """The writer has taken a batch out of the buffer but not committed it: a query in that moment
    must still see those rows (this worker's own requests are visible at once)."""

    async def main():
        db, history = await opened(linger=0)
        inside, release = asyncio.Event(), asyncio.Event()
        real = db.executemany

        async def held(sql, rows):
            inside.set()
            await release.wait()
            return await real(sql, rows)

        db.executemany = held
        r = record(http_status=200)
        history.begin(r)
        history.finish(r)
        await inside.wait()  # the batch is out of the buffer, its transaction open
        reader = asyncio.create_task(history.get(r.id))
        # A reader that does not wait for the batch answers at once (with nothing); give it the chance.
        await asyncio.wait({reader}, timeout=0.5)
        release.set()
        got = await reader
        db.executemany = real
        await history.close()
        await db.close()
        return got

    got = run(main())
    assert got is not None and got["status"] == "ok"
