"""Pulling and deleting a model on one Ollama node, as operations.

A pull, in order:

1. a scheduled pull (sync, auto-distribution) waits for ``pulls.window``;
2. the node is asked for its version: a node that does not answer fails the
   operation at once, before it waits for anything, so it holds up nobody;
3. one pull at a time per node (later ones wait their turn);
4. unless ``force``, a model already installed succeeds at once;
5. at most ``pulls.max_parallel`` pulls at once across the fleet; the slot is
   given back between attempts, so a node in backoff does not keep it;
6. up to ``pulls.attempts`` attempts, ``pulls.backoff`` seconds apart and
   doubling. Ollama keeps partial layers, so each attempt resumes. A model
   the registry does not have is not retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Protocol

from ..backends.ollama import normalize
from ..backends.ollama_admin import OllamaAdmin
from ..config import PullConfig
from ..errors import BackendUnavailable, ProxyError
from .manager import OperationManager
from .model import Operation
from .progress import PullProgress
from .window import seconds_until_open


class NodeAccess(Protocol):
    def ollama(self, name: str) -> OllamaAdmin:
        """The admin client of an Ollama node; raises a ProxyError for an unknown or non-Ollama node."""


def installed_entry(tags: list[dict], model: str) -> dict | None:
    wanted = normalize(model)
    return next((e for e in tags if normalize(e.get("model") or e.get("name") or "") == wanted), None)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class PullRunner:
    def __init__(self, nodes: NodeAccess, pulls: PullConfig) -> None:
        self.nodes = nodes
        self.pulls = pulls

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        admin = self.nodes.ollama(op.node)
        if op.params.get("scheduled"):
            await self._window(op, manager)
        manager.begin(op, "contacting the node")
        try:
            await admin.version()
        except ProxyError as exc:
            raise BackendUnavailable(
                f"node {op.node!r} is not answering, so the pull was not started: {exc.message}"
            ) from None
        async with manager.node_slot(op, op.node):
            if not op.params.get("force") and await self._installed(op, admin):
                manager.say(op, "already installed")
                return
            await self._attempts(op, manager, admin)
        await self._installed(op, admin)  # digest and size for the result
        manager.say(op, "success")

    async def _window(self, op: Operation, manager: OperationManager) -> None:
        while (wait := seconds_until_open(self.pulls.window)) > 0:
            manager.say(op, f"waiting for the pull window {self.pulls.window} (opens in {_duration(wait)})")
            await asyncio.sleep(min(wait, 60.0))

    async def _installed(self, op: Operation, admin: OllamaAdmin) -> bool:
        entry = installed_entry(await admin.tags(), op.model)
        if entry is None:
            return False
        size = int(entry.get("size") or 0)
        op.completed = op.total = max(size, op.total)
        op.fraction = 1.0
        op.result = {"digest": entry.get("digest"), "size": size, "modified_at": entry.get("modified_at")}
        return True

    async def _attempts(self, op: Operation, manager: OperationManager, admin: OllamaAdmin) -> None:
        insecure = bool(op.params.get("insecure"))
        await run_attempts(op, manager, self.pulls, lambda: admin.pull(op.model, insecure=insecure))


async def run_attempts(op: Operation, manager: OperationManager, pulls: PullConfig,
                       start: Callable[[], AsyncIterator[dict]]) -> None:  # fmt: skip
    """Up to ``pulls.attempts`` runs of ``start()`` (an iterator of Ollama-shaped status lines), backing off."""
    progress = PullProgress(op.completed, op.total, op.fraction)
    attempts = pulls.attempts
    for attempt in range(1, attempts + 1):
        async with manager.pull_slot(op):
            op.attempts = attempt
            manager.say(op, "pulling manifest" if attempt == 1 else f"attempt {attempt} of {attempts}")
            progress.new_attempt()
            try:
                async with aclosing(start()) as lines:
                    async for line in lines:
                        now = time.monotonic()
                        progress.feed(line, now)
                        before = op.status
                        op.progress(progress.snapshot(now))
                        manager.changed(op, important=op.status != before)
                        if line.get("status") == "success":
                            op.result = line.get("entry") or op.result
                return
            except ProxyError as exc:
                if not exc.retryable or attempt == attempts:
                    raise ProxyError(f"{exc.message} (attempt {attempt} of {attempts})", status=exc.status,
                                     code=exc.code) from None  # fmt: skip
                failure = exc.message
        delay = pulls.backoff * 2 ** (attempt - 1)
        op.speed = op.eta_seconds = None
        manager.say(op, f"attempt {attempt} of {attempts} failed ({failure}); retrying in {delay:g}s")
        await asyncio.sleep(delay)


class DeleteRunner:
    def __init__(self, nodes: NodeAccess) -> None:
        self.nodes = nodes

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        admin = self.nodes.ollama(op.node)
        manager.begin(op, "deleting")
        removed = await admin.delete(op.model)
        op.result = {"removed": removed}
        manager.say(op, "deleted" if removed else "was not installed")
