"""The fleet store in SQL: :class:`SQLiteStore` on the proxy's SQLite file (the default, for one host);
:class:`.postgres.PostgresStore` runs the same statements on PostgreSQL.

Every worker of ``serve --workers N`` opens the same file. Each write and its
change row go in one ``BEGIN IMMEDIATE`` transaction, and SQLite has one writer
at a time, so change numbers (``seq``) are handed out in commit order: a reader
that saw ``seq`` n has seen every change before it. (PostgreSQL needs a lock for
that: see :attr:`SQLiteStore.serialize`.) The change row is always the last
write of its transaction, so the lock that orders changes is held only up to
the commit and never waited on while holding it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator

import orjson

from ..storage import Database
from .base import ALIAS, CANCEL, DRAIN, NODES, OPERATION, Change

OP_COLUMNS = ("id", "kind", "node", "model", "params", "state", "status", "completed", "total", "fraction",
              "speed", "eta_seconds", "error", "attempts", "result", "created_at", "started_at",
              "finished_at")  # fmt: skip
_ACTIVE = "('queued', 'running')"
_OP_UPSERT = (
    f"INSERT INTO model_operations ({', '.join(OP_COLUMNS)}, instance, host, pid, lease_until) "
    f"VALUES ({', '.join('?' * (len(OP_COLUMNS) + 4))}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*OP_COLUMNS[1:], "instance", "host", "pid", "lease_until"))
)
_CHANGE = "INSERT INTO fleet_changes (topic, key, data, origin, at) VALUES (?, ?, ?, ?, ?)"


class SQLiteStore:
    # A statement run before a transaction adds its change rows, so that they commit in seq order.
    serialize: str | None = None

    def __init__(self, db: Database) -> None:
        self.db = db
        self.notify = lambda: None  # called after changes are committed (Redis pub/sub wakes the others)
        self.instance = secrets.token_hex(8)
        self.host = socket.gethostname()
        self.pid = os.getpid()

    def _change(self, topic: str, key: str, data: dict | None = None) -> tuple:
        return (topic, key, orjson.dumps(data).decode() if data is not None else None, self.instance, time.time())

    # --- registered nodes -----------------------------------------------------------------------

    async def node_rows(self) -> list[tuple[str, str]]:
        return await self.db.fetchall("SELECT name, spec FROM nodes ORDER BY created_at")

    async def add_node(self, name: str, kind: str, url: str, spec: str) -> bool:
        async with self._tx() as db:
            added = await db.execute(
                "INSERT INTO nodes (name, kind, url, spec, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING", (name, kind, url, spec, time.time()),
            )  # fmt: skip
            if added:
                await self._changes(db, [self._change(NODES, name)])
        return bool(added)

    async def update_node_spec(self, name: str, spec: str) -> None:
        await self.db.execute("UPDATE nodes SET spec = ? WHERE name = ?", (spec, name))

    async def remove_node(self, name: str) -> None:
        async with self._tx() as db:
            await db.execute("DELETE FROM nodes WHERE name = ?", (name,))
            await db.execute("DELETE FROM node_drains WHERE name = ?", (name,))
            await self._changes(db, [self._change(NODES, name)])

    # --- drains ---------------------------------------------------------------------------------

    async def drained(self) -> set[str]:
        return {name for (name,) in await self.db.fetchall("SELECT name FROM node_drains")}

    async def set_drain(self, name: str, draining: bool) -> None:
        async with self._tx() as db:
            if draining:
                await db.execute("INSERT INTO node_drains (name, updated_at) VALUES (?, ?) ON CONFLICT (name) "
                                 "DO UPDATE SET updated_at = excluded.updated_at", (name, time.time()))  # fmt: skip
            else:
                await db.execute("DELETE FROM node_drains WHERE name = ?", (name,))
            await self._changes(db, [self._change(DRAIN, name, {"draining": draining})])

    # --- alias overrides ------------------------------------------------------------------------

    async def alias_overrides(self) -> list[tuple[str, str, str]]:
        return await self.db.fetchall("SELECT alias, target, config_target FROM alias_overrides")

    async def set_alias_override(self, alias: str, target: str, config_target: str, previous: str | None,
                                 operation_id: str | None) -> None:  # fmt: skip
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO alias_overrides (alias, target, config_target, previous, operation_id, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (alias) DO UPDATE SET target = excluded.target, "
                "config_target = excluded.config_target, previous = excluded.previous, "
                "operation_id = excluded.operation_id, updated_at = excluded.updated_at",
                (alias, target, config_target, previous, operation_id, time.time()),
            )
            await self._changes(db, [self._change(ALIAS, alias)])

    async def drop_alias_override(self, alias: str) -> None:
        await self.db.execute("DELETE FROM alias_overrides WHERE alias = ?", (alias,))

    # --- operations -----------------------------------------------------------------------------

    async def save_operations(self, rows: list[dict], *, lease_until: float | None) -> None:
        if not rows:
            return
        values = [(*(r[c] for c in OP_COLUMNS), self.instance, self.host, self.pid,
                   lease_until if r["state"] in ("queued", "running") else None) for r in rows]  # fmt: skip
        async with self._tx() as db:
            await db.executemany(_OP_UPSERT, values)
            await self._changes(db, [self._change(OPERATION, r["id"]) for r in rows])

    async def load_operations(self, since: float) -> list[dict]:
        await self.db.execute(f"DELETE FROM model_operations WHERE created_at < ? AND state NOT IN {_ACTIVE}", (since,))
        rows = await self.db.fetchall(f"SELECT {', '.join(OP_COLUMNS)} FROM model_operations ORDER BY created_at")
        return [dict(zip(OP_COLUMNS, row)) for row in rows]

    async def load_operation(self, op_id: str) -> dict | None:
        row = await self.db.fetchone(f"SELECT {', '.join(OP_COLUMNS)} FROM model_operations WHERE id = ?", (op_id,))
        return dict(zip(OP_COLUMNS, row)) if row else None

    async def claim_operation(self, op_id: str, states: frozenset[str], *, lease_until: float) -> bool:
        marks = ", ".join("?" * len(states))
        async with self._tx() as db:
            claimed = await db.execute(
                f"UPDATE model_operations SET state = 'queued', status = 'queued', instance = ?, host = ?, pid = ?, "
                f"lease_until = ? WHERE id = ? AND state IN ({marks})",
                (self.instance, self.host, self.pid, lease_until, op_id, *sorted(states)),
            )  # fmt: skip
            if claimed:
                await self._changes(db, [self._change(OPERATION, op_id)])
        return bool(claimed)

    async def _interrupt(self, db: Database, ids: list[str], error: str) -> None:
        now = time.time()
        await db.executemany(
            "UPDATE model_operations SET state = 'interrupted', status = 'interrupted', error = ?, speed = NULL, "
            "eta_seconds = NULL, finished_at = ?, lease_until = NULL WHERE id = ?",
            [(error.replace("{id}", i), now, i) for i in ids],
        )
        await self._changes(db, [self._change(OPERATION, i) for i in ids])

    async def interrupt_local_dead(self, host: str, alive, error: str) -> int:
        async with self._tx() as db:
            rows = await db.fetchall(f"SELECT id, host, pid, instance FROM model_operations WHERE state IN {_ACTIVE}")
            # Same pid, other instance: an earlier proxy in this very process (tests start several).
            dead = [i for i, h, pid, inst in rows
                    if inst != self.instance and h == host and (pid == self.pid or not alive(pid))]  # fmt: skip
            if dead:
                await self._interrupt(db, dead, error)
        return len(dead)

    async def interrupt_expired(self, now: float, error: str) -> list[str]:
        async with self._tx() as db:
            rows = await db.fetchall(
                f"SELECT id FROM model_operations WHERE state IN {_ACTIVE} AND lease_until IS NOT NULL "
                "AND lease_until < ?", (now,),
            )  # fmt: skip
            ids = [i for (i,) in rows]
            if ids:
                await self._interrupt(db, ids, error)
        return ids

    async def request_cancel(self, op_ids: list[str]) -> None:
        async with self._tx() as db:
            await self._changes(db, [self._change(CANCEL, i) for i in op_ids])

    # --- leases ---------------------------------------------------------------------------------

    async def acquire(self, name: str, *, until: float) -> bool:
        taken = await self.db.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "holder = excluded.holder, expires_at = excluded.expires_at "
            "WHERE leases.expires_at < ? OR leases.holder = excluded.holder",
            (name, self.instance, until, time.time()),
        )  # fmt: skip
        return bool(taken)

    async def release(self, name: str) -> None:
        await self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, self.instance))

    async def renew(self, *, until: float) -> None:
        async with self.db.transaction() as db:
            await db.execute("UPDATE leases SET expires_at = ? WHERE holder = ? AND expires_at < ?",
                             (until, self.instance, until))  # fmt: skip
            await db.execute(f"UPDATE model_operations SET lease_until = ? WHERE instance = ? AND state IN {_ACTIVE}",
                             (until, self.instance))  # fmt: skip

    # --- changes --------------------------------------------------------------------------------

    async def publish(self, topic: str, key: str, data: dict | None = None) -> None:
        async with self._tx() as db:
            await self._changes(db, [self._change(topic, key, data)])

    async def _changes(self, db, rows: list[tuple]) -> None:
        if self.serialize:
            await db.execute(self.serialize)
        await db.executemany(_CHANGE, rows)

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[Database]:
        """A transaction that adds changes; the others are told once it has committed."""
        async with self.db.transaction() as db:
            yield db
        self.notify()

    async def changes_since(self, seq: int) -> list[Change]:
        rows = await self.db.fetchall(
            "SELECT seq, topic, key, data, origin FROM fleet_changes WHERE seq > ? ORDER BY seq", (seq,)
        )
        return [Change(s, t, k, orjson.loads(d) if d else None, o) for s, t, k, d, o in rows]

    async def changes_of(self, topic: str) -> list[Change]:
        rows = await self.db.fetchall(
            "SELECT seq, topic, key, data, origin FROM fleet_changes WHERE topic = ? ORDER BY seq", (topic,)
        )
        return [Change(s, t, k, orjson.loads(d) if d else None, o) for s, t, k, d, o in rows]

    async def last_seq(self) -> int:
        row = await self.db.fetchone("SELECT COALESCE(MAX(seq), 0) FROM fleet_changes")
        return int(row[0])

    async def prune(self, before: float) -> None:
        await self.db.execute("DELETE FROM fleet_changes WHERE at < ?", (before,))
        await self.db.execute("DELETE FROM leases WHERE expires_at < ?", (before,))
