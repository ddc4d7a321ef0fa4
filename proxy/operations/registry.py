"""The nodes: those of the config file, and those registered at run time (``POST /admin/nodes``).

Registered nodes are stored by :class:`.node_store.NodeStore` (keys sealed) and added again at
start-up, before the first health round. A node of the config file can be
drained but not removed here: the file would bring it back at the next start,
so removing it is refused (409) with that explanation.

Removing a registered node drains it first (``BackendHealth.draining``: the
router sends it nothing new), waits up to its ``drain_timeout`` for the
requests in flight to finish, cancels its operations, then takes it out of the
catalog and closes its connections. If requests are still running when the
wait ends, removal is refused (409) unless forced, and the node stays drained.

Every proxy process holds every node: a registration, a removal or a drain is
written to the fleet store and applied here, then in the other processes when
their change feed brings it (:meth:`NodeRegistry.reload`, :meth:`apply_drain`).
Drains are stored, so a drained node stays drained after a restart.

``activate_command`` cannot be given at registration: it runs a program on the
proxy's host, which only whoever controls the config file may decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..backends.ollama_admin import OllamaAdmin
from ..config import BackendConfig
from ..errors import Conflict, NotFound
from ..store.base import Change
from .node_store import NodeStore

if TYPE_CHECKING:
    from .fleet import FleetParts

log = logging.getLogger("llm_proxy.nodes")


class NodeRegistry:
    def __init__(self, parts: FleetParts, store: NodeStore) -> None:
        self.parts = parts
        self.store = store
        self.config_names = {b.name for b in parts.config.backends}
        self._admins: dict[str, OllamaAdmin] = {}
        self._closing: set[asyncio.Task] = set()  # adapters of removed nodes, closed once their requests end

    async def load(self) -> None:
        await self.reload(initial=True)
        for name in await self.store.store.drained():
            if name in self.parts.catalog.health:
                self.drain(name)

    async def reload(self, change: Change | None = None, *, initial: bool = False) -> list[str]:
        """Bring the registered nodes in line with the store: add the new ones, drop the removed ones.
        Returns the names added."""
        stored = await self.store.load()
        added = []
        names = {c.name for c in stored}
        for config in stored:
            if config.name in self.parts.catalog.backends:
                if initial:
                    log.warning("registered node %s is now also in the config file; the config's entry wins",
                                config.name)  # fmt: skip
                continue
            self.parts.nodes.add(config)
            added.append(config.name)
            log.info("registered node %s (%s, %s) %s", config.name, config.kind, config.url,
                     "restored" if initial else "added by another proxy process")  # fmt: skip
        for name in [n for n in self.names() if self.source(n) == "registered" and n not in names]:
            await self._drop(name)
            log.info("node %s removed by another proxy process", name)
        return added

    def apply_drain(self, change: Change) -> None:
        if change.key in self.parts.catalog.health and change.data is not None:
            self.drain(change.key, bool(change.data.get("draining")))

    async def close(self) -> None:
        admins, self._admins = list(self._admins.values()), {}
        await asyncio.gather(*(a.aclose() for a in admins))
        for task in list(self._closing):
            task.cancel()

    # --- looking up -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.parts.catalog.backends)

    def config_of(self, name: str) -> BackendConfig:
        backend = self.parts.catalog.backends.get(name)
        if backend is None:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"No node called {name!r} (nodes: {known})", param="node")
        return backend.config

    def source(self, name: str) -> str:
        return "config" if name in self.config_names else "registered"

    def ollama(self, name: str) -> OllamaAdmin:
        """The admin client of an Ollama node (created on first use)."""
        config = self.config_of(name)
        if config.kind != "ollama":
            raise Conflict(f"Node {name!r} runs {config.kind}, which serves one model and cannot pull or delete "
                           "models; switch its model with POST /admin/models/activate", param="nodes")  # fmt: skip
        admin = self._admins.get(name)
        if admin is None:
            timeouts = self.parts.config.timeouts_for(config)
            admin = self._admins[name] = OllamaAdmin(config, timeouts, pull_idle=self.parts.config.pulls.idle_timeout)
        return admin

    # --- changing -------------------------------------------------------------------------------

    async def register(self, spec: dict, agent: dict | None = None) -> BackendConfig:
        config, kept_key = self.store.parse(spec)
        if config.name in self.parts.catalog.backends:
            raise Conflict(f"A node called {config.name!r} exists already", param="name")
        await self.store.add(config, kept_key, agent)
        self.parts.nodes.add(config)
        log.info("node %s registered (%s, %s)", config.name, config.kind, config.url)
        return config

    def drain(self, name: str, draining: bool = True) -> None:
        """In this process only (an activation's short drain); :meth:`set_drain` is for the whole fleet."""
        self.config_of(name)
        health = self.parts.catalog.health[name]
        if health.draining != draining:
            health.draining = draining
            log.info("node %s %s", name, "drained: no new requests" if draining else "takes requests again")

    async def set_drain(self, name: str, draining: bool) -> None:
        """Drain or resume in every process, and after restarts."""
        self.config_of(name)
        await self.store.store.set_drain(name, draining)
        self.drain(name, draining)

    async def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the node's requests in flight to finish; True if they did."""
        health = self.parts.catalog.health[name]
        deadline = time.monotonic() + timeout
        while health.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return health.in_flight <= 0

    async def remove(self, name: str, *, timeout: float | None = None, force: bool = False) -> dict:
        config = self.config_of(name)
        if self.source(name) == "config":
            raise Conflict(f"Node {name!r} is defined in the config file: remove it there and restart the proxy "
                           f"(until then it can be drained: POST /admin/nodes/{name}/drain)", param="name")  # fmt: skip
        await self.set_drain(name, True)
        health = self.parts.catalog.health[name]
        wait = config.drain_timeout if timeout is None else timeout
        idle = await self.wait_idle(name, wait)
        if not idle and not force:
            raise Conflict(f"Node {name!r} still has {health.in_flight} request(s) in flight after {wait:g}s; it stays "
                           "drained. Try again later, or add ?force=true to remove it anyway", param="name")  # fmt: skip
        await self.store.remove(name)  # first: a node whose row could not be deleted would come back
        left = await self._drop(name)
        log.info("node %s removed", name)
        return {"removed": name, "in_flight_left": left}

    async def _drop(self, name: str) -> int:
        """Out of routing and the catalog here; its adapter closes once its requests end. Returns those left."""
        health = self.parts.catalog.health[name]
        health.draining = True
        left = health.in_flight
        backend = self.parts.catalog.backends[name]
        self.parts.nodes.remove(name)
        admin = self._admins.pop(name, None)
        if admin is not None:
            await admin.aclose()
        if left:
            # Requests still running hold the adapter; close its connections once they are done.
            task = asyncio.get_running_loop().create_task(self._close_later(backend, health))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            await backend.aclose()
        return left

    @staticmethod
    async def _close_later(backend, health, limit: float = 600.0) -> None:
        deadline = time.monotonic() + limit
        while health.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await backend.aclose()
