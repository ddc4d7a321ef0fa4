"""Redis (``redis.url``): what replicas must share fast, beside the durable store.

Four things travel here, all of them also kept or recoverable elsewhere, so a
Redis that goes away is a slowdown, never an outage:

- *Change wake-ups*: a replica that committed fleet changes says so on
  ``llm-proxy:changes`` and the others read the database's change table at once
  (they poll it twice a second anyway).
- *Events* on ``llm-proxy:events``, each a :class:`.base.Change` with its data
  (no sequence number): a backend's new cooldown (``health``), and an operation's
  progress (``progress``), which followers on other replicas see without waiting
  for the runner's next write to the database.
- *The hot response cache*: a complete answer stored by one replica is a hit on
  every other before (or without) a read of the database: ``SET`` with the
  cache's TTL (at most :data:`CACHE_MAX_TTL`), bodies up to
  :data:`CACHE_MAX_BYTES`.

When Redis stops answering, a warning is logged, ``/admin/status`` shows
``"redis": {"state": "down", ...}``, and until it answers again (tried every
second) nothing is sent to it: health and cache are local (plus the database),
changes and progress arrive by polling the database. Uses the official client's
asyncio API; commands have short timeouts and no retries, so a request never
waits long on a Redis that is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson

from ..config import redact_url
from ..storage.background import Background
from .base import Change

log = logging.getLogger("llm_proxy.redis")

CHANGES = "llm-proxy:changes"
EVENTS = "llm-proxy:events"
CACHE_PREFIX = "llm-proxy:cache:"
CACHE_MAX_BYTES = 1024 * 1024  # larger answers stay in each replica's memory and the database
CACHE_MAX_TTL = 3600  # seconds: Redis holds the hot part; older answers are read from the database
_RETRY = 1.0  # seconds between attempts to reach a Redis that went away
_COMMAND_TIMEOUT = 0.5  # seconds: a cache lookup on the request path waits at most this long
_MAX_SENDS = 1000  # sends in flight; beyond that (Redis slow) they are dropped, not queued


class RedisLink:
    """Implements :class:`.base.Bus` on Redis."""

    def __init__(self, url: str, wake: Callable[[], None], instance: str) -> None:
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
        self.received = {"changes": 0, "events": 0}
        self.sent = 0
        self.dropped = 0
        self.cache_hits = 0
        self._handlers: dict[str, list[Callable[[Change], None]]] = {}
        self._sub = None  # the client of the subscription (no read timeout: it waits for messages)
        self._cmd = None  # the client of commands (short timeouts)
        self._listener = Background("redis-link", self._listen)
        self._sends: set[asyncio.Task] = set()

    @property
    def up(self) -> bool:
        return self.state == "up"

    def on(self, topic: str, handler: Callable[[Change], None]) -> None:
        self._handlers.setdefault(topic, []).append(handler)

    def start(self) -> None:
        self._listener.start()

    async def close(self) -> None:
        await self._listener.close()
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        for client in (self._sub, self._cmd):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def status(self) -> dict:
        fallback = None
        if not self.up:
            fallback = ("health and the response cache are local to each replica (and the database's); changes "
                        "and operation progress arrive by polling the database")  # fmt: skip
        return {"url": self.shown, "state": self.state, "error": self.error, "fallback": fallback,
                "received": dict(self.received), "sent": self.sent, "dropped": self.dropped,
                "cache_hits": self.cache_hits}  # fmt: skip

    # --- sending (never awaited by the caller) --------------------------------------------------

    def ping(self) -> None:
        """Tell the other replicas that the database holds new changes."""
        self._fire(CHANGES, self.instance.encode())

    def send(self, topic: str, key: str, data: dict) -> bool:
        """An event for the other replicas' handlers of ``topic``; False when Redis is away (use the database)."""
        return self._fire(EVENTS, orjson.dumps({"o": self.instance, "t": topic, "k": key, "d": data}))

    def _fire(self, channel: str, payload: bytes) -> bool:
        if not self.up or self._cmd is None:
            return False
        return self._spawn(self._cmd.publish(channel, payload))

    def _spawn(self, command) -> bool:
        if len(self._sends) >= _MAX_SENDS:
            command.close()
            self.dropped += 1
            return False
        task = asyncio.get_running_loop().create_task(self._await(command))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        self.sent += 1
        return True

    async def _await(self, command) -> None:
        try:
            await command
        except Exception as exc:
            self._down(exc)

    # --- the hot response cache -----------------------------------------------------------------

    async def cache_get(self, key: str) -> bytes | None:
        if not self.up or self._cmd is None:
            return None
        try:
            body = await self._cmd.get(CACHE_PREFIX + key)
        except Exception as exc:
            self._down(exc)
            return None
        if body is not None:
            self.cache_hits += 1
        return body

    def cache_put(self, key: str, body: bytes, ttl: float) -> None:
        if not self.up or self._cmd is None or len(body) > CACHE_MAX_BYTES or ttl < 1:
            return
        self._spawn(self._cmd.set(CACHE_PREFIX + key, body, ex=int(min(ttl, CACHE_MAX_TTL))))

    # --- receiving ------------------------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        if self.state != "down":
            log.warning("redis %s is not answering (%s): health and the response cache are local now, changes and "
                        "progress from other replicas arrive by polling the database; retrying every %gs",
                        self.shown, self.error, _RETRY)  # fmt: skip
        self.state = "down"

    def _clients(self):
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if self._sub is None:
            self._sub = redis.from_url(self.url, socket_connect_timeout=2, health_check_interval=5)
        if self._cmd is None:
            self._cmd = redis.from_url(self.url, socket_connect_timeout=_COMMAND_TIMEOUT,
                                       socket_timeout=_COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 0))  # fmt: skip
        return self._sub, self._cmd

    async def _listen(self) -> None:
        while True:
            try:
                sub, cmd = self._clients()
                await cmd.ping()
                pubsub = sub.pubsub()
                try:
                    await pubsub.subscribe(CHANGES, EVENTS)
                    if self.state == "down":
                        log.warning("redis %s answers again: health, the response cache, changes and progress are "
                                    "shared through it again", self.shown)  # fmt: skip
                    self.state, self.error = "up", None
                    self.wake()  # whatever was said while we were away
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._received(message.get("channel"), message.get("data"))
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                raise ConnectionError("the subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._down(exc)
                await asyncio.sleep(_RETRY)

    def _received(self, channel: bytes, data: bytes) -> None:
        if channel == CHANGES.encode():
            if data != self.instance.encode():
                self.received["changes"] += 1
                self.wake()
            return
        try:
            event = orjson.loads(data)
            if event["o"] == self.instance:
                return
            change = Change(0, event["t"], event["k"], event["d"], event["o"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", EVENTS)
            return
        self.received["events"] += 1
        for handler in self._handlers.get(change.topic, ()):
            try:
                handler(change)
            except Exception:
                log.exception("applying a %s event (%s) from redis failed", change.topic, change.key)
