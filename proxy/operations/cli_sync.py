"""``llm-proxy sync``: the fleet against the config, without a running proxy.

It talks to the nodes directly: the config file's, plus those registered at run
time when the proxy's database (``storage.path``) exists. Planning, pulling
(retries, backoff, one pull per node, ``pulls.max_parallel``) and the manifest
are the same code the proxy's ``POST /admin/models/sync`` uses; the pulls start
at once (whoever runs the command, or its cron job, chose the time, so
``pulls.window`` does not apply) and are not stored as the proxy's operations.

Pulls show as one progress line per node and model (fraction, speed, ETA),
redrawn in place on a terminal and printed as plain lines otherwise
(:mod:`proxy.terminal`).

Exit status: 0 when every planned pull succeeded and every node answered, 1
otherwise (the manifest is written either way, except for ``--dry-run``).
"""

from __future__ import annotations

import asyncio
import os
from typing import TextIO

from ..backends import make_backend
from ..backends.ollama_admin import OllamaAdmin
from ..config import BackendConfig, Config
from ..errors import NotFound
from ..storage import Database
from ..storage.sealed import Sealer, key_path_for
from ..store import SQLiteStore
from ..terminal import PullProgress
from .distribution import PlanItem, plan_sync
from .manager import OperationManager
from .model import Operation
from .node_store import NodeStore
from .pulls import PullRunner
from .sync import SyncNode, collect, manifest, write_manifest


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


def format_plan(plan: list[PlanItem]) -> str:
    if not plan:
        return "plan: nothing to do (no baseline or fallback models for these nodes)"
    width = max(len(p.node) for p in plan)
    model_width = max(len(p.model) for p in plan)
    lines = ["plan:"]
    lines += [f"  {p.node:<{width}}  {p.model:<{model_width}}  {p.action:<11}  {p.reason}" for p in plan]
    return "\n".join(lines)


async def _follow(manager: OperationManager, ops: list[Operation], out: TextIO) -> None:
    # The operations run in this process: their state is read in place, not through SSE.
    with PullProgress(out) as view:
        while True:
            for op in ops:
                view.update(op.as_dict())
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
