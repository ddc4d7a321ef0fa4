"""``/api/pull`` on the simulated Ollama node: a download that takes time and can go wrong.

It follows ``server/images.go`` (PullModel) and ``server/download.go``:
``pulling manifest``, then per layer ``{"status": "pulling <12 hex>", "digest",
"total", "completed"}`` lines (``completed`` left out while 0) repeated on a
ticker, then ``verifying sha256 digest``, ``writing manifest``, ``success``.
Errors after the first line travel as an ``{"error"}`` line under HTTP 200; an
unknown name fails with ``pull model manifest: file does not exist``.

Like Ollama, a download belongs to the model, not to the request: concurrent
pulls of one model attach to the same download, a download whose last client
went away stops, and the bytes it fetched stay on "disk" per model and layer,
so the next pull resumes each half-done layer where the last one stopped.
The model is installed (``/api/tags``) only once a pull succeeds.

How it behaves is scripted by :class:`~proxy.sim.behavior.PullBehavior`
(``sim.behavior.pull``, or ``{"pull": {...}}`` in ``PATCH /_sim/behavior``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .behavior import ModelSpec, PullBehavior
from .core import Generation, Output
from .ollama_wire import JSON, NDJSON, canonical_name, display_name, error, guess_spec, layer_digest

UNKNOWN_MODEL = "pull model manifest: file does not exist"
# The small layers every library model carries besides its weights (sizes of llama3.2's).
_SMALL_LAYERS = (("template", 1_429), ("license", 7_711), ("params", 96), ("config", 561))
_END = object()


@dataclass(frozen=True)
class Layer:
    digest: str  # 64 hex, without the "sha256:" prefix
    total: int


def model_layers(spec: ModelSpec) -> list[Layer]:
    """The weights blob (sized so all layers add up to ``spec.size``, as /api/tags reports) and the small ones."""
    small = [Layer(layer_digest(spec, kind), size) for kind, size in _SMALL_LAYERS]
    weights = max(spec.size - sum(layer.total for layer in small), 1)
    return [Layer(spec.digest, weights), *small]


def progress_line(layer: Layer, completed: int) -> dict[str, Any]:
    line: dict[str, Any] = {
        "status": f"pulling {layer.digest[:12]}",
        "digest": f"sha256:{layer.digest}",
        "total": layer.total,
    }
    if completed:  # omitempty
        line["completed"] = completed
    return line


class _Download:
    """One model's download, shared by every pull request attached to it."""

    def __init__(self, owner: OllamaPull, key: str, spec: ModelSpec, plan: PullBehavior, failure: str | None):
        self.owner, self.key, self.spec, self.plan, self.failure = owner, key, spec, plan, failure
        self.layers = model_layers(spec)
        self.listeners: set[asyncio.Queue] = set()
        self.current = 0  # index of the layer being fetched
        self.started = False  # whether lines went out already, which a latecomer has missed
        self.outcome: tuple[str, str] | None = None  # ("ok" | "error" | "drop", message)
        self.task: asyncio.Task | None = None

    def attach(self) -> tuple[asyncio.Queue, list[dict[str, Any]]]:
        """A queue of what comes next, plus the lines a latecomer has missed (finished layers)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.listeners.add(queue)
        if not self.started:
            return queue, []
        done = self.owner._partial
        missed = [progress_line(layer, layer.total) for layer in self.layers[: self.current]]
        if self.current < len(self.layers):
            layer = self.layers[self.current]
            missed.append(progress_line(layer, done.get((self.key, layer.digest), 0)))
        return queue, missed

    def detach(self, queue: asyncio.Queue) -> None:
        self.listeners.discard(queue)
        if not self.listeners and self.task is not None and not self.task.done():
            self._unregister()  # here too: a task cancelled before its first step never runs its finally
            self.task.cancel()  # nobody is waiting: stop, keeping the bytes fetched so far

    def _unregister(self) -> None:
        if self.owner._downloads.get(self.key) is self:
            del self.owner._downloads[self.key]

    def _emit(self, item: Any) -> None:
        for queue in self.listeners:
            queue.put_nowait(item)

    async def run(self) -> None:
        try:
            self.outcome = await self._fetch()
        except asyncio.CancelledError:
            self.outcome = ("cancelled", "")
            raise
        finally:
            self._unregister()
            if self.outcome is not None:
                self._emit((_END, *self.outcome))

    async def _fetch(self) -> tuple[str, str]:
        self.started = True
        plan, done = self.plan, self.owner._partial
        grand_total = sum(layer.total for layer in self.layers)
        if plan.bytes_per_second is not None:
            speed = float(plan.bytes_per_second)
        else:
            speed = grand_total / plan.seconds if plan.seconds > 0 else math.inf
        # Bytes already on disk are not transferred again: a stall there is skipped, and a failure
        # point there strikes as soon as the transfer resumes.
        start = sum(min(done.get((self.key, layer.digest), 0), layer.total) for layer in self.layers)
        stall_at = None if plan.stall_at is None else int(plan.stall_at * grand_total)
        stall_at = stall_at if stall_at is not None and stall_at >= start else None
        fail_at = max(int(plan.fail_at * grand_total), start) if self.failure else None
        offset = 0
        for index, layer in enumerate(self.layers):
            self.current = index
            key = (self.key, layer.digest)
            completed = min(done.get(key, 0), layer.total)
            self._emit(progress_line(layer, completed))
            while completed < layer.total:
                target = layer.total
                for event in (stall_at, fail_at):
                    if event is not None and offset + completed <= event < offset + target:
                        target = event - offset
                while completed < target:
                    step = min(plan.interval, (target - completed) / speed)
                    await asyncio.sleep(step)
                    last_step = step >= (target - completed) / speed
                    completed = target if last_step else min(target, completed + max(1, int(speed * step)))
                    done[key] = completed
                    self._emit(progress_line(layer, completed))
                position = offset + completed
                if fail_at is not None and position == fail_at:
                    return (self.failure or "error", plan.fail_message)
                if stall_at is not None and position == stall_at:
                    stall_at = None
                    await self._stall(layer, completed)
            done[key] = layer.total
            offset += layer.total
        # Only a point at the very end is left (at 1.0): it strikes before the digests are verified.
        if stall_at is not None:
            await self._stall(self.layers[-1], self.layers[-1].total)
        if fail_at is not None:
            return (self.failure or "error", plan.fail_message)
        self.current = len(self.layers)
        self._emit({"status": "verifying sha256 digest"})
        self._emit({"status": "writing manifest"})
        self.owner._install(self.spec)
        self._emit({"status": "success"})
        return ("ok", "")

    async def _stall(self, layer: Layer, completed: int) -> None:
        deadline = time.monotonic() + self.plan.stall_seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(self.plan.interval, left))
            if not self.plan.stall_silent:  # Ollama's ticker keeps reporting the same byte count
                self._emit(progress_line(layer, completed))


class OllamaPull:
    """``/api/pull`` for :class:`SimOllama`: downloads, partial blobs and pull counters."""

    models: list[ModelSpec]
    _modified: dict[str, int]
    _lock: threading.Lock

    def _init_pulls(self) -> None:
        self._partial: dict[tuple[str, str], int] = {}  # (canonical model, layer digest) -> bytes on disk
        self._downloads: dict[str, _Download] = {}  # canonical model -> running download
        self._pulls = dict.fromkeys(("started", "completed", "failed", "cancelled", "active", "max_active"), 0)

    # ----------------------------------------------------------- Python API

    def pull_stats(self) -> dict[str, int]:
        """Pull requests: started, completed, failed, cancelled, active and max_active (at once)."""
        with self._lock:
            return dict(self._pulls)

    def pulled_bytes(self, name: str) -> int:
        """Bytes of ``name``'s layers on disk: its full size once installed, what a broken pull left otherwise."""
        spec = self.find(name)
        if spec is not None:
            return sum(layer.total for layer in model_layers(spec))
        key = canonical_name(name)
        return sum(size for (model, _), size in list(self._partial.items()) if model == key)

    def _reset_pull_stats(self) -> None:
        with self._lock:
            self._pulls.update(started=0, completed=0, failed=0, cancelled=0, max_active=self._pulls["active"])

    # ----------------------------------------------------------- internals

    def _count(self, event: str) -> None:
        with self._lock:
            pulls = self._pulls
            if event == "started":
                pulls["started"] += 1
                pulls["active"] += 1
                pulls["max_active"] = max(pulls["max_active"], pulls["active"])
            else:
                pulls[event] += 1
                pulls["active"] -= 1

    def _take_pull_failure(self) -> tuple[PullBehavior, str | None]:
        """A snapshot of the pull behaviour and the failure this download suffers (counting down fail_times)."""
        with self._lock:
            plan = self.behavior.pull
            failure = plan.fail
            if failure is not None and plan.fail_times is not None:
                if plan.fail_times <= 0:
                    failure = None
                else:
                    plan.fail_times -= 1
            return copy.copy(plan), failure

    def _in_registry(self, name: str, plan: PullBehavior) -> bool:
        wanted = canonical_name(name)
        if any(canonical_name(n) == wanted for n in plan.unknown_models):
            return False
        return plan.registry is None or any(canonical_name(n) == wanted for n in plan.registry)

    def _install(self, spec: ModelSpec) -> None:
        key = canonical_name(spec.name)
        if self.find(spec.name) is None:
            self.models.append(spec)
        self._modified[key] = time.time_ns()
        for part in [p for p in self._partial if p[0] == key]:
            del self._partial[part]  # the blobs now belong to an installed model

    def _forget_blobs(self, name: str) -> None:
        """``DELETE /api/delete`` removes the blobs too, so a later pull starts from zero."""
        key = canonical_name(name)
        for part in [p for p in self._partial if p[0] == key]:
            del self._partial[part]

    # ----------------------------------------------------------- endpoint

    async def _pull(self, request: Request) -> Response:
        body, failure = self._read(request, "PullRequest")
        if failure:
            return failure
        name = body.get("model") or body.get("name")
        if not name or not isinstance(name, str):
            return error(400, "invalid model name")
        stream = body.get("stream") is not False
        return Generation(self, lambda out: self._pull_run(name, stream, out), counted=False)

    def _download_for(self, name: str) -> _Download:
        key = canonical_name(name)
        download = self._downloads.get(key)
        if download is None:
            installed = self.find(name)
            if installed is not None:  # every blob is on disk: the pull only re-checks them
                for layer in model_layers(installed):
                    self._partial[(key, layer.digest)] = layer.total
            spec = dataclasses.replace(installed) if installed else guess_spec(display_name(name))
            plan, failure = self._take_pull_failure()
            download = _Download(self, key, spec, plan, failure)
            self._downloads[key] = download
            download.task = asyncio.ensure_future(download.run())
        return download

    async def _pull_run(self, name: str, stream: bool, out: Output) -> bool:
        self._count("started")
        settled = False

        def settle(outcome: str) -> None:
            # Called before the last line goes out, so a client that has read it sees settled counters.
            nonlocal settled
            if not settled:
                settled = True
                self._count({"ok": "completed", "cancelled": "cancelled"}.get(outcome, "failed"))

        try:
            return await self._pull_lines(name, stream, out, settle)
        except asyncio.CancelledError:
            settle("cancelled")
            raise
        finally:
            settle("failed")  # only if nothing else did: a bug, not a scripted outcome

    async def _pull_lines(self, name: str, stream: bool, out: Output, settle: Callable[[str], None]) -> bool:
        async def send(line: dict[str, Any]) -> None:
            if stream:
                if not out.started:
                    await out.start(200, NDJSON)
                await out.write(orjson.dumps(line) + b"\n")

        await send({"status": "pulling manifest"})
        plan = self.behavior.pull
        if not self._in_registry(name, plan):
            settle("error")
            return await self._pull_failed(stream, out, "error", UNKNOWN_MODEL)
        download = self._download_for(name)
        queue, missed = download.attach()
        last: dict[str, Any] = {}
        try:
            for line in missed:
                await send(line)
            while True:
                item = await queue.get()
                if isinstance(item, tuple) and item[0] is _END:
                    _, outcome, message = item
                    break
                if item == {"status": "success"}:
                    settle("ok")
                last = item
                await send(item)
        finally:
            download.detach(queue)
        if outcome == "ok":
            if stream:
                await out.finish()
            else:
                await out.respond_json(200, last, JSON)
            return True
        settle(outcome)
        return await self._pull_failed(stream, out, outcome, message)

    @staticmethod
    async def _pull_failed(stream: bool, out: Output, how: str, message: str) -> bool:
        if how == "drop":
            out.abort()
        elif stream:  # the status is long gone: the error is the last line
            await out.finish(orjson.dumps({"error": message}) + b"\n")
        else:
            await out.respond_json(500, {"error": message}, JSON)
        return False
