"""Runs operations in the background, keeps their state, and tells whoever listens.

Each operation runs as one task. What it does depends on its kind: a runner
per kind is registered by whoever builds the manager (pulls and deletes from
:mod:`.pulls`, activation from :mod:`.activate`, sync from :mod:`.sync`), so
this module knows nothing of nodes or wire formats. It owns what every kind
shares: states and their transitions, cancel and retry, the limits on pulls
(one per node, ``pulls.max_parallel`` in all), persistence (written behind, so
progress lines never wait for the disk), subscribers (SSE), and the history.

Shutdown cancels what is running; those operations become ``interrupted``
(not ``cancelled``: nobody asked), and can be retried after the restart.

Other proxy processes share the operations through the store (:mod:`proxy.store`):
this manager holds a copy of every operation, its own and theirs; their changes
arrive through the change feed (:meth:`apply_change`), and a cancel for an
operation another process runs is sent there (:meth:`cancel`). The pull limits
are leases in the store, so they hold across processes. With a bus (Redis), the
progress this process pushes to its own subscribers also goes to the other
replicas at once (:meth:`apply_progress`), so their followers need not wait for
the next write to the store; a snapshot older than what a copy already shows
(the store's row read after a newer event) is ignored, so progress never goes
backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..config import PullConfig
from ..errors import Conflict, InvalidRequest, NotFound, ProxyError
from ..storage.background import WriteBehind
from ..store.base import LEASE_SECONDS, PROGRESS, Bus, Change
from .audit import Audit
from .model import KINDS, RETRYABLE, STATES, Operation
from .store import INTERRUPTED, OperationStore, from_row, to_row

log = logging.getLogger("llm_proxy.operations")

Runner = Callable[[Operation, "OperationManager"], Awaitable[None]]

PUSH_INTERVAL = 0.5  # seconds between progress-only events to subscribers (status changes go at once)
SAVE_INTERVAL = 0.5  # seconds between progress-only writes of one operation (what other processes see)
_LEASE_RETRY = 0.25  # seconds between attempts at a pull slot another process holds
_QUEUE_LIMIT = 256  # events buffered for a slow subscriber before the oldest are dropped
_RANK = {"queued": 0, "running": 1}  # active states in the order an operation goes through them


class OperationManager:
    def __init__(self, pulls: PullConfig, store: OperationStore | None = None, audit: Audit | None = None, *,
                 bus: Bus | None = None) -> None:  # fmt: skip
        self.pulls = pulls
        self.store = store
        self.bus = bus
        if bus is not None:
            bus.on(PROGRESS, self.apply_progress)
        self.audit = audit or Audit(None)
        self.ops: dict[str, Operation] = {}
        self.runners: dict[str, Runner] = {}
        self.push_interval = PUSH_INTERVAL
        self.save_interval = SAVE_INTERVAL
        self._tasks: dict[str, asyncio.Task] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._last_push: dict[str, float] = {}
        self._last_save: dict[str, float] = {}
        self._records: dict[str, object] = {}
        self._parents: dict[str, tuple[Operation, list[Operation]]] = {}  # child id -> (parent, its children)
        self._node_locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(pulls.max_parallel)
        self.pulls_running = 0
        self.pulls_running_max = 0  # high-water mark, for tests and the curious
        self._dirty: set[str] = set()
        self._writer = WriteBehind("operations", self._flush, lambda: bool(self._dirty)) if store else None
        self._closing = False

    def register(self, kind: str, runner: Runner) -> None:
        self.runners[kind] = runner

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.store is not None:
            await self.store.recover()
            for op in await self.store.load():
                self.ops[op.id] = op
            self._writer.start()

    # --- what other processes do ----------------------------------------------------------------

    async def apply_change(self, change: Change) -> None:
        """An operation's row changed in another process: take its state into our copy."""
        if change.origin == self.store.instance or change.key in self._tasks:
            return
        fresh = await self.store.load_one(change.key)
        if fresh is None:
            return
        self._take(fresh)

    def apply_progress(self, change: Change) -> None:
        """Another replica's progress event (from the bus): shown to our followers at once."""
        if change.key in self._tasks or not change.data:
            return
        try:
            fresh = from_row(change.data)
        except (TypeError, ValueError):
            return
        self._take(fresh)

    def _take(self, fresh: Operation) -> None:
        op = self.ops.get(fresh.id)
        if op is None:
            self.ops[fresh.id] = op = fresh
        elif _older(fresh, op):
            return  # the store's row, read after the bus brought something newer
        else:
            op.__dict__.update(fresh.__dict__)  # in place: SSE streams and waiters hold this object
        self._push(op)

    def apply_cancel(self, change: Change) -> None:
        """Another process was asked to cancel an operation that runs here."""
        if change.key in self._tasks:
            self._cancel_task(change.key)

    async def expire(self) -> None:
        """Operations whose runner's lease lapsed become interrupted (in the store, then here)."""
        for op_id in await self.store.expire():
            fresh = await self.store.load_one(op_id)
            if fresh is not None:
                self._take(fresh)

    async def flush(self) -> None:
        """Write what is pending now (other processes read operations from the store)."""
        if self._writer is not None:
            await self._writer.drain()

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            await self._writer.close()

    # --- submitting and controlling -------------------------------------------------------------

    def submit(self, op: Operation) -> Operation:
        if op.kind not in self.runners:
            raise ProxyError(f"no runner for operations of kind {op.kind!r}")
        if self._closing:
            raise Conflict("the proxy is shutting down; no new operations start")
        self.ops[op.id] = op
        self._finished[op.id] = asyncio.Event()
        self._records[op.id] = self.audit.begin(op)
        self.changed(op, important=True)
        self._tasks[op.id] = asyncio.create_task(self._run(op), name=f"operation-{op.id}")
        return op

    def get(self, op_id: str) -> Operation:
        op = self.ops.get(op_id)
        if op is None:
            raise NotFound(f"No operation with id {op_id!r}", param="id")
        return op

    def list(self, *, state: str | None = None, node: str | None = None, kind: str | None = None,
             model: str | None = None, limit: int = 100) -> list[Operation]:  # fmt: skip
        """Newest first."""
        found = [
            op for op in reversed(self.ops.values())
            if (state is None or op.state == state) and (node is None or op.node == node)
            and (kind is None or op.kind == kind) and (model is None or op.model == model)
        ]  # fmt: skip
        return found[: max(1, limit)]

    def active(self, kind: str, *, node: str | None = None, model: str | None = None,
               alias: str | None = None) -> Operation | None:  # fmt: skip
        for op in self.ops.values():
            if op.active and op.kind == kind and (node is None or op.node == node) \
                    and (model is None or op.model == model) and (alias is None or op.alias == alias):  # fmt: skip
                return op
        return None

    async def cancel(self, op_id: str) -> Operation:
        """Cancel here, or ask the process that runs it (which notices within a second)."""
        op = self.get(op_id)
        if not op.active:
            raise Conflict(f"Operation {op_id} is {op.state}; only queued or running operations can be cancelled")
        if op_id in self._tasks:
            self._cancel_task(op_id)
        elif self.store is not None:
            await self.store.request_cancel([op_id, *op.params.get("children", ())])
        else:
            raise Conflict(f"Operation {op_id} is not running in this process")
        return op

    def _cancel_task(self, op_id: str) -> None:
        self._tasks[op_id].cancel()
        for child in self.ops[op_id].params.get("children", ()):
            if child in self._tasks:
                self._tasks[child].cancel()

    async def retry(self, op_id: str) -> Operation:
        op = self.get(op_id)
        if op.state not in RETRYABLE:
            raise Conflict(
                f"Operation {op_id} is {op.state}; only failed, cancelled or interrupted ones can be retried"
            )
        if self._writer is not None:
            await self._writer.drain()  # the store must know how it ended before it can be claimed
        if self.store is not None and not await self.store.claim(op_id):
            # Another process retried it first: it runs there; show what it is now.
            fresh = await self.store.load_one(op_id)
            if fresh is not None:
                self._take(fresh)
            raise Conflict(f"Operation {op_id} was retried already (it is {op.state} now)")
        op.state, op.status, op.error, op.finished_at = "queued", "queued", None, None
        op.speed = op.eta_seconds = None
        op.attempts = 0
        return self.submit(op)

    async def wait(self, op_id: str, timeout: float | None = None) -> Operation:
        """Until the operation ends (at once if it already has)."""
        op = self.get(op_id)
        event = self._finished.get(op_id)
        if op.active:
            async with asyncio.timeout(timeout):
                if event is not None:
                    await event.wait()
                while op.active:  # run by another process: its changes arrive through the feed
                    await asyncio.sleep(0.1)
        return op

    # --- what runners call ----------------------------------------------------------------------

    def begin(self, op: Operation, status: str) -> None:
        op.state, op.status = "running", status
        op.started_at = op.started_at or time.time()
        self.changed(op, important=True)

    def say(self, op: Operation, status: str) -> None:
        if status != op.status:
            op.status = status
            self.changed(op, important=True)

    @contextlib.asynccontextmanager
    async def node_slot(self, op: Operation, node: str) -> AsyncIterator[None]:
        """One pull at a time on a node (in the whole fleet: a lease in the store)."""
        lock = self._node_locks.setdefault(node, asyncio.Lock())
        waiting = f"waiting for another pull on {node} to finish"
        if lock.locked():
            self.say(op, waiting)
        async with lock:
            lease = await self._lease(op, [f"pull-node:{node}"], waiting)
            try:
                yield
            finally:
                await self._release(lease)

    @contextlib.asynccontextmanager
    async def pull_slot(self, op: Operation) -> AsyncIterator[None]:
        """At most ``pulls.max_parallel`` pulls at once, across all nodes."""
        waiting = f"waiting for a free pull slot ({self.pulls.max_parallel} pulls at once)"
        if self._slots.locked():
            self.say(op, waiting)
        async with self._slots:
            lease = await self._lease(op, [f"pull-slot:{i}" for i in range(self.pulls.max_parallel)], waiting)
            try:
                async with self._counted():
                    yield
            finally:
                await self._release(lease)

    async def _lease(self, op: Operation, names: list[str], waiting: str) -> str | None:
        """The first of ``names`` free in the store, waiting while other processes hold them all."""
        if self.store is None:
            return None
        while True:
            for name in names:
                if await self.store.fleet.acquire(name, until=time.time() + LEASE_SECONDS):
                    return name
            self.say(op, waiting)
            await asyncio.sleep(_LEASE_RETRY)

    async def _release(self, name: str | None) -> None:
        if name is not None:
            try:
                await asyncio.shield(self.store.fleet.release(name))
            except Exception:  # it lapses on its own
                log.warning("could not release the lease %s; it lapses in %gs", name, LEASE_SECONDS)

    @contextlib.asynccontextmanager
    async def _counted(self) -> AsyncIterator[None]:
        self.pulls_running += 1
        self.pulls_running_max = max(self.pulls_running_max, self.pulls_running)
        try:
            yield
        finally:
            self.pulls_running -= 1

    def changed(self, op: Operation, important: bool = False) -> None:
        """Tell subscribers and schedule a write: at once when ``important``, else throttled."""
        parent = self._parents.get(op.id)
        if parent is not None:
            self._aggregate(*parent)  # an activation or sync shows its pulls' progress as they go
        now = time.monotonic()
        if important or now - self._last_push.get(op.id, 0.0) >= self.push_interval:
            self._last_push[op.id] = now
            self._push(op)
            if self.bus is not None:
                self.bus.send(PROGRESS, op.id, to_row(op))
        if self._writer is not None and (important or now - self._last_save.get(op.id, 0.0) >= self.save_interval):
            self._last_save[op.id] = now
            self._dirty.add(op.id)
            self._writer.notify()

    async def follow(self, op: Operation, child_ids: list[str]) -> list[Operation]:
        """Wait for the operations ``op`` started, showing their summed progress as its own; returns them."""
        children = [self.get(i) for i in child_ids]
        for child in children:
            self._parents[child.id] = (op, children)
        try:
            self._aggregate(op, children)
            for child in children:
                await self.wait(child.id)
            self._aggregate(op, children)
            return children
        finally:
            for child in children:
                self._parents.pop(child.id, None)

    def _aggregate(self, op: Operation, children: list[Operation]) -> None:
        op.completed = sum(c.completed for c in children)
        op.total = sum(c.total for c in children)
        op.fraction = min(op.completed / op.total, 1.0) if op.total else 0.0
        speeds = [c.speed for c in children if c.speed is not None]
        op.speed = sum(speeds) if speeds else None
        op.eta_seconds = max((c.eta_seconds for c in children if c.active and c.eta_seconds is not None), default=None)
        self.changed(op)

    # --- subscribers ----------------------------------------------------------------------------

    def subscribe(self, op_id: str) -> asyncio.Queue:
        """A queue of ``as_dict()`` snapshots: every status change, progress at most every PUSH_INTERVAL."""
        self.get(op_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(op_id, set()).add(queue)
        return queue

    def unsubscribe(self, op_id: str, queue: asyncio.Queue) -> None:
        queues = self._subscribers.get(op_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[op_id]

    def _push(self, op: Operation) -> None:
        queues = self._subscribers.get(op.id)
        if not queues:
            return
        snapshot = op.as_dict()
        for queue in queues:
            if queue.qsize() >= _QUEUE_LIMIT:
                queue.get_nowait()  # a subscriber that does not read loses the oldest, not the newest
            queue.put_nowait(snapshot)

    # --- running --------------------------------------------------------------------------------

    async def _run(self, op: Operation) -> None:
        try:
            await self.runners[op.kind](op, self)
        except asyncio.CancelledError:
            if self._closing:
                op.state, op.status, op.error = "interrupted", "interrupted", INTERRUPTED.replace("{id}", op.id)
            else:
                op.state, op.status, op.error = "cancelled", "cancelled", op.error or "cancelled by an operator"
        except ProxyError as exc:
            op.state, op.error = "failed", exc.message
            op.status = "failed"
        except Exception as exc:
            log.exception("operation %s (%s %s on %s) failed unexpectedly", op.id, op.kind, op.model, op.node)
            op.state, op.status, op.error = "failed", "failed", f"internal error: {type(exc).__name__}: {exc}"
        else:
            if op.active:
                op.state = "succeeded"
        finally:
            op.finished_at = time.time()
            op.speed = None
            op.eta_seconds = 0.0 if op.state == "succeeded" else None
            self._tasks.pop(op.id, None)
            self.changed(op, important=True)
            self.audit.finish(self._records.pop(op.id, None), op)
            event = self._finished.pop(op.id, None)
            if event is not None:
                event.set()
            if op.state != "succeeded":
                log.info("operation %s (%s %s on %s) %s: %s", op.id, op.kind, op.model, op.node or "-",
                         op.state, op.error)  # fmt: skip

    async def _flush(self) -> None:
        ids, self._dirty = self._dirty, set()
        try:
            await self.store.save(self.ops[i] for i in ids if i in self.ops)
        except BaseException:
            self._dirty |= ids
            raise


def _older(fresh: Operation, op: Operation) -> bool:
    """Whether ``fresh`` shows an earlier moment of the same run than ``op`` does (both still active)."""
    if fresh.state not in _RANK or op.state not in _RANK:
        return False  # an end, or a retry after one: always news
    if _RANK[fresh.state] != _RANK[op.state]:
        return _RANK[fresh.state] < _RANK[op.state]
    return fresh.fraction < op.fraction or fresh.completed < op.completed


def check_filters(state: str | None, kind: str | None) -> None:
    """Refuse a filter value that can never match (a typo should not look like an empty list)."""
    if state is not None and state not in STATES:
        raise InvalidRequest(f"unknown state {state!r}; expected one of {', '.join(sorted(STATES))}", param="state")
    if kind is not None and kind not in KINDS:
        raise InvalidRequest(f"unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}", param="kind")
