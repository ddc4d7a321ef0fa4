"""Operations kept in the fleet store (:mod:`proxy.store`): they and their outcome survive a restart,
and every proxy process sees them.

Each row records the process that runs it and a lease it renews while it lives
(:data:`proxy.store.base.LEASE_SECONDS`). When the lease lapses (the process was
killed), any process marks the operation ``interrupted``; it can be retried from
any process, which then runs it (one runner: the retry claims the row in the
store first). At start-up, active rows of a process on this host that is gone are
marked at once, without waiting for their lease.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable

import orjson

from ..storage.background import pid_alive
from ..store.base import LEASE_SECONDS, FleetStore
from .model import RETRYABLE, Operation

log = logging.getLogger("llm_proxy.operations")

INTERRUPTED = "the proxy stopped before this operation finished; retry it with POST /admin/operations/{id}/retry"
RETENTION_DAYS = 30.0  # finished operations older than this are deleted at start-up


def to_row(op: Operation) -> dict:
    return {"id": op.id, "kind": op.kind, "node": op.node, "model": op.model,
            "params": orjson.dumps(op.params).decode(), "state": op.state, "status": op.status,
            "completed": op.completed, "total": op.total, "fraction": op.fraction, "speed": op.speed,
            "eta_seconds": op.eta_seconds, "error": op.error, "attempts": op.attempts,
            "result": orjson.dumps(op.result).decode() if op.result is not None else None,
            "created_at": op.created_at, "started_at": op.started_at, "finished_at": op.finished_at}  # fmt: skip


def from_row(row: dict) -> Operation:
    data = dict(row)
    data["params"] = orjson.loads(data["params"] or "{}")
    data["result"] = orjson.loads(data["result"]) if data["result"] else None
    return Operation(**data)


class OperationStore:
    def __init__(self, store: FleetStore) -> None:
        self.fleet = store
        self.host = socket.gethostname()

    @property
    def instance(self) -> str:
        return self.fleet.instance

    async def save(self, ops: Iterable[Operation]) -> None:
        await self.fleet.save_operations([to_row(op) for op in ops], lease_until=time.time() + LEASE_SECONDS)

    async def recover(self) -> int:
        """Mark rows of processes on this host that are gone ``interrupted``; returns how many."""
        count = await self.fleet.interrupt_local_dead(self.host, pid_alive, INTERRUPTED)
        if count:
            log.info("%d operation(s) of a stopped proxy marked interrupted", count)
        return count

    async def expire(self) -> list[str]:
        """Mark operations whose runner stopped renewing its lease ``interrupted``; returns their ids."""
        ids = await self.fleet.interrupt_expired(time.time(), INTERRUPTED)
        if ids:
            log.warning("%d operation(s) lost their runner (its process is gone): marked interrupted: %s",
                        len(ids), ", ".join(ids))  # fmt: skip
        return ids

    async def load(self) -> list[Operation]:
        """Every stored operation of the last RETENTION_DAYS, oldest first (older finished ones are deleted)."""
        return [from_row(r) for r in await self.fleet.load_operations(time.time() - RETENTION_DAYS * 86400)]

    async def load_one(self, op_id: str) -> Operation | None:
        row = await self.fleet.load_operation(op_id)
        return from_row(row) if row else None

    async def claim(self, op_id: str) -> bool:
        return await self.fleet.claim_operation(op_id, RETRYABLE, lease_until=time.time() + LEASE_SECONDS)

    async def request_cancel(self, op_ids: list[str]) -> None:
        await self.fleet.request_cancel(op_ids)
