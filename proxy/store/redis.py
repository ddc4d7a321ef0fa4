"""Redis pub/sub (``redis.url``): a replica that committed changes says so, and the others read them at once.

The changes themselves stay in the database (the fleet store); Redis carries
only "there is something new", so losing a message loses nothing: the change
feed polls the database twice a second anyway. A Redis that goes away is
therefore a slowdown, not an outage: a warning is logged, ``/admin/status``
shows ``"redis": {"state": "down"}``, the feed goes on polling, and the
connection is tried again every second. Uses the official client's asyncio API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..config import redact_url

log = logging.getLogger("llm_proxy.redis")

CHANNEL = "llm-proxy:changes"
_RETRY = 1.0  # seconds between attempts to reach a Redis that went away


class RedisSignal:
    def __init__(self, url: str, wake, instance: str) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise RuntimeError("redis.url needs the redis client: pip install 'llm-proxy[redis]'") from None
        self.url = url
        self.shown = redact_url(url)
        self.wake = wake  # () -> None: read the database's changes now
        self.instance = instance
        self.state = "connecting"
        self.error: str | None = None
        self.received = 0
        self._client = None
        self._task: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="redis-signal")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._sends):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    def status(self) -> dict:
        return {"url": self.shown, "state": self.state, "error": self.error}

    def ping(self) -> None:
        """Tell the other replicas (never awaited by the caller; a Redis away is skipped)."""
        if self.state != "up" or self._client is None:
            return
        task = asyncio.get_running_loop().create_task(self._send())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self) -> None:
        try:
            await self._client.publish(CHANNEL, self.instance)
        except Exception as exc:
            self._down(exc)

    def _down(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        if self.state != "down":
            log.warning("redis %s is not answering (%s): changes from other replicas now arrive by polling the "
                        "database (within a second); retrying every %gs", self.shown, self.error, _RETRY)  # fmt: skip
        self.state = "down"

    async def _listen(self) -> None:
        import redis.asyncio as redis

        while True:
            try:
                if self._client is None:
                    self._client = redis.from_url(self.url, socket_connect_timeout=2, health_check_interval=5)
                pubsub = self._client.pubsub()
                try:
                    await pubsub.subscribe(CHANNEL)
                    if self.state == "down":
                        log.warning("redis %s answers again: changes from other replicas arrive at once", self.shown)
                    self.state, self.error = "up", None
                    self.wake()  # whatever was said while we were away
                    async for message in pubsub.listen():
                        if message.get("type") == "message" and message.get("data") != self.instance.encode():
                            self.received += 1
                            self.wake()
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                raise ConnectionError("the subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._down(exc)
                await asyncio.sleep(_RETRY)
