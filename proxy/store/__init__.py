"""Shared fleet state: what every proxy process must agree on, behind one small interface.

| module | what |
|---|---|
| ``base`` | the :class:`FleetStore` protocol and the change topics |
| ``sqlite`` | :class:`SQLiteStore`, the default: the proxy's SQLite file, shared by the workers of one host |
| ``feed`` | :class:`ChangeFeed`: reads the changes other processes made and hands them to their handlers |
| ``health`` | :class:`HealthShare`: a backend's failures and cooldown, learned by one process, applied in all |
| ``redis`` | :class:`RedisLink`: the :class:`Bus` on Redis (``redis.url``): wake-ups, health, progress, hot cache |
"""

from __future__ import annotations

from .base import Bus, Change, FleetStore
from .feed import ChangeFeed
from .sqlite import SQLiteStore


def open_bus(url: str | None, store: FleetStore, feed: ChangeFeed) -> Bus | None:
    """The bus of ``redis.url`` (None without one), wired to wake ``feed`` and told of ``store``'s commits."""
    if not url:
        return None
    from .redis import RedisLink

    bus = RedisLink(url, feed.wake, store.instance)
    store.notify = bus.ping
    return bus


__all__ = ["Bus", "Change", "ChangeFeed", "FleetStore", "SQLiteStore", "open_bus"]
