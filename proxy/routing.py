"""Send a request to the best backend of its route, moving on to the next while that is safe.

Order: the route's groups in turn (the model asked for, then its fallbacks).
Within a group, backends that can take the request now come first, drawn at
random with probability proportional to their health score (weight times health,
shrunk by requests in flight); backends that are offline or in cooldown are only
tried when nothing else is left. At most ``1 + routing.retries`` backends, all
within ``routing.deadline`` seconds. When the route has no candidate left (one
node serves the model, or every one was tried), a transient failure is retried
on that same backend up to ``routing.retry_same`` times, after a jittered,
doubling backoff that must fit in what remains of the deadline.

Safe means: the failure is one another backend may not share (unreachable,
busy, 5xx, timeout, model missing there) and nothing has reached the client
yet. Adapters only return a :class:`Stream` once its first frame has arrived,
so every failure seen here happened before the client got a byte.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from .admission import Slots
from .backends import Reply, Stream
from .config import RoutingConfig
from .errors import (
    BackendAuthFailed,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ModelNotFound,
    Overloaded,
    ProxyError,
    TemplateRejected,
)
from .health import BackendHealth
from .resolve import Candidate, Route

log = logging.getLogger("llm_proxy.routing")

Operation = Literal["chat", "completion", "embeddings"]


@dataclass
class Outcome:
    reply: Reply
    candidate: Candidate
    attempts: int
    failures: list[str] = field(default_factory=list)  # what went wrong on the backends tried before
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # what the gateway decided for it


def _transient(exc: ProxyError) -> bool:
    """Worth asking the same backend again: it broke or was busy, it did not time out or refuse."""
    return isinstance(exc, BackendError) and not isinstance(exc, (BackendTimeout, BackendAuthFailed))


def _counted(exc: ProxyError, attempts: int) -> ProxyError:
    exc.headers = {**(exc.headers or {}), "x-proxy-attempts": str(attempts)}
    return exc


class Router:
    def __init__(self, config: RoutingConfig, health: dict[str, BackendHealth], slots: dict[str, Slots],
                 rng: random.Random | None = None) -> None:  # fmt: skip
        self.config = config
        self.health = health
        self.slots = slots
        self.rng = rng or random.Random()
        self.on_model_missing: Callable[[Candidate], None] | None = None

    def plan(self, route: Route) -> list[Candidate]:
        """Every candidate of the route, in the order they should be tried."""
        seen: set[tuple[str, str]] = set()
        first: list[Candidate] = []
        last: list[Candidate] = []
        for group in route.groups:
            ready, later = [], []
            for c in group:
                key = (c.backend.name, c.model)
                health = self.health.get(c.backend.name)
                if key in seen or health is None or health.draining:
                    continue
                seen.add(key)
                (ready if health.eligible else later).append(c)
            first += self._ordered(ready)
            last += later
        last.sort(key=lambda c: self.health[c.backend.name].cooldown_until)  # soonest back first
        return first + last

    def _ordered(self, candidates: list[Candidate]) -> list[Candidate]:
        """A weighted draw without replacement, backends with a free slot before full ones."""
        if len(candidates) < 2:
            return candidates
        best = min((self.health[c.backend.name].latency or 0 for c in candidates), default=0) or None
        pool = [(c, self.health[c.backend.name].score(best)) for c in candidates]
        order = []
        while pool:
            total = sum(score for _, score in pool)
            pick = self.rng.random() * total
            for i, (_, score) in enumerate(pool):
                pick -= score
                if pick <= 0 or i == len(pool) - 1:
                    order.append(pool.pop(i)[0])
                    break
        return sorted(order, key=lambda c: not self.slots[c.backend.name].has_room())  # stable: keeps the draw

    async def dispatch(self, route: Route, operation: Operation, body_for: Callable[[Candidate], dict]) -> Outcome:
        everything = self.plan(route)
        plan = everything[: 1 + self.config.retries]
        if not plan:  # every backend serving it is draining (being removed, or switching models)
            raise BackendUnavailable(
                f"every backend serving {route.public!r} is draining; try again shortly",
                headers={"retry-after": "5"},
            )
        failures: list[str] = []
        failure: ProxyError | None = None
        attempt = 0
        index = 0  # into plan
        again = 0  # retries of plan[index] itself
        ends = time.monotonic() + self.config.deadline
        try:
            async with asyncio.timeout(self.config.deadline):
                while index < len(plan):
                    candidate = plan[index]
                    attempt += 1
                    try:
                        reply = await self._call(candidate, operation, body_for(candidate))
                    except ProxyError as exc:
                        if isinstance(exc, TemplateRejected):
                            exc.candidate = candidate  # the gateway learns the limit for this model
                        if not (exc.retryable or isinstance(exc, ModelNotFound)):
                            raise _counted(exc, attempt)
                        failure = exc
                        failures.append(f"{candidate.backend.name}: {exc.message}")
                        if index + 1 < len(plan):
                            log.info("failing over from %s: %s", candidate.backend.name, exc.message)
                            index, again = index + 1, 0
                            continue
                        if again < self.config.retry_same and len(everything) == len(plan) and _transient(exc):
                            # Nobody else can take it: a reset or a busy node often answers a moment later.
                            again += 1
                            pause = self._backoff(again)
                            if time.monotonic() + pause < ends:
                                log.info("retrying %s in %.2fs: %s", candidate.backend.name, pause, exc.message)
                                await asyncio.sleep(pause)
                                continue
                        break
                    return Outcome(reply, candidate, attempt, failures)
        except TimeoutError:
            raise _counted(BackendTimeout(
                f"no backend answered within routing.deadline ({self.config.deadline:g}s)"
                + (f"; tried: {'; '.join(failures)}" if failures else "")
            ), attempt) from None  # fmt: skip
        assert failure is not None  # a route always has at least one candidate
        if isinstance(failure, Overloaded) or len(failures) < 2:
            raise _counted(failure, attempt)
        tried = len({f.split(":", 1)[0] for f in failures})
        what = f"tried {tried} backends" if tried == len(failures) else f"{len(failures)} attempts on {tried} backend(s)"
        failure.message = f"{failure.message} ({what}: {'; '.join(failures)})"
        raise _counted(failure, attempt)

    def _backoff(self, retry: int) -> float:
        """``retry_backoff`` doubling per retry, jittered by +-50% so clients failing together spread out."""
        return self.config.retry_backoff * 2 ** (retry - 1) * (0.5 + self.rng.random())

    async def _call(self, candidate: Candidate, operation: Operation, body: dict) -> Reply:
        backend = candidate.backend
        health = self.health[backend.name]
        slots = self.slots[backend.name]
        await slots.acquire()
        health.in_flight += 1
        started = time.monotonic()
        try:
            reply = await getattr(backend, operation)(body, candidate.model)
        except BaseException as exc:
            self._done(slots, health)
            if isinstance(exc, ModelNotFound):
                if self.on_model_missing:
                    self.on_model_missing(candidate)  # the listing was stale: stop sending it there
            elif isinstance(exc, ProxyError) and exc.retryable:
                health.failed(exc.message)
            raise
        health.succeeded(time.monotonic() - started)
        if isinstance(reply, Stream):
            return Stream(self._tracked(reply, slots, health))  # the slot is held until the stream ends
        self._done(slots, health)
        return reply

    @staticmethod
    def _done(slots: Slots, health: BackendHealth) -> None:
        slots.release()
        health.in_flight -= 1

    async def _tracked(self, stream: Stream, slots: Slots, health: BackendHealth) -> AsyncIterator[bytes]:
        try:
            async for frame in stream:
                yield frame
        except ProxyError as exc:
            if exc.retryable:
                health.failed(exc.message)  # broke mid-answer: too late to retry, not too late to learn
            raise
        finally:
            self._done(slots, health)
            await stream.aclose()
