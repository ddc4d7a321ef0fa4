"""How well each backend is doing, from the requests it served and from active checks.

Passive: every attempt the router makes ends in :meth:`BackendHealth.succeeded`
or :meth:`BackendHealth.failed`. A connection error, a 5xx or a timeout puts the
backend into a cooldown that doubles with each failure in a row, up to
``health.max_cooldown``. Active: :class:`Monitor` probes every backend on an
interval (Ollama ``/api/version``, vLLM ``/health``) and then asks what it
serves; a probe that answers ends a cooldown early.

States, as ``/admin/status`` and the metrics show them:

- ``offline``: in cooldown, or the last probe failed. Not chosen while any
  other backend can take the request.
- ``degraded``: answering, but with many recent errors, or just back and not
  yet proven by a successful request. Chosen, with less weight.
- ``online``: everything else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from .config import HealthConfig

log = logging.getLogger("llm_proxy.health")

State = Literal["online", "degraded", "offline"]

_WINDOW = 50  # at most this many recent outcomes count towards the error rate ...
_WINDOW_SECONDS = 60.0  # ... and only those of the last minute, so old trouble is forgiven
_EWMA = 0.2  # weight of the newest latency sample


@dataclass
class BackendHealth:
    name: str
    weight: float
    config: HealthConfig
    in_flight: int = 0
    draining: bool = False
    consecutive_failures: int = 0
    cooldown_until: float = 0.0  # time.monotonic()
    probe_ok: bool | None = None  # None: not probed yet
    proven: bool = True  # False after a failure, until a request succeeds again
    latency: float | None = None  # EWMA of time to first byte, seconds
    last_error: str | None = None
    last_error_at: float | None = None  # time.time(), for humans
    version: str | None = None
    outcomes: deque = field(default_factory=lambda: deque(maxlen=_WINDOW))
    logged: State = "online"  # the state last logged: each change is logged once, where it is noticed

    # --- what requests report ------------------------------------------------------------------

    def succeeded(self, latency: float) -> None:
        self.outcomes.append((time.monotonic(), True))
        self.consecutive_failures = 0
        self.cooldown_until = 0.0
        self.proven = True
        self.latency = latency if self.latency is None else (1 - _EWMA) * self.latency + _EWMA * latency
        if self.logged != "online":  # the common case costs one comparison
            self._log_change()

    def failed(self, reason: str) -> None:
        was = self.state
        self.outcomes.append((time.monotonic(), False))
        self.consecutive_failures += 1
        self.proven = False
        pause = min(self.config.cooldown * 2 ** (self.consecutive_failures - 1), self.config.max_cooldown)
        self.cooldown_until = time.monotonic() + pause
        self.last_error, self.last_error_at = reason, time.time()
        if was != "offline":
            self._log_change(f"{reason} (retried in {pause:.1f}s)")

    # --- what the monitor reports --------------------------------------------------------------

    def probed(self, ok: bool, error: str | None = None, version: str | None = None) -> None:
        self.probe_ok = ok
        if ok:
            self.version = version or self.version
            if self.cooldown_until:
                self.cooldown_until = 0.0  # it answers again: let requests find out whether it works
            log.debug("backend %s answers its health check", self.name)
        else:
            self.last_error, self.last_error_at = error, time.time()
            log.debug("backend %s fails its health check: %s", self.name, error)
        self._log_change(None if ok else f"health check failed: {error}")

    def _log_change(self, reason: str | None = None) -> None:
        """Log a change of :attr:`state` once: offline as a warning with its reason, the rest as info."""
        state = self.state
        was, self.logged = self.logged, state
        if state == was:
            return
        if state == "offline":
            log.warning("backend %s is offline: %s", self.name, reason or self.last_error)
        elif was == "offline":
            log.info("backend %s is back (%s)", self.name, state)
        elif state == "degraded":
            log.info("backend %s is degraded: %.0f%% of its recent requests failed", self.name, 100 * self.error_rate)
        else:
            log.info("backend %s is online again", self.name)

    # --- what the router reads -----------------------------------------------------------------

    @property
    def error_rate(self) -> float:
        since = time.monotonic() - _WINDOW_SECONDS
        recent = [ok for at, ok in self.outcomes if at >= since]
        return recent.count(False) / len(recent) if recent else 0.0

    def cooling(self, now: float | None = None) -> bool:
        return self.cooldown_until > (time.monotonic() if now is None else now)

    @property
    def state(self) -> State:
        if self.probe_ok is False or self.cooling():
            return "offline"
        if not self.proven or self.error_rate > self.config.degraded_error_rate:
            return "degraded"
        return "online"

    @property
    def eligible(self) -> bool:
        """Worth sending a request to now, before trying anything known to be down."""
        return not self.draining and self.state != "offline"

    def score(self, best_latency: float | None) -> float:
        """Weight times health, shrunk by the requests already in flight here.

        Dividing in-flight by the weight keeps the configured split under load: a
        node with three times the weight carries three times the requests before
        it looks busier than the other.
        """
        if self.weight <= 0:
            return 0.0
        health = 1.0 - self.error_rate
        if self.state == "degraded":
            health *= 0.5
        if best_latency and self.latency and self.latency > 2 * best_latency:
            health *= 2 * best_latency / self.latency  # much slower than the fastest peer
        return self.weight * max(health, 0.01) / (1 + self.in_flight / self.weight)

    def snapshot(self) -> dict:
        return {
            "state": self.state,
            "weight": self.weight,
            "in_flight": self.in_flight,
            "draining": self.draining,
            "error_rate": round(self.error_rate, 3),
            "latency_ms": round(self.latency * 1000, 1) if self.latency is not None else None,
            "consecutive_failures": self.consecutive_failures,
            "cooldown_seconds": round(max(0.0, self.cooldown_until - time.monotonic()), 1),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "version": self.version,
        }


class Monitor:
    """Probes every backend on an interval, then refreshes what it serves."""

    def __init__(self, interval: float, check) -> None:
        self.interval = interval
        self._check = check  # async () -> None: one round over every backend
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._check()
            except Exception:  # the loop must outlive any one bad round
                log.exception("a health check round failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
