"""``llm-proxy sync``: the fleet against the config, without a running proxy.

It talks to the nodes directly: the config file's, plus those registered at run
time when the proxy's database (``storage.path``) exists. Planning, pulling
(retries, backoff, one pull per node, ``pulls.max_parallel``) and the manifest
are the same code the proxy's ``POST /admin/models/sync`` uses; the pulls start
at once (whoever runs the command, or its cron job, chose the time, so
``pulls.window`` does not apply) and are not stored as the proxy's operations.

Exit status: 0 when every planned pull succeeded and every node answered, 1
otherwise (the manifest is written either way, except for ``--dry-run``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TextIO

from ..backends import make_backend
from ..backends.ollama_admin import OllamaAdmin
from ..config import BackendConfig, Config
from ..errors import NotFound
from ..storage import Database
from ..storage.sealed import Sealer, key_path_for
from ..store import SQLiteStore
from .distribution import PlanItem, plan_sync
from .manager import OperationManager
from .model import Operation
from .node_store import NodeStore
from .pulls import PullRunner
from .sync import SyncNode, collect, manifest, write_manifest

_PROGRESS_EVERY = 5.0  # seconds between progress lines of one pull whose status did not change


class _Nodes:
    def __init__(self, admins: dict[str, OllamaAdmin]) -> None:
        self.admins = admins

    def ollama(self, name: str) -> OllamaAdmin:
        try:
            return self.admins[name]
        except KeyError:
            raise NotFound(f"no Ollama node called {name!r}") from None


async def _registered(config: Config) -> list[BackendConfig]:
    path = config.storage.path
    if path == ":memory:" or not await asyncio.to_thread(os.path.exists, path):
        return []
    sealer = await asyncio.to_thread(Sealer.open, key_path_for(path, config.storage.key_path))
    db = await Database.open(path)
    try:
        stored = await NodeStore(SQLiteStore(db), sealer).load()
    finally:
        await db.close()
    known = {b.name for b in config.backends}
    return [b for b in stored if b.name not in known]


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def format_plan(plan: list[PlanItem]) -> str:
    if not plan:
        return "plan: nothing to do (no baseline or fallback models for these nodes)"
    width = max(len(p.node) for p in plan)
    model_width = max(len(p.model) for p in plan)
    lines = ["plan:"]
    lines += [f"  {p.node:<{width}}  {p.model:<{model_width}}  {p.action:<11}  {p.reason}" for p in plan]
    return "\n".join(lines)


def format_progress(op: Operation) -> str:
    parts = [f"{op.node}  {op.model}  {op.state}: {op.status}"]
    if op.total:
        parts.append(f"{op.fraction * 100:.1f}% of {_size(op.total)}")
    if op.speed:
        parts.append(f"{_size(op.speed)}/s")
    if op.eta_seconds and op.active:
        parts.append(f"ETA {op.eta_seconds:.0f}s")
    if op.error:
        parts.append(op.error)
    return "  ".join(parts)


async def _follow(manager: OperationManager, ops: list[Operation], out: TextIO) -> None:
    shown: dict[str, tuple[str, str, float]] = {}
    while True:
        now = time.monotonic()
        for op in ops:
            state, status, at = shown.get(op.id, ("", "", 0.0))
            if (op.state, op.status) != (state, status) or (op.active and now - at >= _PROGRESS_EVERY):
                print(format_progress(op), file=out, flush=True)
                shown[op.id] = (op.state, op.status, now)
        if not any(op.active for op in ops):
            return
        await asyncio.sleep(0.2)


async def run_sync(config: Config, *, dry_run: bool = False, skip_existing: bool = False, no_download: bool = False,
                   manifest_path: str | None = None, out: TextIO) -> int:  # fmt: skip
    backends = [*config.backends, *await _registered(config)]
    nodes: list[SyncNode] = []
    for b in backends:
        timeouts = config.timeouts_for(b)
        if b.kind == "ollama":
            admin = OllamaAdmin(b, timeouts, pull_idle=config.pulls.idle_timeout)
            nodes.append(SyncNode(b.name, b.kind, b.url, b.gpu_memory_gb, admin=admin))
        else:
            nodes.append(SyncNode(b.name, b.kind, b.url, b.gpu_memory_gb, backend=make_backend(b, timeouts)))
    try:
        states = await collect(nodes)
        for s in states:
            held = f"{len(s.models)} model(s)" if s.reachable else f"NOT ANSWERING: {s.error}"
            print(f"{s.name} ({s.kind}, {s.url}): {held}", file=out)
        plan = plan_sync(config.distribution, states, skip_existing=skip_existing)
        print(format_plan(plan), file=out, flush=True)
        if dry_run:
            return 0
        failed: list[Operation] = []
        if not no_download:
            manager = OperationManager(config.pulls)
            manager.register("pull", PullRunner(_Nodes({n.name: n.admin for n in nodes if n.admin}), config.pulls))
            ops = [manager.submit(Operation("pull", p.model, p.node, {"force": p.action == "update"}))
                   for p in plan if p.action in ("pull", "update")]  # fmt: skip
            try:
                await _follow(manager, ops, out)
            finally:
                await manager.close()
            failed = [op for op in ops if op.state != "succeeded"]
            states = await collect(nodes)
        path = manifest_path or config.distribution.manifest_path
        data = manifest(states)
        await write_manifest(path, data)
        unreachable = [s.name for s in states if not s.reachable]
        print(f"manifest: {path} ({len(data['models'])} entries)", file=out)
        if failed:
            print(f"{len(failed)} pull(s) failed: " + "; ".join(f"{o.node}: {o.model}: {o.error}" for o in failed),
                  file=out)  # fmt: skip
        if unreachable:
            print(f"not answering: {', '.join(unreachable)}", file=out)
        return 1 if failed or unreachable else 0
    finally:
        await asyncio.gather(*(n.admin.aclose() for n in nodes if n.admin),
                             *(n.backend.aclose() for n in nodes if n.backend))  # fmt: skip
