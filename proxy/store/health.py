"""Health learned by one process reaches the others: a backend that failed is in cooldown everywhere.

Without this, each worker would find a dead node by failing a request on it,
once per cooldown. Here the feed's loop looks at each backend's
:class:`..health.BackendHealth` (a read of two numbers, off the request path:
the router is not touched) and publishes a new failure streak's cooldown: on the
bus at once when there is one (Redis: the other replicas apply it as it arrives,
even while the database is away), and as a ``health`` change in the store
(every process reads it within a second; one that starts later reads the
cooldowns still running, :meth:`HealthShare.load`). The other processes take the
later of their own cooldown and the published one, so applying the same news
twice is harmless. A dead node costs each process at most one attempt, and
usually only the first process pays it.

Cooldowns travel as epoch seconds (``time.time()``): monotonic clocks are per
process.
"""

from __future__ import annotations

import logging
import time

from .base import HEALTH, Bus, Change, FleetStore

log = logging.getLogger("llm_proxy.health")


class HealthShare:
    def __init__(self, store: FleetStore, health: dict, bus: Bus | None = None) -> None:
        self.store = store
        self.bus = bus
        self.health = health  # name -> BackendHealth, the catalog's own table
        self._seen: dict[str, tuple[int, float]] = {}  # name -> (failures, cooldown_until) published or applied
        if bus is not None:
            bus.on(HEALTH, self.apply)

    async def load(self) -> int:
        """Apply the cooldowns other processes published that still run (a process that just started)."""
        before = {name: h.cooldown_until for name, h in self.health.items()}
        for change in await self.store.changes_of(HEALTH):
            self.apply(change)
        return sum(h.cooldown_until != before.get(name) for name, h in self.health.items())

    async def publish(self) -> None:
        now = time.monotonic()
        news = []
        for name, health in list(self.health.items()):
            state = (health.consecutive_failures, health.cooldown_until)
            seen = self._seen.get(name)
            if seen == state:
                continue
            self._seen[name] = state
            if health.consecutive_failures and health.cooldown_until > now and (seen is None or state[1] > seen[1]):
                until = time.time() + (health.cooldown_until - now)
                news.append((name, {"failures": health.consecutive_failures, "cooldown_until": until,
                                    "error": health.last_error}))  # fmt: skip
        for name, data in news:
            if self.bus is not None:
                self.bus.send(HEALTH, name, data)
        for name, data in news:
            await self.store.publish(HEALTH, name, data)  # a store that is away raises: the bus has told them

    def apply(self, change: Change) -> None:
        if change.origin == self.store.instance or not change.data:
            return
        health = self.health.get(change.key)
        if health is None:
            return
        until = time.monotonic() + (float(change.data["cooldown_until"]) - time.time())
        if until <= health.cooldown_until or until <= time.monotonic():
            return
        was = health.state
        health.cooldown_until = until
        health.consecutive_failures = max(health.consecutive_failures, int(change.data.get("failures") or 1))
        health.proven = False
        health.last_error, health.last_error_at = change.data.get("error"), time.time()
        self._seen[change.key] = (health.consecutive_failures, health.cooldown_until)
        if was != "offline":
            log.warning("backend %s is offline for %.1fs: another proxy process saw it fail: %s", change.key,
                        until - time.monotonic(), health.last_error)  # fmt: skip
