"""The admin side of the proxy, wired together: nodes, operations, alias overrides, sync and activation.

Built from the narrow parts it needs (:class:`FleetParts`: the config, the
catalog, the resolver, the node table, the fleet store and its feed, the
history, the sealer), not from the whole set of services, so nothing here can
reach into the request path's objects. Kept as ``services.fleet``, started before the first
health round (so registered nodes are probed with the others, and activated
aliases are in place before the first request), and closed first at shutdown
(running operations end as ``interrupted`` while the history can still record
it). The admin handlers call the methods here; each checks what it is asked and
raises a 4xx ProxyError before anything starts.

The state is shared with the other proxy processes through the fleet store
(``parts.store``): this process's changes are written there, theirs arrive
through the change feed (``parts.feed``), whose handlers are wired here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.ollama import normalize
from ..catalog import Catalog
from ..config import BackendConfig, Config
from ..errors import Conflict, InvalidRequest, StoreUnavailable
from ..node_table import NodeTable
from ..resolve import Resolver
from ..storage.sealed import Sealer
from ..store import ChangeFeed, FleetStore
from ..store.base import AGENT, ALIAS, CANCEL, DRAIN, NODES, OPERATION, Change
from .activate import Activator
from .agents import AgentLinks
from .aliases import AliasOverrides
from .audit import Audit
from .distribution import auto_nodes, plan_sync, tier_models
from .hf_pulls import SOURCES, BySource, HFDeleteRunner, HFPullRunner, check_plan
from .manager import OperationManager
from .model import Operation
from .node_store import NodeStore
from .pulls import DeleteRunner, PullRunner
from .registry import NodeRegistry
from .schedule import CHECK_INTERVAL, Scheduler
from .store import OperationStore
from .sync import SyncNode, SyncRunner, collect

log = logging.getLogger("llm_proxy.fleet")

_DELETE_WAIT = 30.0  # seconds a DELETE /admin/models request waits for its deletions
_EXPIRE_INTERVAL = 2.0  # seconds between looks for operations whose runner is gone


@dataclass
class FleetParts:
    """What the admin side works with, and nothing more."""

    config: Config
    catalog: Catalog
    resolver: Resolver
    nodes: NodeTable
    store: FleetStore
    feed: ChangeFeed
    history: Any = None  # proxy.history.History; None: admin actions are not recorded
    sealer: Sealer | None = None
    bus: Any = None  # proxy.store.Bus: operation progress to the other replicas at once; None without one


class Fleet:
    def __init__(self, parts: FleetParts) -> None:
        self.parts = parts
        config = parts.config
        self.store, self.feed = parts.store, parts.feed
        self.audit = Audit(parts.history)
        self.registry = NodeRegistry(parts, NodeStore(self.store, parts.sealer))
        self.aliases = AliasOverrides(self.store, parts.resolver)
        self.manager = OperationManager(config.pulls, OperationStore(self.store), self.audit, bus=parts.bus)
        self.activator = Activator(self)
        self.agents = AgentLinks(self)
        self.manager.register("pull", self._after(BySource(PullRunner(self.registry, config.pulls),
                                                           HFPullRunner(self.agents, config.pulls))))  # fmt: skip
        self.manager.register("delete", self._after(BySource(DeleteRunner(self.registry),
                                                             HFDeleteRunner(self.agents))))  # fmt: skip
        self.manager.register("activate", self.activator)
        self.manager.register("sync", SyncRunner(self.sync_nodes, config.distribution.manifest_path))
        self._background: set[asyncio.Task] = set()
        self.scheduler = None
        if config.distribution.schedule:
            self.scheduler = Scheduler(config.distribution.schedule, self.store, self._scheduled_sync)
            self.feed.every(CHECK_INTERVAL, self.scheduler.tick)
        self.feed.on(NODES, self._theirs(self._nodes_changed))
        self.feed.on(DRAIN, self._theirs(self.registry.apply_drain))
        self.feed.on(ALIAS, self._theirs(self._alias_changed))
        self.feed.on(AGENT, self._theirs(self.agents.apply))
        self.feed.on(OPERATION, self.manager.apply_change)
        self.feed.on(CANCEL, self.manager.apply_cancel)
        self.feed.every(_EXPIRE_INTERVAL, self.manager.expire)

    def _theirs(self, handler):
        """Only changes made by another process: this one applied its own when it made them."""
        return lambda change: None if change.origin == self.store.instance else handler(change)

    async def _nodes_changed(self, change: Change) -> None:
        added = await self.registry.reload(change)
        await self.agents.prune()
        if added:
            await self.agents.load()
            self.spawn(self.parts.catalog.refresh())  # what the new node serves, before anyone asks

    async def _alias_changed(self, change: Change) -> None:
        if await self.aliases.apply():
            # The new target may have been pulled a moment ago, by another process.
            self.spawn(self.parts.catalog.refresh_if_stale())

    async def start(self) -> None:
        await self.feed.begin()  # first: a change made while we load is applied again, never missed
        await self.registry.load()
        await self.agents.load()
        await self.aliases.apply()
        await self.manager.start()

    async def catch_up(self) -> None:
        """Apply what other processes changed and this one has not read yet (before an admin read)."""
        try:
            await self.feed.poll()
        except StoreUnavailable:
            pass  # a read answers from what this process holds; a write fails on its own, with a 503

    async def settle(self) -> None:
        """Write this process's pending operation changes, so other processes see them (before a 202)."""
        await self.manager.flush()

    async def _scheduled_sync(self) -> None:
        async def run() -> None:
            try:
                answer = await self.sync(dry_run=False, skip_existing=False, no_download=False, manifest_path=None)
                log.info("scheduled sync: %d planned pull(s), operation %s", len(answer["operations"]),
                         answer["operation"]["id"])  # fmt: skip
            except Exception:
                log.exception("the scheduled sync failed")

        self.spawn(run())  # in the background: collecting what nodes hold must not hold up the feed

    async def close(self) -> None:
        try:
            await self.manager.close()
        except Exception:  # a failed last write must not stop the rest of the shutdown
            log.exception("could not store the final state of the operations")
        for task in list(self._background):
            task.cancel()
        await self.agents.close()
        await self.registry.close()

    def _after(self, runner):
        """A pull or delete changes what a node serves: refresh the catalog so routing knows at once."""

        async def run(op: Operation, manager: OperationManager) -> None:
            await runner(op, manager)
            self.spawn(self.parts.catalog.refresh())

        return run

    def spawn(self, coro) -> None:
        """Run ``coro`` in the background, kept referenced until it ends and cancelled on close."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- nodes ----------------------------------------------------------------------------------

    def ollama_nodes(self) -> dict[str, float | None]:
        """Ollama node name -> gpu_memory_gb."""
        return {n: b.config.gpu_memory_gb for n, b in self.parts.catalog.backends.items()
                if b.config.kind == "ollama"}  # fmt: skip

    async def register_node(self, spec: dict, agent: dict | None = None) -> tuple[BackendConfig, list[Operation]]:
        config = await self.registry.register(spec, agent)
        self.spawn(self.parts.catalog.refresh())
        ops = []
        if config.kind == "ollama":
            # Automatic distribution: the node's tier models, as scheduled pulls (inside pulls.window).
            for model in tier_models(self.parts.config.distribution.tiers, config.gpu_memory_gb):
                ops.append(self.submit_pull(config.name, model, scheduled=True))
        self.audit.action("register_node", node=config.name, http_status=201)
        return config, ops

    async def remove_node(self, name: str, *, timeout: float | None, force: bool) -> dict:
        self.registry.config_of(name)
        if self.registry.source(name) == "registered":
            for op in self.manager.list(node=name, limit=10_000):
                if op.active:
                    await self.manager.cancel(op.id)
        outcome = await self.registry.remove(name, timeout=timeout, force=force)
        await self.agents.prune()
        self.audit.action("remove_node", node=name)
        return outcome

    async def drain_node(self, name: str, draining: bool) -> None:
        await self.registry.set_drain(name, draining)
        self.audit.action("drain" if draining else "resume", node=name)

    # --- pulls and deletes ----------------------------------------------------------------------

    def submit_pull(self, node: str, model: str, *, force: bool = False, scheduled: bool = False) -> Operation:
        """Start a pull, or hand back the one already running for this node and model."""
        self.registry.ollama(node)  # 404 / 409 before anything is queued
        running = self.manager.active("pull", node=node, model=model)
        if running is not None:
            return running
        params = {"force": force, "scheduled": scheduled}
        return self.manager.submit(Operation("pull", model, node, params))

    def pull_targets(self, model: str, nodes) -> list[str]:
        ollama = self.ollama_nodes()
        if nodes == "all":
            targets = list(ollama)
        elif nodes == "auto":
            targets = auto_nodes(self.parts.config.distribution.tiers, ollama, model)
            if not targets:
                raise Conflict(f"No node's tier lists {model!r} (distribution.tiers), so \"auto\" picks no node; "
                               "name the nodes instead", param="nodes")  # fmt: skip
        elif isinstance(nodes, list) and nodes and all(isinstance(n, str) for n in nodes):
            targets = list(dict.fromkeys(nodes))
            for name in targets:
                self.registry.ollama(name)
        else:
            raise InvalidRequest('nodes must be a non-empty list of node names, "all" or "auto"', param="nodes")
        if not targets:
            raise Conflict("There is no Ollama node to pull onto", param="nodes")
        return targets

    def pull(self, model: str, nodes, *, force: bool = False) -> list[Operation]:
        return [self.submit_pull(n, model, force=force) for n in self.pull_targets(model, nodes)]

    def hf_nodes(self) -> list[str]:
        """vLLM nodes with an agent: those that can hold Hugging Face models."""
        return [n for n, b in self.parts.catalog.backends.items()
                if b.config.kind == "vllm" and self.agents.get(n) is not None]  # fmt: skip

    def _hf_targets(self, nodes) -> list[str]:
        if nodes == "all":
            targets = self.hf_nodes()
            if not targets:
                raise Conflict("There is no vLLM node with an agent (llm-proxy node) to download onto", param="nodes")
            return targets
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
            raise InvalidRequest('nodes must be a non-empty list of node names or "all"', param="nodes")
        targets = list(dict.fromkeys(nodes))
        for name in targets:
            self.agents.client(name)
            if self.registry.config_of(name).kind != "vllm":
                raise Conflict(f"Node {name!r} runs {self.registry.config_of(name).kind}; Hugging Face models are "
                               "for vLLM nodes", param="nodes")  # fmt: skip
        return targets

    async def pull_hf(self, model: str, nodes, *, revision: str = "main", confirm: bool = False,
                      force: bool = False) -> list[Operation]:  # fmt: skip
        """Hugging Face pulls through the nodes' agents; each node's disk limits checked before any starts."""
        if not isinstance(model, str) or model.count("/") != 1 or not all(model.split("/")):
            raise InvalidRequest("a Hugging Face model is a repository id, org/name", param="model")
        if not isinstance(revision, str) or not revision:
            raise InvalidRequest("revision must be a branch, tag or commit", param="revision")
        targets = self._hf_targets(nodes)
        ops = []
        for name in targets:
            running = self.manager.active("pull", node=name, model=model)
            if running is not None:
                ops.append(running)
                continue
            await check_plan(self.agents.client(name), model, revision, confirm)
        for name in targets:
            if any(op.node == name for op in ops):
                continue
            params = {"source": "huggingface", "revision": revision, "confirm": confirm, "force": force}
            ops.append(self.manager.submit(Operation("pull", model, name, params)))
        return ops

    async def delete_model(
        self, model: str, nodes, *, force: bool = False, source: str | None = None
    ) -> list[Operation]:
        if source is not None and source not in SOURCES:
            raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}", param="source")
        if source == "huggingface":
            return await self._delete_hf(model, nodes, force=force)
        targets = list(self.ollama_nodes()) if nodes == "all" else nodes
        if not isinstance(targets, list) or not targets or not all(isinstance(n, str) for n in targets):
            raise InvalidRequest('nodes must be a non-empty list of node names or "all"', param="nodes")
        for name in targets:
            self.registry.ollama(name)
        self._refuse_delete(model, targets, None if force else self._aliases_using(model, targets))
        ops = [self.manager.submit(Operation("delete", model, name)) for name in targets]
        for op in ops:
            await self.manager.wait(op.id, timeout=_DELETE_WAIT)
        return ops

    def _refuse_delete(self, model: str, targets, in_use: list[str] | None) -> None:
        """A delete waits for no pull of the model and, unless forced (``in_use`` None), for no alias on it."""
        for name in targets:
            pulling = self.manager.active("pull", node=name, model=model)
            if pulling is not None:
                raise Conflict(f"{model} is being pulled on {name} (operation {pulling.id}); cancel that first",
                               param="nodes")  # fmt: skip
        if in_use:
            raise Conflict(f"{model} is what {'; '.join(in_use)} point(s) to; activate another model first, "
                           'or send "force": true', param="model")  # fmt: skip

    async def _delete_hf(self, model: str, nodes, *, force: bool) -> list[Operation]:
        targets = self._hf_targets(nodes)
        self._refuse_delete(model, targets, None if force else self._aliases_serving(model, targets))
        ops = [self.manager.submit(Operation("delete", model, n, {"source": "huggingface"})) for n in targets]
        for op in ops:
            await self.manager.wait(op.id, timeout=_DELETE_WAIT)
        return ops

    def _aliases_serving(self, repo: str, nodes: list[str]) -> list[str]:
        """Aliases whose target a node serves from ``repo`` (vLLM lists it as the served model's root)."""
        out = []
        catalog = self.parts.catalog
        for alias in self.parts.resolver.alias_models():
            on = []
            for node in nodes:
                if alias.backends and node not in alias.backends:
                    continue
                served = catalog.served_name(node, alias.target)
                models = {m.name: m for m in catalog.views[node].models}
                root = models[served].details.get("root") if served in models else None
                if alias.target == repo or root == repo:
                    on.append(node)
            if on:
                out.append(f"alias {alias.name} on {', '.join(on)}")
        return out

    def _aliases_using(self, model: str, nodes: list[str]) -> list[str]:
        out = []
        for alias in self.parts.resolver.alias_models():
            if normalize(alias.target) != normalize(model):
                continue
            on = [n for n in nodes if not alias.backends or n in alias.backends]
            if on:
                out.append(f"alias {alias.name} on {', '.join(on)}")
        return out

    # --- sync -----------------------------------------------------------------------------------

    def sync_nodes(self) -> list[SyncNode]:
        nodes = []
        for name, backend in self.parts.catalog.backends.items():
            config = backend.config
            admin = self.registry.ollama(name) if config.kind == "ollama" else None
            nodes.append(SyncNode(name, config.kind, config.url, config.gpu_memory_gb, admin, backend))
        return nodes

    def _manifest_path(self, requested: str) -> str:
        """A manifest path from a request: a .json file next to distribution.manifest_path, nowhere else.

        An admin key must not let its holder overwrite any file the proxy can write
        (its database lives in the same state directory)."""
        # abspath and normpath, not resolve(): pure string work, no disk access on the event loop.
        configured = Path(
            os.path.normpath(os.path.abspath(os.path.expanduser(self.parts.config.distribution.manifest_path)))
        )
        path = Path(os.path.expanduser(requested))
        path = Path(os.path.normpath(configured.parent / path if not path.is_absolute() else path))
        if path.parent != configured.parent or path.suffix != ".json":
            raise InvalidRequest(f"manifest_path must be a .json file in {configured.parent} (the directory of "
                                 "distribution.manifest_path)", param="manifest_path")  # fmt: skip
        return str(path)

    async def sync(self, *, dry_run: bool, skip_existing: bool, no_download: bool,
                   manifest_path: str | None) -> dict:  # fmt: skip
        states = await collect(self.sync_nodes())
        plan = plan_sync(self.parts.config.distribution, states, skip_existing=skip_existing)
        answer = {"dry_run": dry_run, "plan": [p.as_dict() for p in plan],
                  "nodes": [{"node": s.name, "kind": s.kind, "reachable": s.reachable, "error": s.error,
                             "installed": sorted(m["model"] for m in s.models)} for s in states]}  # fmt: skip
        if dry_run:
            return answer
        children = []
        if not no_download:
            for item in plan:
                if item.action in ("pull", "update"):
                    children.append(self.submit_pull(item.node, item.model, force=item.action == "update",
                                                     scheduled=True).id)  # fmt: skip
        params = {"children": children, "skip_existing": skip_existing, "no_download": no_download}
        if manifest_path:
            params["manifest_path"] = self._manifest_path(manifest_path)
        op = self.manager.submit(Operation("sync", "*", None, params))
        answer.update(operation=op.as_dict(), operations=children)
        return answer
