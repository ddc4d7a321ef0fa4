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
from .affinity import AffinityTable
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
from .health import BackendHealth, read_signals
from .resolve import Candidate, Route

log = logging.getLogger("llm_proxy.routing")

Operation = Literal["chat", "completion", "embeddings"]
# Why a backend answered: the model was loaded there, it had the shortest queue, the conversation
# was there before, the weighted draw (or the only candidate), or the first choices had failed or
# were unavailable (another backend after a failure, a fallback model, a backend in cooldown).
RouteReason = Literal["loaded", "shortest-queue", "affinity", "weight", "fallback"]


@dataclass
class Outcome:
    reply: Reply
    candidate: Candidate
    attempts: int
    failures: list[str] = field(default_factory=list)  # what went wrong on the backends tried before
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # what the gateway decided for it
    reason: RouteReason = "weight"  # why this backend: X-Proxy-Route-Reason


def _transient(exc: ProxyError) -> bool:
    """Worth asking the same backend again: it broke or was busy, it did not time out or refuse."""
    return isinstance(exc, BackendError) and not isinstance(exc, (BackendTimeout, BackendAuthFailed))


def _completion_tokens(body: bytes) -> int:
    """``usage.completion_tokens`` of a whole answer, found without parsing it (it comes last)."""
    at = body.rfind(b'"completion_tokens":')
    if at < 0:
        return 0
    digits = body[at + 20 : at + 32].lstrip(b" ")
    end = 0
    while end < len(digits) and 48 <= digits[end] <= 57:
        end += 1
    return int(digits[:end]) if end else 0


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
        self.affinity = AffinityTable(config.affinity_size, config.affinity_ttl) if config.affinity else None
        self._refreshes: set[asyncio.Task] = set()  # signal reads in the background (kept from the GC)

    def plan(self, route: Route, sticky: str | None = None) -> tuple[list[Candidate], RouteReason]:
        """Every candidate of the route, in the order they should be tried, and why the first one leads.

        ``sticky``: the backend the conversation's affinity entry names, if any.
        """
        seen: set[tuple[str, str]] = set()
        first: list[Candidate] = []
        last: list[Candidate] = []
        reason: RouteReason | None = None
        for index, group in enumerate(route.groups):
            ready, later = [], []
            for c in group:
                key = (c.backend.name, c.model)
                health = self.health.get(c.backend.name)
                if key in seen or health is None or health.draining:
                    continue
                seen.add(key)
                (ready if health.eligible else later).append(c)
            ordered, why = self._ordered(ready, sticky)
            if reason is None and ordered:
                reason = why if index == 0 else "fallback"  # the model asked for has no backend ready
            first += ordered
            last += later
        last.sort(key=lambda c: self.health[c.backend.name].cooldown_until)  # soonest back first
        return first + last, reason or "fallback"

    def _ordered(self, candidates: list[Candidate], sticky: str | None) -> tuple[list[Candidate], RouteReason]:
        """A weighted draw without replacement, then what the backends report, then affinity.

        The draw (weight x health, less what is in flight) spreads load; backends where the
        model is loaded (or loading) go first, then among those the ones with a free slot, then
        the shortest reported queue and free KV cache. A conversation's affinity backend leads
        when it is in that list and not overloaded.
        """
        if len(candidates) < 2:
            return candidates, "weight"
        best_ttft = min((t for c in candidates if (t := self.health[c.backend.name].ttft)), default=None)
        best_per_token = min((t for c in candidates if (t := self.health[c.backend.name].per_token)), default=None)
        pool = [(c, self.health[c.backend.name].score(best_ttft, best_per_token)) for c in candidates]
        order = []
        while pool:
            total = sum(score for _, score in pool)
            pick = self.rng.random() * total
            for i, (_, score) in enumerate(pool):
                pick -= score
                if pick <= 0 or i == len(pool) - 1:
                    order.append(pool.pop(i)[0])
                    break
        reason: RouteReason = "weight"
        warmth = {id(c): self._warmth(c) for c in order}
        if all(self._saturated(c) for c in order if warmth[id(c)] == 0):
            # No warm backend, or all of them full: loading elsewhere pays, the draw decides.
            warmth = dict.fromkeys(warmth, 1)
        room = {id(c): not self.slots[c.backend.name].has_room() for c in order}
        order.sort(key=lambda c: (warmth[id(c)], room[id(c)]))  # stable: keeps the draw among equals
        if len(set(warmth.values())) > 1 and warmth[id(order[0])] == 0:
            reason = "loaded"
        lead = [c for c in order if (warmth[id(c)], room[id(c)]) == (warmth[id(order[0])], room[id(order[0])])]
        pressure = {id(c): self._pressure(c) for c in lead}
        if len(set(pressure.values())) > 1:
            lead.sort(key=lambda c: pressure[id(c)])
            order = lead + order[len(lead) :]
            reason = "shortest-queue"
        if sticky is not None:
            for i, c in enumerate(order):
                if c.backend.name == sticky:
                    if self._takes_more(c) and warmth[id(c)] < 2:
                        order.insert(0, order.pop(i))
                        reason = "affinity"
                    break
        return order, reason

    def _warmth(self, candidate: Candidate) -> int:
        """0: the model is loaded (or being loaded by our requests) there; 1: unknown; 2: it must be loaded."""
        signals = self.health[candidate.backend.name].signals
        if signals.loaded is None:  # vLLM serves only what it has loaded; others do not say
            return 0 if signals.load is not None else 1
        key = candidate.backend.model_key(candidate.model)
        return 0 if signals.warm(key) else 2

    def _saturated(self, candidate: Candidate) -> bool:
        return (self.health[candidate.backend.name].in_flight >= self.config.cold_after_in_flight
                or not self.slots[candidate.backend.name].has_room())  # fmt: skip

    def _pressure(self, candidate: Candidate) -> tuple[bool, int]:
        signals = self.health[candidate.backend.name].signals
        return signals.kv_full, signals.queue

    def _takes_more(self, candidate: Candidate) -> bool:
        health = self.health[candidate.backend.name]
        return (health.state == "online" and self.slots[candidate.backend.name].has_room()
                and not health.signals.kv_full and health.signals.queue == 0)  # fmt: skip

    async def dispatch(self, route: Route, operation: Operation, body_for: Callable[[Candidate], dict],
                       conversation: str | None = None) -> Outcome:  # fmt: skip
        """``conversation``: the request's affinity key (:func:`proxy.affinity.conversation_key`), if any."""
        sticky = self.affinity.get(conversation) if self.affinity is not None and conversation else None
        everything, reason = self.plan(route, sticky)
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
                            _counted(exc, attempt)
                            raise
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
                    if self.affinity is not None and conversation:
                        self.affinity.remember(conversation, candidate.backend.name)
                    why = reason if candidate is everything[0] else "fallback"
                    return Outcome(reply, candidate, attempt, failures, reason=why)
        except TimeoutError:
            raise _counted(BackendTimeout(
                f"no backend answered within routing.deadline ({self.config.deadline:g}s)"
                + (f"; tried: {'; '.join(failures)}" if failures else "")
            ), attempt) from None  # fmt: skip
        assert failure is not None  # a route always has at least one candidate
        if isinstance(failure, Overloaded) or len(failures) < 2:
            raise _counted(failure, attempt)
        tried = len({f.split(":", 1)[0] for f in failures})
        what = f"{len(failures)} attempts on {tried} backend(s)" if tried < len(failures) else f"tried {tried} backends"
        failure.message = f"{failure.message} ({what}: {'; '.join(failures)})"
        raise _counted(failure, attempt)

    def _backoff(self, retry: int) -> float:
        """``retry_backoff`` doubling per retry, jittered by +-50% so clients failing together spread out."""
        return self.config.retry_backoff * 2 ** (retry - 1) * (0.5 + self.rng.random())

    async def _call(self, candidate: Candidate, operation: Operation, body: dict) -> Reply:
        backend = candidate.backend
        health = self.health[backend.name]
        slots = self.slots[backend.name]
        self._freshen(backend, health)
        await slots.acquire()
        health.in_flight += 1
        signals, key = health.signals, backend.model_key(candidate.model)
        cold = operation != "embeddings" and signals.is_loaded(key) is False
        if cold:  # more requests for this model now gather here instead of loading it elsewhere too
            signals.loading[key] = signals.loading.get(key, 0) + 1
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
        finally:
            if cold:
                signals.loading[key] -= 1
        elapsed = time.monotonic() - started
        signals.answered(key)
        if isinstance(reply, Stream):
            health.succeeded(ttft=elapsed)  # adapters return a stream at its first chunk
        elif operation != "embeddings" and (tokens := _completion_tokens(reply)):
            health.succeeded(per_token=elapsed / tokens)
        else:
            health.succeeded()
        if isinstance(reply, Stream):
            return Stream(self._tracked(reply, slots, health))  # the slot is held until the stream ends
        self._done(slots, health)
        return reply

    def _freshen(self, backend, health: BackendHealth) -> None:
        """Under load, read the backend's signals again when they are getting old, without waiting for them."""
        signals = health.signals
        if health.in_flight and not signals.refreshing and signals.age() > health.config.signals_interval:
            task = asyncio.ensure_future(read_signals(backend, health))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)

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
