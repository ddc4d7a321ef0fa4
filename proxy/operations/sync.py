"""Sync the fleet against the config: collect what each node holds, plan, pull, write the manifest.

The same code serves ``POST /admin/models/sync`` (pulls run as scheduled
operations of the proxy, inside ``pulls.window``) and ``llm-proxy sync`` (which
talks to the nodes directly and pulls at once: whoever runs it chose the time).
What a node should hold is :func:`.distribution.plan_sync`'s rule.

The manifest is a JSON file for audits, replaced atomically (written next to
the old one, then renamed over it)::

    {"generated_at": "2025-07-07T20:22:19.180Z",
     "nodes": [{"node", "kind", "url", "reachable", "error"}],
     "models": [{"model", "node", "digest", "size", "modified_at", "checked_at"}]}
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..backends import Backend
from ..backends.ollama_admin import OllamaAdmin
from ..errors import ProxyError
from ..history import iso
from .distribution import NodeState
from .manager import OperationManager
from .model import RETRYABLE, Operation


@dataclass
class SyncNode:
    """A node as sync sees it: Ollama nodes through their admin client, others through their adapter."""

    name: str
    kind: str
    url: str
    gpu_memory_gb: float | None
    admin: OllamaAdmin | None = None
    backend: Backend | None = None


async def _collect_one(node: SyncNode) -> NodeState:
    state = NodeState(node.name, node.kind, node.url, node.gpu_memory_gb)
    try:
        if node.admin is not None:
            for entry in await node.admin.tags():
                state.models.append({"model": entry.get("model") or entry.get("name"), "digest": entry.get("digest"),
                                     "size": entry.get("size"), "modified_at": entry.get("modified_at")})  # fmt: skip
        elif node.backend is not None:
            for served in await node.backend.list_models():
                created = served.created or None
                state.models.append({"model": served.name, "digest": None, "size": None,
                                     "modified_at": iso(created) if created else None})  # fmt: skip
    except ProxyError as exc:
        state.reachable, state.error = False, exc.message
    return state


async def collect(nodes: list[SyncNode]) -> list[NodeState]:
    """Ask every node at once what it holds; a node that does not answer is marked, not fatal."""
    return list(await asyncio.gather(*(_collect_one(n) for n in nodes)))


def manifest(states: list[NodeState], checked_at: float | None = None) -> dict:
    checked = iso(checked_at or time.time())
    return {
        "generated_at": checked,
        "nodes": [{"node": s.name, "kind": s.kind, "url": s.url, "reachable": s.reachable, "error": s.error}
                  for s in states],
        "models": [{"model": m["model"], "node": s.name, "digest": m["digest"], "size": m["size"],
                    "modified_at": m["modified_at"], "checked_at": checked}
                   for s in states for m in sorted(s.models, key=lambda m: m["model"])],
    }  # fmt: skip


def _write_atomically(path: str, data: bytes) -> None:
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def write_manifest(path: str, data: dict) -> None:
    await asyncio.to_thread(_write_atomically, path, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


class SyncRunner:
    """The ``sync`` operation: waits for the pulls the plan started, then writes the manifest."""

    def __init__(self, nodes, manifest_path: str) -> None:
        self.nodes = nodes  # () -> list[SyncNode]
        self.manifest_path = manifest_path

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        children = op.params.get("children", [])
        for child in children:  # a retried sync retries the pulls that did not make it
            if manager.get(child).state in RETRYABLE:
                await manager.retry(child)
        manager.begin(op, f"waiting for {len(children)} pull(s)" if children else "collecting installed models")
        done = await manager.follow(op, children)
        failed = [f"{c.node}: {c.model}: {c.error or c.state}" for c in done if c.state != "succeeded"]
        manager.say(op, "collecting installed models")
        states = await collect(self.nodes())
        path = op.params.get("manifest_path") or self.manifest_path
        data = manifest(states)
        await write_manifest(path, data)
        unreachable = [s.name for s in states if not s.reachable]
        op.result = {"manifest_path": path, "entries": len(data["models"]), "failed": failed,
                     "unreachable": unreachable}  # fmt: skip
        if failed:
            raise ProxyError(f"{len(failed)} of {len(children)} pull(s) failed: {'; '.join(failed)}", status=502)
        manager.say(op, "manifest written")
