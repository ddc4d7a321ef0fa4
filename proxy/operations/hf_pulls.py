"""Hugging Face pulls and deletes on a node with an agent, as operations (``"source": "huggingface"``).

They run like Ollama pulls (:mod:`.pulls`): one install at a time per node, at
most ``pulls.max_parallel`` in the fleet, ``pulls.attempts`` attempts with
backoff, progress, speed and ETA from the agent's lines, cancel (hanging up
stops the download on the node) and retry (files already in the node's cache
are not fetched again). Before anything is queued, the agent is asked for the
repository's size and checks it against the node's disk limits; a refusal is
a 409 with the numbers, so nothing starts that could not finish.
"""

from __future__ import annotations

from typing import Protocol

from ..backends.agent import AgentClient
from ..config import PullConfig
from ..errors import BackendUnavailable, DiskLimit, ProxyError
from .manager import OperationManager
from .model import Operation
from .pulls import run_attempts

SOURCES = ("ollama", "huggingface")


class AgentAccess(Protocol):
    def client(self, name: str) -> AgentClient:
        """The agent of a node; raises a ProxyError for an unknown node or one without an agent."""


async def check_plan(client: AgentClient, model: str, revision: str, confirm: bool) -> dict:
    """The agent's plan for ``model``; DiskLimit (409, with the figures) when it must not start."""
    try:
        plan = await client.plan(model, revision, confirm)
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"the agent of {client.name!r} is not answering: {exc.message}") from None
    if plan.get("problem"):
        code = "confirm_required" if "confirm" in plan["problem"] else "disk_limit"
        raise DiskLimit(f"{client.name}: {plan['problem']}", {k: v for k, v in plan.items() if k != "problem"},
                        code=code)  # fmt: skip
    return plan


def _summary(entry: dict | None) -> dict | None:
    if not entry:
        return None
    return {"revision": entry.get("revision"), "commit": entry.get("commit"), "size": entry.get("size"),
            "files": len(entry.get("files") or ()), "installed_at": entry.get("installed_at"),
            "refetched": entry.get("refetched") or []}  # fmt: skip


class HFPullRunner:
    def __init__(self, agents: AgentAccess, pulls: PullConfig) -> None:
        self.agents = agents
        self.pulls = pulls

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        client = self.agents.client(op.node)
        revision, confirm = op.params.get("revision", "main"), bool(op.params.get("confirm"))
        manager.begin(op, "asking the node's agent")
        plan = await check_plan(client, op.model, revision, confirm)
        op.total = max(op.total, int(plan.get("total_bytes") or 0))
        async with manager.node_slot(op, op.node):  # installs on one node, one at a time
            await run_attempts(op, manager, self.pulls, lambda: client.pull(op.model, revision, confirm))
        op.result = _summary(op.result)
        manager.say(op, "success")


class HFDeleteRunner:
    def __init__(self, agents: AgentAccess) -> None:
        self.agents = agents

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        client = self.agents.client(op.node)
        manager.begin(op, "deleting from the node's Hugging Face cache")
        async with manager.node_slot(op, op.node):
            removed = await client.delete(op.model)
        op.result = {"removed": removed}
        manager.say(op, "deleted" if removed else "was not installed")


class BySource:
    """One runner per operation kind, picked by ``params["source"]`` (Ollama when absent)."""

    def __init__(self, ollama, huggingface) -> None:
        self.runners = {"ollama": ollama, "huggingface": huggingface}

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        runner = self.runners.get(op.params.get("source", "ollama"))
        if runner is None:
            raise ProxyError(f"unknown source {op.params.get('source')!r}", status=400)
        await runner(op, manager)
