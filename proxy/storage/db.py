"""``Database``: one aiosqlite connection, set up for several processes sharing one file.

Set-up on open: WAL (readers never wait for the writer, and each process's writes
are short), ``busy_timeout`` (a writer waits for another process's transaction
instead of failing at once), ``synchronous=NORMAL`` (durable at checkpoints, never
corrupt; a killed process loses nothing that was committed), then the migrations.

All SQL runs on aiosqlite's thread, so nothing here blocks the event loop.
Statements are queued on that one thread in call order. Writes outside
:meth:`transaction` take an ``asyncio.Lock`` so they never land inside another
task's open transaction (they would commit or roll back with it); reads do not
take it, and may see the uncommitted rows of a transaction in progress on this
same connection, which is harmless for a history and a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from . import migrations as _migrations

log = logging.getLogger("llm_proxy.storage")

Params = Sequence[Any] | dict[str, Any]


class Database:
    """The proxy's SQLite store. Create with ``await Database.open(path)``."""

    def __init__(self, conn: aiosqlite.Connection, path: str, schema_version: int,
                 identity: tuple[int, int] | None = None) -> None:  # fmt: skip
        self._conn = conn
        self.path = path
        self.schema_version = schema_version
        self._write_lock = asyncio.Lock()
        self._tx_owner: asyncio.Task | None = None
        self._identity = identity  # (device, inode) of the file opened; None for :memory:
        self.lost: str | None = None  # why the file this process writes to is no longer the one on disk

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        migrations: Sequence[_migrations.Migration] = _migrations.MIGRATIONS,
        busy_timeout: float = 10.0,
    ) -> Database:
        """Open (creating the file and its directory if needed) and migrate.

        ``":memory:"`` gives a private in-memory database (unit tests).
        ``busy_timeout`` is in seconds: how long a write waits for another process's lock.
        """
        memory = path == ":memory:" or path.startswith("file::memory:")
        if not memory:
            await asyncio.to_thread(_create_private, path)
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if not memory:
                await _enable_wal(conn)
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            version = await _migrations.apply(conn, list(migrations))
        except BaseException:
            await conn.close()
            raise
        identity = None if memory else await asyncio.to_thread(_identity, path)
        return cls(conn, path, version, identity)

    # --- statements -----------------------------------------------------------------------------

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one write statement; returns the number of rows it changed."""
        async with self._writing():
            cursor = await self._conn.execute(sql, params)
            return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Params]) -> int:
        async with self._writing():
            cursor = await self._conn.executemany(sql, rows)
            return cursor.rowcount

    async def fetchone(self, sql: str, params: Params = ()) -> tuple | None:
        # execute_fetchall is one hop to the database thread; execute + fetchone + close is three.
        rows = await self._conn.execute_fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple]:
        return list(await self._conn.execute_fetchall(sql, params))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception, cancellation included).

        IMMEDIATE takes the file's write lock up front, so a transaction never fails
        half-way because another process started writing first. Inside the block, use
        this same object's ``execute``/``executemany``; they see the transaction is the
        current task's and do not wait for the lock. A nested ``transaction()`` joins the
        enclosing one.
        """
        if self._tx_owner is not None and self._tx_owner is asyncio.current_task():
            yield self  # nested: part of the enclosing transaction
            return
        async with self._write_lock:
            self._tx_owner = asyncio.current_task()
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    # Shielded: a cancelled task must still leave the connection outside a transaction.
                    await asyncio.shield(self._conn.execute("ROLLBACK"))
                    raise
                await self._conn.execute("COMMIT")
            finally:
                self._tx_owner = None

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        if self._tx_owner is not None and self._tx_owner is asyncio.current_task():
            yield
            return
        async with self._write_lock:
            yield

    async def close(self) -> None:
        await self._conn.close()

    async def check_file(self) -> str | None:
        """Whether the file is still the one opened; sets and returns :attr:`lost` when not.

        SQLite keeps writing to a deleted or replaced file through its open descriptor, so
        without this check everything written from then on vanishes at the next restart,
        without a word.
        """
        if self._identity is None or self.lost is not None:
            return self.lost
        try:
            now = await asyncio.to_thread(_identity, self.path)
        except FileNotFoundError:
            self.lost = f"the database file {self.path} was deleted while the proxy runs"
        else:
            if now != self._identity:
                self.lost = f"the database file {self.path} was replaced while the proxy runs"
        if self.lost is not None:
            log.error("%s: what this process writes from now on is lost; restore the file or restart the proxy "
                      "(GET /ready answers 503 until then)", self.lost)  # fmt: skip
        return self.lost


def _create_private(path: str) -> None:
    """Create the database file readable by its owner only; SQLite gives its -wal and -shm files the same mode."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(Path(path).expanduser())
    return info.st_dev, info.st_ino


async def _enable_wal(conn: aiosqlite.Connection) -> None:
    # Switching a new file to WAL needs a moment of exclusive access; with several
    # workers opening it at once one may be told "busy" (or get the old mode back).
    for attempt in range(50):
        try:
            rows = await conn.execute_fetchall("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        else:
            if rows and str(rows[0][0]).lower() == "wal":
                return
        await asyncio.sleep(0.02 * (attempt + 1))
    raise sqlite3.OperationalError("could not switch the database to WAL mode (another process holds it)")
