"""The fleet store on PostgreSQL (``storage.url``): the same statements as on SQLite, one lock more.

PostgreSQL hands out sequence numbers when rows are inserted, not when they
commit, so a reader could see change 12 committed before change 11 and skip
11 for good. Each transaction that adds changes therefore takes
``fleet_changes``'s EXCLUSIVE lock first (readers are not blocked by it), which
makes the change writers commit one after the other, in seq order.
"""

from __future__ import annotations

from .sqlite import SQLiteStore


class PostgresStore(SQLiteStore):
    serialize = "LOCK TABLE fleet_changes IN EXCLUSIVE MODE"
