"""proxy/storage: opening, pragmas, migrations (idempotent, concurrent, upgrades) and transactions."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.storage import MIGRATIONS, Database
from proxy.storage.migrations import check, split_statements

ROOT = Path(__file__).resolve().parent.parent

# A small schema of our own: migration 2 records that it ran, so running twice would show.
V1 = "CREATE TABLE runs (version INTEGER NOT NULL); INSERT INTO runs VALUES (1);"
V2 = """
CREATE TABLE nodes (name TEXT PRIMARY KEY, note TEXT DEFAULT 'a;b');  -- a ';' in a string and here
INSERT INTO runs VALUES (2);
"""
V3 = "ALTER TABLE nodes ADD COLUMN weight REAL NOT NULL DEFAULT 1.0; INSERT INTO runs VALUES (3);"


def tables(path: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_open_memory_applies_every_migration():
    async def main():
        db = await Database.open(":memory:")
        try:
            assert db.schema_version == MIGRATIONS[-1][0]
            assert (await db.fetchone("PRAGMA user_version"))[0] == MIGRATIONS[-1][0]
            names = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert {"requests", "instances", "response_cache", "embedding_cache", "cache_generation"} <= names
        finally:
            await db.close()

    asyncio.run(main())


def test_open_file_creates_directory_and_sets_pragmas(tmp_path):
    path = tmp_path / "deep" / "er" / "proxy.db"

    async def main():
        db = await Database.open(str(path), busy_timeout=3)
        try:
            assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
            assert (await db.fetchone("PRAGMA synchronous"))[0] == 1  # NORMAL
            assert (await db.fetchone("PRAGMA busy_timeout"))[0] == 3000
        finally:
            await db.close()

    asyncio.run(main())
    assert path.exists()


def test_reopening_is_idempotent(tmp_path):
    path = str(tmp_path / "p.db")

    async def main():
        for _ in range(3):
            db = await Database.open(path)
            await db.close()
        db = await Database.open(path)
        try:
            assert (await db.fetchone("SELECT COUNT(*) FROM cache_generation"))[0] == 1  # inserted once
        finally:
            await db.close()

    asyncio.run(main())


def test_concurrent_open_in_tasks_migrates_once(tmp_path):
    path = str(tmp_path / "p.db")
    migrations = [(1, V1), (2, V2), (3, V3)]

    async def main():
        dbs = await asyncio.gather(*(Database.open(path, migrations=migrations) for _ in range(4)))
        try:
            assert {db.schema_version for db in dbs} == {3}
            assert await dbs[0].fetchall("SELECT version FROM runs ORDER BY version") == [(1,), (2,), (3,)]
        finally:
            for db in dbs:
                await db.close()

    asyncio.run(main())


_OPENER = """
import asyncio, json, sys, time
from proxy.storage import Database
path, start, migrations = sys.argv[1], float(sys.argv[2]), [tuple(m) for m in json.loads(sys.argv[3])]
while time.time() < start:
    time.sleep(0.001)
async def main():
    db = await Database.open(path, migrations=migrations)
    print(db.schema_version)
    await db.close()
asyncio.run(main())
"""


def test_concurrent_open_across_processes_migrates_once(tmp_path):
    path = str(tmp_path / "p.db")
    migrations = [(1, V1), (2, V2), (3, V3)]
    start = time.time() + 0.6  # every process reaches Database.open at about the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, path, str(start), json.dumps(migrations)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]

    async def main():
        await asyncio.sleep(max(0.0, start - time.time()))
        db = await Database.open(path, migrations=migrations)
        await db.close()
        return db.schema_version

    versions = [asyncio.run(main())]
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        versions.append(int(out))
    assert versions == [3, 3, 3, 3]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM runs ORDER BY version").fetchall() == [(1,), (2,), (3,)]


def test_old_database_is_upgraded_and_keeps_its_rows(tmp_path):
    path = str(tmp_path / "p.db")

    async def main():
        old = await Database.open(path, migrations=[(1, V1), (2, V2)])
        await old.execute("INSERT INTO nodes (name) VALUES ('gpu-1')")
        await old.close()
        new = await Database.open(path, migrations=[(1, V1), (2, V2), (3, V3)])
        try:
            assert new.schema_version == 3
            assert await new.fetchall("SELECT name, note, weight FROM nodes") == [("gpu-1", "a;b", 1.0)]
            assert await new.fetchall("SELECT version FROM runs ORDER BY version") == [(1,), (2,), (3,)]
        finally:
            await new.close()

    asyncio.run(main())


def test_real_schema_upgrades_from_an_earlier_release(tmp_path):
    # A file from a release that only knew migration 1, opened by this release (plus a future migration).
    path = str(tmp_path / "p.db")
    future = (len(MIGRATIONS) + 1, "CREATE TABLE operations (id TEXT PRIMARY KEY);")

    async def main():
        db = await Database.open(path, migrations=MIGRATIONS[:1])
        await db.execute("INSERT INTO instances VALUES ('i', 'h', 1, 0, 0)")
        await db.close()
        db = await Database.open(path, migrations=(*MIGRATIONS, future))
        try:
            assert db.schema_version == future[0]
            assert (await db.fetchone("SELECT COUNT(*) FROM instances"))[0] == 1
        finally:
            await db.close()

    asyncio.run(main())
    assert "operations" in tables(path)


def test_a_failing_migration_changes_nothing(tmp_path):
    path = str(tmp_path / "p.db")
    broken = (2, "CREATE TABLE half (x INTEGER); INSERT INTO no_such_table VALUES (1);")

    async def main():
        db = await Database.open(path, migrations=[(1, V1)])
        await db.close()
        with pytest.raises(sqlite3.OperationalError):
            await Database.open(path, migrations=[(1, V1), broken])
        db = await Database.open(path, migrations=[(1, V1)])
        try:
            assert db.schema_version == 1
        finally:
            await db.close()

    asyncio.run(main())
    assert "half" not in tables(path)


def test_a_newer_database_opens_with_a_warning(tmp_path, caplog):
    path = str(tmp_path / "p.db")

    async def main():
        db = await Database.open(path, migrations=[(1, V1), (2, V2)])
        await db.close()
        with caplog.at_level(logging.WARNING, logger="llm_proxy.storage"):
            db = await Database.open(path, migrations=[(1, V1)])
        assert db.schema_version == 2
        await db.close()

    asyncio.run(main())
    assert "newer than this release" in caplog.text


def test_transaction_commits_and_rolls_back():
    async def main():
        db = await Database.open(":memory:", migrations=[(1, V1)])
        try:
            async with db.transaction():
                await db.execute("INSERT INTO runs VALUES (10)")
            with pytest.raises(RuntimeError):
                async with db.transaction():
                    await db.execute("INSERT INTO runs VALUES (11)")
                    raise RuntimeError("boom")
            assert await db.fetchall("SELECT version FROM runs ORDER BY version") == [(1,), (10,)]
        finally:
            await db.close()

    asyncio.run(main())


def test_a_write_from_another_task_waits_for_the_open_transaction():
    async def main():
        db = await Database.open(":memory:", migrations=[(1, V1)])
        entered = asyncio.Event()

        async def rolled_back():
            with pytest.raises(RuntimeError):
                async with db.transaction():
                    await db.execute("INSERT INTO runs VALUES (20)")
                    entered.set()
                    await asyncio.sleep(0.05)
                    raise RuntimeError("boom")

        async def other():
            await entered.wait()
            await db.execute("INSERT INTO runs VALUES (21)")  # must not land in the rolled-back transaction

        try:
            await asyncio.gather(rolled_back(), other())
            assert await db.fetchall("SELECT version FROM runs ORDER BY version") == [(1,), (21,)]
        finally:
            await db.close()

    asyncio.run(main())


def test_cancelled_transaction_rolls_back_and_leaves_the_connection_usable():
    async def main():
        db = await Database.open(":memory:", migrations=[(1, V1)])

        inside = asyncio.Event()

        async def slow():
            async with db.transaction():
                await db.execute("INSERT INTO runs VALUES (30)")
                inside.set()
                await asyncio.sleep(10)

        try:
            task = asyncio.create_task(slow())
            await inside.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with db.transaction():
                await db.execute("INSERT INTO runs VALUES (31)")
            assert await db.fetchall("SELECT version FROM runs ORDER BY version") == [(1,), (31,)]
        finally:
            await db.close()

    asyncio.run(main())


def test_split_statements_respects_strings_comments_and_triggers():
    script = """
    CREATE TABLE t (a TEXT DEFAULT 'x;y');  -- trailing; comment
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'z;'; END;
    -- only a comment;
    """
    statements = split_statements(script)
    assert len(statements) == 2
    assert "CREATE TRIGGER" in statements[1] and statements[1].endswith("END;")  # one statement, body and all


def test_migration_versions_must_be_consecutive():
    check([(1, ""), (2, "")])
    with pytest.raises(ValueError):
        check([(1, ""), (3, "")])
    with pytest.raises(ValueError):
        check([(2, "")])
