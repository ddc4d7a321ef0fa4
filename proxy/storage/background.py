"""The background loops the stores share: a write-behind flusher, a periodic job, and the task both run as.

The request path only appends to an in-memory buffer and calls
:meth:`WriteBehind.notify`, which never awaits; the flusher writes what gathered
in one transaction, shortly after (``linger``), so a burst of requests costs one
commit rather than one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger("llm_proxy.storage")


class WriteBehind:
    """Calls ``flush()`` soon after ``notify()``; ``drain()`` flushes until ``pending()`` is false.

    ``flush`` writes one batch and raises if it could not; it must then put the
    batch back into its buffer, and the loop retries with a growing pause (a locked
    or full disk should not spin the CPU).
    """

    def __init__(
        self,
        name: str,
        flush: Callable[[], Awaitable[None]],
        pending: Callable[[], bool],
        *,
        linger: float = 0.02,
        max_backoff: float = 5.0,
    ) -> None:
        self.name = name
        self._flush = flush
        self._pending = pending
        self._linger = linger
        self._max_backoff = max_backoff
        self._event = asyncio.Event()
        self._lock = asyncio.Lock()  # one flush at a time, whether from the loop or drain()
        self._task: asyncio.Task | None = None
        self.failures = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-writer")

    def notify(self) -> None:
        self._event.set()

    async def drain(self, rounds: int | None = None) -> None:
        """Flush until nothing is pending, or at most ``rounds`` batches (a reader that wants
        what was buffered when it asked must not chase a steady stream of new writes)."""
        done = 0
        while rounds is None or done < rounds:
            # Take the lock even when nothing is pending: a flush under way has taken its batch out
            # of the buffer but not committed it yet, and a reader must not run ahead of it.
            async with self._lock:
                if not self._pending():
                    return
                await self._flush()
            done += 1

    async def close(self) -> None:
        """Write everything still buffered, then stop the loop (raises if the last write fails)."""
        if self._task is not None:
            async with self._lock:  # cancel between flushes, never inside a transaction
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.drain()

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            await self._event.wait()
            if backoff:
                await asyncio.sleep(backoff)
            else:
                await asyncio.sleep(self._linger)  # let the burst gather into one transaction
            self._event.clear()
            try:
                async with self._lock:
                    while self._pending():
                        await self._flush()
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                backoff = min(self._max_backoff, max(0.1, backoff * 2))
                log.exception("%s: write failed, retrying in %.1fs", self.name, backoff)
                self._event.set()


class Background:
    """One named task running ``run()`` until :meth:`close` cancels it: started once, closed once."""

    def __init__(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._run = run
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Periodic(Background):
    """Runs ``job()`` every ``interval`` seconds until closed; a failure is logged, not fatal."""

    def __init__(self, name: str, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        super().__init__(name, self._loop)
        self.interval = interval
        self._job = job

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", self.name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (for spotting dead sibling workers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except OSError:
        return False
    return True
