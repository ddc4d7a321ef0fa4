"""Send a request to the best backend of its route, moving on to the next while that is safe.

Order: the route's groups in turn (the model asked for, then its fallbacks).
Within a group, backends that can take the request now come first, drawn at
random with probability proportional to their health score (weight times health,
shrunk by requests in flight); backends that are offline or in cooldown are only
tried when nothing else is left. At most ``1 + routing.retries`` attempts, all
within ``routing.deadline`` seconds.

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
from .errors import BackendTimeout, BackendUnavailable, ModelNotFound, Overloaded, ProxyError, TemplateRejected
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
        plan = self.plan(route)[: 1 + self.config.retries]
        if not plan:  # every backend serving it is draining (being removed, or switching models)
            raise BackendUnavailable(
                f"every backend serving {route.public!r} is draining; try again shortly",
                headers={"retry-after": "5"},
            )
        failures: list[str] = []
        failure: ProxyError | None = None
        try:
            async with asyncio.timeout(self.config.deadline):
                for attempt, candidate in enumerate(plan, 1):
                    try:
                        reply = await self._call(candidate, operation, body_for(candidate))
                    except ProxyError as exc:
                        if isinstance(exc, TemplateRejected):
                            exc.candidate = candidate  # the gateway learns the limit for this model
                        if not (exc.retryable or isinstance(exc, ModelNotFound)):
                            raise
                        failure = exc
                        failures.append(f"{candidate.backend.name}: {exc.message}")
                        if attempt < len(plan):
                            log.info("failing over from %s: %s", candidate.backend.name, exc.message)
                        continue
                    return Outcome(reply, candidate, attempt, failures)
        except TimeoutError:
            raise BackendTimeout(
                f"no backend answered within routing.deadline ({self.config.deadline:g}s)"
                + (f"; tried: {'; '.join(failures)}" if failures else "")
            ) from None
        assert failure is not None  # a route always has at least one candidate
        if isinstance(failure, Overloaded) or len(failures) < 2:
            raise failure
        failure.message = f"{failure.message} (tried {len(failures)} backends: {'; '.join(failures)})"
        raise failure

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
