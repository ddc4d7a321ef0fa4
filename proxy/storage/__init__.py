"""Persistence: one SQLite file shared by every worker process, behind small classes.

The interfaces (``Database`` here, ``History`` and ``ResponseCache`` above it) are
what the rest of the proxy sees, so the store can later move to PostgreSQL or
Redis without touching the request path.
"""

from .db import Database
from .migrations import MIGRATIONS

__all__ = ["MIGRATIONS", "Database"]
