"""``distribution.schedule``: the sync of baseline and fallback models, run by itself, once per fleet.

Every process checks the clock (in the change feed's loop); for each minute the
cron expression names, the first process to take the lease
``schedule:sync:<minute>`` in the store runs the sync, and the others find it
taken. The sync's pulls are scheduled pulls, so they wait for ``pulls.window``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from ..cron import Cron
from ..store.base import FleetStore

log = logging.getLogger("llm_proxy.schedule")

CHECK_INTERVAL = 15.0  # seconds between looks at the clock
_LEASE_KEPT = 2 * 86400.0  # a firing's lease outlives any clock skew between processes
_MAX_CATCH_UP = timedelta(hours=1)  # after a long stall, look back no further than this


class Scheduler:
    def __init__(self, expression: str, store: FleetStore, run: Callable[[], Awaitable[None]],
                 clock: Callable[[], datetime] = datetime.now) -> None:  # fmt: skip
        self.cron = Cron.parse(expression)
        self.expression = expression
        self.store = store
        self.run = run
        self.clock = clock
        self.last: datetime | None = None
        self.fired: list[datetime] = []  # firings this process ran

    async def tick(self) -> None:
        now = self.clock().replace(second=0, microsecond=0)
        if self.last is None:
            self.last = now - timedelta(minutes=1)  # a process started in a firing minute still takes part
        minute = max(self.last, now - _MAX_CATCH_UP) + timedelta(minutes=1)
        self.last = now
        while minute <= now:
            if self.cron.matches(minute):
                await self._fire(minute)
            minute += timedelta(minutes=1)

    async def _fire(self, minute: datetime) -> None:
        name = f"schedule:sync:{minute:%Y-%m-%dT%H:%M}"
        if not await self.store.acquire(name, until=time.time() + _LEASE_KEPT):
            return  # another process runs this one
        self.fired.append(minute)
        log.info("scheduled sync (%s) for %s: started here", self.expression, f"{minute:%Y-%m-%d %H:%M}")
        await self.run()
