"""Reads the changes other processes made (:class:`.base.Change`) and hands each to its topic's handlers.

Polled about twice a second in the background (:meth:`ChangeFeed.start`), and
on demand by the admin API before it answers (:meth:`ChangeFeed.poll`), so a
read right after a write on another worker already sees it. The same loop renews
this process's leases, marks operations whose runner is gone, and prunes old
changes: one background task, not four.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ..storage.background import Background
from .base import LEASE_SECONDS, RENEW_INTERVAL, Change, FleetStore

log = logging.getLogger("llm_proxy.store")

POLL_INTERVAL = 0.5  # seconds between reads of the change table
_PRUNE_INTERVAL = 60.0
_KEEP_CHANGES = 600.0  # seconds of changes kept: longer than any process takes to read them
_EXPIRE_INTERVAL = 2.0

Handler = Callable[[Change], Awaitable[None] | None]


class ChangeFeed:
    def __init__(self, store: FleetStore, *, interval: float = POLL_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self.seq = 0
        self._handlers: dict[str, list[Handler]] = {}
        self._jobs: list[tuple[float, Callable[[], Awaitable[None]]]] = []  # (interval, job)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop = Background("fleet-changes", self._run)
        self.failures = 0

    def on(self, topic: str, handler: Handler) -> None:
        self._handlers.setdefault(topic, []).append(handler)

    def wake(self) -> None:
        """Read the changes now rather than at the next interval (another process said there are some)."""
        self._wake.set()

    def every(self, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` in the feed's loop, about every ``interval`` seconds."""
        self._jobs.append((interval, job))

    async def begin(self) -> None:
        """Start from now: what happened before is in the state loaded at start-up."""
        self.seq = await self.store.last_seq()

    async def poll(self) -> int:
        """Apply every change not seen yet; returns how many. Concurrent callers share one read."""
        async with self._lock:
            changes = await self.store.changes_since(self.seq)
            for change in changes:
                self.seq = change.seq
                for handler in self._handlers.get(change.topic, ()):
                    try:
                        result = handler(change)
                        if result is not None:
                            await result
                    except Exception:
                        log.exception("applying a %s change (%s) failed", change.topic, change.key)
            return len(changes)

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    async def renew(self) -> None:
        await self.store.renew(until=time.time() + LEASE_SECONDS)

    async def _prune(self) -> None:
        await self.store.prune(time.time() - _KEEP_CHANGES)

    async def _run(self) -> None:
        jobs = [(RENEW_INTERVAL, self.renew), (_PRUNE_INTERVAL, self._prune), *self._jobs]
        last = [time.monotonic()] * len(jobs)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            # Each step on its own: a database that is away fails the read of changes, and must not
            # also stop the jobs that need no database (health shared over Redis, for one).
            failed = not await self._step(self.poll)
            now = time.monotonic()
            for i, (interval, job) in enumerate(jobs):
                if now - last[i] >= interval:
                    last[i] = now
                    failed = not await self._step(job) or failed
            self.failures = self.failures + 1 if failed else 0

    async def _step(self, job: Callable[[], Awaitable[object]]) -> bool:
        try:
            await job()
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            n = self.failures + 1
            if n in (1, 10) or n % 100 == 0:
                log.exception("the fleet's background work failed (%d round(s) in a row)", n)
            return False
