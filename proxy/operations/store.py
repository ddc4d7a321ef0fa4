"""Operations in SQLite (table ``model_operations``, migration 2): they and their outcome survive a restart.

Each row records the process that ran it (host, pid and a per-start instance
token). At start-up, rows still ``queued`` or ``running`` that belonged to a
process that is gone become ``interrupted``, and can be retried. Another live
worker's rows on this host are left alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable

import orjson

from ..storage import Database
from ..storage.background import pid_alive
from .model import Operation

log = logging.getLogger("llm_proxy.operations")

INTERRUPTED = "the proxy stopped before this operation finished; retry it with POST /admin/operations/{id}/retry"
RETENTION_DAYS = 30.0  # finished operations older than this are deleted at start-up

_COLUMNS = ("id", "kind", "node", "model", "params", "state", "status", "completed", "total", "fraction",
            "speed", "eta_seconds", "error", "attempts", "result", "created_at", "started_at", "finished_at")  # fmt: skip
_UPSERT = (
    f"INSERT INTO model_operations ({', '.join(_COLUMNS)}, instance, host, pid) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 3))}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*_COLUMNS[1:], "instance", "host", "pid"))
)


class OperationStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.instance = secrets.token_hex(8)
        self.host = socket.gethostname()
        self.pid = os.getpid()

    def _row(self, op: Operation) -> tuple:
        params = orjson.dumps(op.params).decode()
        result = orjson.dumps(op.result).decode() if op.result is not None else None
        return (op.id, op.kind, op.node, op.model, params, op.state, op.status, op.completed, op.total,
                op.fraction, op.speed, op.eta_seconds, op.error, op.attempts, result, op.created_at,
                op.started_at, op.finished_at, self.instance, self.host, self.pid)  # fmt: skip

    async def save(self, ops: Iterable[Operation]) -> None:
        rows = [self._row(op) for op in ops]
        if rows:
            async with self.db.transaction() as db:
                await db.executemany(_UPSERT, rows)

    async def recover(self) -> int:
        """Mark rows of processes that are gone ``interrupted``; returns how many."""
        rows = await self.db.fetchall(
            "SELECT id, host, pid, instance FROM model_operations WHERE state IN ('queued', 'running')"
        )
        # Same pid, other instance: an earlier proxy in this very process (tests start several).
        dead = [
            op_id
            for op_id, host, pid, instance in rows
            if instance != self.instance and host == self.host and (pid == self.pid or not pid_alive(pid))
        ]
        if dead:
            async with self.db.transaction() as db:
                await db.executemany(
                    "UPDATE model_operations SET state = 'interrupted', error = ?, status = 'interrupted', "
                    "speed = NULL, eta_seconds = NULL, finished_at = ? WHERE id = ?",
                    [(INTERRUPTED.replace("{id}", op_id), time.time(), op_id) for op_id in dead],
                )
            log.info("%d operation(s) of a stopped proxy marked interrupted", len(dead))
        return len(dead)

    async def load(self) -> list[Operation]:
        """Every stored operation of the last RETENTION_DAYS, oldest first (older finished ones are deleted)."""
        cutoff = time.time() - RETENTION_DAYS * 86400
        await self.db.execute(
            "DELETE FROM model_operations WHERE created_at < ? AND state NOT IN ('queued', 'running')", (cutoff,)
        )
        rows = await self.db.fetchall(f"SELECT {', '.join(_COLUMNS)} FROM model_operations ORDER BY created_at")
        ops = []
        for row in rows:
            data = dict(zip(_COLUMNS, row))
            data["params"] = orjson.loads(data["params"] or "{}")
            data["result"] = orjson.loads(data["result"]) if data["result"] else None
            ops.append(Operation(**data))
        return ops
