"""``PostgresDatabase``: the proxy's storage on PostgreSQL (``storage.url``), for replicas on several hosts.

It offers what :class:`.db.Database` offers (``execute``, ``executemany``,
``fetchone``, ``fetchall``, ``transaction``), so the history, the cache and the
fleet store run on it unchanged: their SQL is the common dialect (``?``
placeholders, rewritten here to ``$1, $2, ...``; ``ON CONFLICT`` upserts).
asyncpg keeps a pool of connections; a transaction holds one connection, and
statements of the task that opened it run on it.

The URL's password never appears in a log line, an error or ``/admin``: only
:func:`..config.redact_url` of it does.

A server that is away (refused, reset, shutting down, a pool that cannot get a
connection in time) raises :class:`..errors.StoreUnavailable`, a 503 with
``Retry-After`` for whoever asked; the history and the cache catch it like any
failed write and keep their rows for later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from ..config import redact_url as redact
from ..errors import StoreUnavailable
from .migrations import split_statements
from .pg_schema import MIGRATIONS

log = logging.getLogger("llm_proxy.storage")

_LOCK_ID = 0x6C6C6D70  # "llmp": the advisory lock migrations are applied under
_COUNT = re.compile(r"(\d+)$")


@functools.lru_cache(maxsize=512)
def to_dollar(sql: str) -> str:
    """``?`` placeholders to PostgreSQL's ``$n``, leaving string literals alone."""
    out, n, quoted = [], 0, False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


def _plain(record) -> tuple:
    """A row as SQLite would give it: PostgreSQL's SUM of integers is NUMERIC, which comes back as Decimal."""
    return tuple((int(v) if v == v.to_integral_value() else float(v)) if isinstance(v, Decimal) else v
                 for v in record)  # fmt: skip


def _away(exc: BaseException) -> bool:
    """Whether ``exc`` says the server cannot be reached now (as opposed to a statement it refused)."""
    import asyncpg

    return isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
                      | asyncpg.exceptions.OperatorInterventionError
                      | asyncpg.exceptions.TooManyConnectionsError)  # fmt: skip


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """Turn "the server is away" into :class:`StoreUnavailable`; other errors pass unchanged."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:
        if not _away(exc):
            raise
        log.debug("PostgreSQL is unavailable: %s: %s", type(exc).__name__, exc)
        raise StoreUnavailable() from exc


def _rowcount(status: str) -> int:
    found = _COUNT.search(status or "")
    return int(found.group(1)) if found else 0


class PostgresDatabase:
    """Create with ``await PostgresDatabase.open(url)``."""

    lost: str | None = None  # a lost server is noticed by the statements that fail, not by a file check

    def __init__(self, pool, url: str, schema_version: int) -> None:
        self._pool = pool
        self.path = redact(url)
        self.schema_version = schema_version
        self._tx: dict[asyncio.Task, Any] = {}  # task -> the connection of its open transaction

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 8) -> PostgresDatabase:
        try:
            import asyncpg
        except ImportError:
            raise RuntimeError("storage.url names PostgreSQL, which needs asyncpg: "
                               "pip install 'llm-proxy[postgres]'") from None  # fmt: skip
        try:
            pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, command_timeout=10, timeout=5)
        except Exception as exc:
            # asyncpg's messages name host and user, never the password; the URL is redacted all the same.
            raise RuntimeError(f"cannot connect to PostgreSQL at {redact(url)}: {type(exc).__name__}: "
                               f"{exc}") from None  # fmt: skip
        try:
            version = await _migrate(pool)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, url, version)

    def _conn(self):
        task = asyncio.current_task()
        return self._tx.get(task) if task is not None else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with _reachable():
            conn = self._conn()
            if conn is not None:
                return _rowcount(await conn.execute(to_dollar(sql), *params))
            async with self._pool.acquire() as conn:
                return _rowcount(await conn.execute(to_dollar(sql), *params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        rows = [tuple(r) for r in rows]
        if not rows:
            return 0
        with _reachable():
            conn = self._conn()
            if conn is not None:
                await conn.executemany(to_dollar(sql), rows)
            else:
                async with self._pool.acquire() as conn:
                    await conn.executemany(to_dollar(sql), rows)
        return len(rows)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with _reachable():
            conn = self._conn()
            if conn is not None:
                return [_plain(r) for r in await conn.fetch(to_dollar(sql), *params)]
            async with self._pool.acquire() as conn:
                return [_plain(r) for r in await conn.fetch(to_dollar(sql), *params)]

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresDatabase]:
        task = asyncio.current_task()
        if task in self._tx:
            yield self  # nested: part of the enclosing transaction
            return
        # Around the whole block: a server gone mid-transaction also fails the rollback, whose
        # error would otherwise replace the statement's.
        with _reachable():
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    self._tx[task] = conn
                    try:
                        yield self
                    finally:
                        self._tx.pop(task, None)

    async def check_file(self) -> str | None:
        return None

    async def close(self) -> None:
        await self._pool.close()


async def _migrate(pool) -> int:
    latest = MIGRATIONS[-1][0]
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute("CREATE TABLE IF NOT EXISTS llm_proxy_schema (version INTEGER NOT NULL)")
            current = await conn.fetchval("SELECT MAX(version) FROM llm_proxy_schema") or 0
            for version, script in MIGRATIONS:
                if version <= current:
                    continue
                for statement in split_statements(script):
                    await conn.execute(statement)
                await conn.execute("INSERT INTO llm_proxy_schema (version) VALUES ($1)", version)
                log.info("PostgreSQL schema migrated to version %d", version)
    if current > latest:
        log.warning("database schema version %d is newer than this release knows (%d)", current, latest)
    return max(current, latest)
