"""What an admin operation is: a pull, delete, activation or sync, and where it stands.

One :class:`Operation` per node and model for a pull or a delete; an activation
or a sync spans nodes and lists the operations it started in
``params["children"]``. The dict form (:meth:`Operation.as_dict`) is what
``GET /admin/operations`` and the SSE events send::

    {"id": "op_3kF...", "object": "operation", "kind": "pull", "node": "gpu-1",
     "model": "llama3.1:8b", "alias": null, "state": "running",
     "status": "pulling 8eeb52dfb3bb", "completed": 1204000000, "total": 4920753328,
     "fraction": 0.2447, "speed": 52428800.0, "eta_seconds": 70.9, "error": null,
     "attempts": 1, "params": {...}, "result": null,
     "created_at": "2025-07-07T20:22:19.180Z", "started_at": "...", "finished_at": null}

``speed`` is in bytes per second over the last few seconds; ``eta_seconds`` is
what is left at that speed; both are null when unknown.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

from ..history import iso

Kind = Literal["pull", "delete", "activate", "sync"]
State = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]

KINDS: frozenset[str] = frozenset({"pull", "delete", "activate", "sync"})
STATES: frozenset[str] = frozenset({"queued", "running", "succeeded", "failed", "cancelled", "interrupted"})
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
# States an operation can be retried from.
RETRYABLE: frozenset[str] = frozenset({"failed", "cancelled", "interrupted"})


def new_operation_id() -> str:
    return "op_" + secrets.token_urlsafe(12)


@dataclass
class Operation:
    kind: Kind
    model: str
    node: str | None = None
    params: dict = field(default_factory=dict)
    id: str = field(default_factory=new_operation_id)
    state: State = "queued"
    status: str = "queued"
    completed: int = 0
    total: int = 0
    fraction: float = 0.0
    speed: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    attempts: int = 0
    result: dict | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def alias(self) -> str | None:
        return self.params.get("alias")

    def progress(self, snapshot: dict) -> None:
        """Copy a :meth:`PullProgress.snapshot` in (status, bytes, fraction, speed, ETA)."""
        for name in ("status", "completed", "total", "fraction", "speed", "eta_seconds"):
            setattr(self, name, snapshot[name])

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "object": "operation",
            "kind": self.kind,
            "node": self.node,
            "model": self.model,
            "alias": self.alias,
            "state": self.state,
            "status": self.status,
            "completed": self.completed,
            "total": self.total,
            "fraction": round(self.fraction, 4),
            "speed": None if self.speed is None else round(self.speed, 1),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "error": self.error,
            "attempts": self.attempts,
            "params": self.params,
            "result": self.result,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }
