"""Shared fleet state: what every proxy process must agree on, behind one small interface.

| module | what |
|---|---|
| ``base`` | the :class:`FleetStore` protocol and the change topics |
| ``sqlite`` | :class:`SQLiteStore`, the default: the proxy's SQLite file, shared by the workers of one host |
| ``feed`` | :class:`ChangeFeed`: reads the changes other processes made and hands them to their handlers |
| ``health`` | :class:`HealthShare`: a backend's failures and cooldown, learned by one process, applied in all |
"""

from .base import Change, FleetStore
from .feed import ChangeFeed
from .sqlite import SQLiteStore

__all__ = ["Change", "ChangeFeed", "FleetStore", "SQLiteStore"]
