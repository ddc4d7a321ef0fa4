"""``max_concurrent`` per backend: a slot per request in flight, and a bounded queue for the rest.

A request over the limit waits its turn (first come, first served) for at most
``routing.queue_timeout`` seconds; when ``routing.queue_size`` requests are
already waiting, it is refused at once with :class:`Overloaded` (429 with
``Retry-After``), which the router treats as "try another backend".
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import Overloaded


class Slots:
    def __init__(self, name: str, limit: int, queue_size: int, queue_timeout: float) -> None:
        self.name = name
        self.limit = limit  # 0: no limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.busy = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def has_room(self) -> bool:
        return not self.limit or self.busy < self.limit

    async def acquire(self) -> None:
        if not self.limit:
            self.busy += 1
            return
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise Overloaded(
                f"backend {self.name!r} is at max_concurrent ({self.limit}) with {self.queue_size} requests waiting",
                retry_after=self.queue_timeout / 2,
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter  # release() hands its slot over directly: busy is already counted
        except TimeoutError:
            if not waiter.done() or waiter.cancelled():
                raise Overloaded(
                    f"backend {self.name!r} had no free slot within {self.queue_timeout:g}s",
                    retry_after=self.queue_timeout / 2,
                ) from None
            # The slot arrived just as the timer fired: keep it rather than lose it.
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the next waiter; busy stays the same
                return
        self.busy -= 1
