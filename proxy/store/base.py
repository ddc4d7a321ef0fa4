"""The one interface for state that every proxy process shares: fleet records, operations, leases, changes.

A process is never alone: ``serve --workers N`` runs N of them on one file, and
replicas may run on other hosts. So nothing here is kept per process. Each write
goes to the store together with a :class:`Change` row naming what changed; every
process reads the changes it has not seen (about twice a second, see
:mod:`.feed`) and applies them to its in-memory view, which is what the request
path reads. Nothing on the request path waits for the store.

Operations are run by one process at a time: the runner holds a lease on the
operation's row (``lease_until``) and renews it while it lives; when it lapses,
any process marks the operation ``interrupted``. The same kind of lease, by
name, bounds pulls across processes (one per node, ``pulls.max_parallel`` in
all) and lets one process take a scheduled run.

Implementations: :class:`.sqlite.SQLiteStore`, :class:`.postgres.PostgresStore`.

Beside the store, a :class:`Bus` (optional: Redis, ``redis.url``) carries what
must be fast between replicas: wake-ups for the change feed, events that need
no durability (health, operation progress), and the hot response cache. Code
outside this package sees only the :class:`Bus` protocol, or ``None`` without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Change topics, and what their key is.
NODES = "nodes"  # a registered node added or removed (key: node name)
DRAIN = "drain"  # a node drained or resumed (key: node name; data: {"draining": bool})
ALIAS = "alias"  # an alias override set (key: alias)
OPERATION = "operation"  # an operation's row changed (key: operation id)
CANCEL = "cancel"  # someone asked for an operation to be cancelled (key: operation id)
AGENT = "agent"  # a node agent registered or reported (key: node name; data: url, sealed token, snapshot, seen)
HEALTH = "health"  # a backend failed (key: node name; data: failures, cooldown_until (epoch), error)
PROGRESS = "progress"  # an operation's progress, on the bus only (key: operation id; data: its row)

LEASE_SECONDS = 8.0  # an operation's runner or a lease holder silent this long is taken for gone
RENEW_INTERVAL = 1.0  # seconds between renewals of what this process holds


@dataclass(frozen=True)
class Change:
    seq: int
    topic: str
    key: str
    data: dict | None
    origin: str  # the instance that made it


class Bus(Protocol):
    """What replicas share fast, beside the store; every method is a no-op (or a miss) while it is away."""

    @property
    def up(self) -> bool: ...

    def on(self, topic: str, handler) -> None:
        """``handler(change)`` (sync) for each event of ``topic`` another process sent."""

    def send(self, topic: str, key: str, data: dict) -> bool:
        """Never waits; False when the bus is away (the caller then relies on the store)."""

    async def cache_get(self, key: str) -> bytes | None: ...

    def cache_put(self, key: str, body: bytes, ttl: float) -> None: ...

    def status(self) -> dict: ...


class FleetStore(Protocol):
    instance: str  # this process's id, in leases and changes

    # --- registered nodes (spec: the node's JSON as node_store keeps it) ------------------------
    async def node_rows(self) -> list[tuple[str, str]]:
        """(name, spec), oldest first."""

    async def add_node(self, name: str, kind: str, url: str, spec: str) -> bool:
        """False when a node of that name is stored already."""

    async def update_node_spec(self, name: str, spec: str) -> None: ...

    async def remove_node(self, name: str) -> None: ...

    # --- drains ---------------------------------------------------------------------------------
    async def drained(self) -> set[str]: ...

    async def set_drain(self, name: str, draining: bool) -> None: ...

    # --- alias overrides ------------------------------------------------------------------------
    async def alias_overrides(self) -> list[tuple[str, str, str]]:
        """(alias, target, config_target)."""

    async def set_alias_override(self, alias: str, target: str, config_target: str, previous: str | None,
                                 operation_id: str | None) -> None: ...  # fmt: skip

    async def drop_alias_override(self, alias: str) -> None: ...

    # --- operations (rows: dicts of the Operation fields, params/result as JSON text) -----------
    async def save_operations(self, rows: list[dict], *, lease_until: float | None) -> None:
        """Upsert, recording this process as the runner of active rows; one OPERATION change each."""

    async def load_operations(self, since: float) -> list[dict]:
        """Rows created since ``since`` (epoch), oldest first; older finished rows are deleted."""

    async def load_operation(self, op_id: str) -> dict | None: ...

    async def claim_operation(self, op_id: str, states: frozenset[str], *, lease_until: float) -> bool:
        """Make this process the runner of a row in one of ``states`` (queued now); False if another won."""

    async def interrupt_local_dead(self, host: str, alive, error: str) -> int:
        """Rows still active whose runner on this host is gone (``alive(pid)`` false, or this very pid)."""

    async def interrupt_expired(self, now: float, error: str) -> list[str]:
        """Rows still active whose runner's lease lapsed: interrupted, one OPERATION change each."""

    async def request_cancel(self, op_ids: list[str]) -> None: ...

    # --- leases ---------------------------------------------------------------------------------
    async def acquire(self, name: str, *, until: float) -> bool: ...

    async def release(self, name: str) -> None: ...

    async def renew(self, *, until: float) -> None:
        """Extend every lease and operation this process holds."""

    # --- changes --------------------------------------------------------------------------------
    async def publish(self, topic: str, key: str, data: dict | None = None) -> None: ...

    async def changes_since(self, seq: int) -> list[Change]: ...

    async def changes_of(self, topic: str) -> list[Change]:
        """Every change of ``topic`` still kept, oldest first (what a process starting now missed)."""

    async def last_seq(self) -> int: ...

    async def prune(self, before: float) -> None: ...
