"""Node agents, as the proxy knows them: registration, heartbeats, and the link back to each agent.

An agent registers (``POST /admin/agents``) with its runtime's kind and URL,
its own URL, the token the proxy must send it, and what it measured. A node
of that name that does not exist yet is registered like ``POST /admin/nodes``
would, with the GPU memory the agent detected as its ``gpu_memory_gb``, so
``distribution.tiers`` places models on it without a hand-typed figure. A node
that exists (from the config file, or registered before) is linked to the
agent; its kind must match.

Every registration carries the GPU memory measured then, so a GPU swapped or
added shows at the agent's next start: a node's ``gpu_memory_gb`` follows it
(stored, for a registered node), and so do its tier models (an Ollama node is
sent the pulls of its new tier, as at its first registration). A node of the
config file with ``gpu_memory_gb`` written there keeps that figure: the file
is the operator's word.

The link (URL, token) is kept with a registered node's row, the token sealed
(:mod:`proxy.storage.sealed`), so it survives a restart; for a node of the
config file it lives in the change feed only, and the agent's next heartbeat
after a proxy restart is answered 404, which makes it register again. Every
registration and heartbeat is published (topic ``agent``, token sealed), so
every proxy process shows the same hardware, runtime and alerts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backends.agent import AgentClient
from ..config import _http_url
from ..errors import Conflict, InvalidRequest, NotFound
from ..storage.sealed import SealError
from ..store.base import AGENT, Change
from .distribution import tier_models

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger("llm_proxy.agents")

_SNAPSHOT_KEYS = ("hardware", "runtime", "alerts", "agent")


@dataclass
class Link:
    url: str
    sealed_token: str
    client: AgentClient
    snapshot: dict | None = None
    seen: float | None = None  # epoch of the last registration or heartbeat


def _snapshot(body: dict) -> dict:
    return {k: body.get(k) for k in _SNAPSHOT_KEYS if k in body}


class AgentLinks:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.parts = fleet.parts
        self.links: dict[str, Link] = {}

    def _client(self, name: str, url: str, token: str) -> AgentClient:
        timeouts = self.parts.config.timeouts
        return AgentClient(name, url, token, timeouts, pull_idle=self.parts.config.pulls.idle_timeout)

    async def _set(self, name: str, url: str, sealed: str) -> Link:
        old = self.links.get(name)
        if old is not None and (old.url, old.sealed_token) == (url, sealed):
            return old
        link = Link(url, sealed, self._client(name, url, self.parts.sealer.unseal(sealed)))
        if old is not None:
            link.snapshot, link.seen = old.snapshot, old.seen
            await old.client.aclose()
        self.links[name] = link
        return link

    async def load(self) -> None:
        for name, stored in (await self.fleet.registry.store.agents()).items():
            if name not in self.parts.catalog.backends:
                continue
            try:
                await self._set(name, stored["url"], stored["token"])
            except (KeyError, SealError) as exc:
                log.error("the agent link of node %s cannot be restored: %s", name, exc)

    async def close(self) -> None:
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.client.aclose() for link in links))

    async def prune(self) -> None:
        """Forget the links of nodes that are gone (removed here or by another process)."""
        for name in [n for n in self.links if n not in self.parts.catalog.backends]:
            await self.links.pop(name).client.aclose()

    # --- looking up -----------------------------------------------------------------------------

    def get(self, name: str) -> Link | None:
        return self.links.get(name)

    def client(self, name: str) -> AgentClient:
        self.fleet.registry.config_of(name)
        link = self.links.get(name)
        if link is None:
            raise Conflict(f"Node {name!r} has no agent (llm-proxy node); it cannot do this", param="nodes")
        return link.client

    # --- what agents send -----------------------------------------------------------------------

    async def register(self, body: dict) -> tuple[dict, list, bool]:
        """The node's view data, the operations its registration started, and whether it is new."""
        name, kind, url = body.get("name"), body.get("kind"), body.get("url")
        agent_url, token = body.get("agent_url"), body.get("token")
        if not isinstance(agent_url, str) or _http_url(agent_url):
            raise InvalidRequest("agent_url must be the agent's http:// URL", param="agent_url")
        if not isinstance(token, str) or len(token) < 16:
            raise InvalidRequest("token must be a string of at least 16 characters", param="token")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("name is required", param="name")
        gpu = body.get("gpu_memory_gb")
        if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, (int, float)) or gpu < 0):
            raise InvalidRequest("gpu_memory_gb must be a number of GB", param="gpu_memory_gb")
        sealed = self.parts.sealer.seal(token)
        created, ops = False, []
        stored = {"url": agent_url, "token": sealed}
        if name in self.parts.catalog.backends:
            config = self.fleet.registry.config_of(name)
            if config.kind != kind:
                raise Conflict(f"Node {name!r} exists as a {config.kind} node; the agent says {kind}", param="kind")
            if self.fleet.registry.source(name) == "registered":
                await self.fleet.registry.store.set_agent(name, stored)
            if gpu is not None:
                ops = await self._set_gpu(name, float(gpu))
        else:
            spec = {"name": name, "kind": kind, "url": url}
            if gpu is not None:
                spec["gpu_memory_gb"] = gpu
            _, ops = await self.fleet.register_node(spec, agent=stored)
            created = True
        link = await self._set(name, agent_url, sealed)
        link.snapshot, link.seen = _snapshot(body), time.time()
        await self.fleet.store.publish(AGENT, name, {**stored, "snapshot": link.snapshot, "seen": link.seen,
                                                     "gpu_memory_gb": self.fleet.registry.config_of(name).gpu_memory_gb})  # fmt: skip
        log.info("agent of node %s %s at %s", name, "registered" if created else "linked", agent_url)
        return link.snapshot, ops, created

    def _file_gpu(self, name: str) -> float | None:
        return next((b.gpu_memory_gb for b in self.parts.config.backends if b.name == name), None)

    def _apply_gpu(self, name: str, gpu: float | None) -> bool:
        """The node's config with ``gpu`` as its GPU memory, in this process; True if that changed it."""
        backend = self.parts.catalog.backends.get(name)
        if backend is None or gpu is None or backend.config.gpu_memory_gb == gpu or self._file_gpu(name) is not None:
            return False
        old = backend.config.gpu_memory_gb
        backend.config = dataclasses.replace(backend.config, gpu_memory_gb=gpu)
        log.info("node %s: gpu_memory_gb %s -> %g, as its agent measured", name, old, gpu)
        return True

    async def _set_gpu(self, name: str, gpu: float) -> list:
        old = self.fleet.registry.config_of(name).gpu_memory_gb
        if not self._apply_gpu(name, gpu):
            return []
        if self.fleet.registry.source(name) == "registered":
            await self.fleet.registry.store.set_gpu_memory(name, gpu)
        config = self.fleet.registry.config_of(name)
        if config.kind != "ollama":
            return []
        tiers = self.parts.config.distribution.tiers
        had = set(tier_models(tiers, old))
        return [self.fleet.submit_pull(name, model, scheduled=True)
                for model in tier_models(tiers, gpu) if model not in had]  # fmt: skip

    async def heartbeat(self, name: str, body: dict) -> None:
        link = self.links.get(name)
        if link is None or name not in self.parts.catalog.backends:
            raise NotFound(f"No agent registered for node {name!r}; register first (POST /admin/agents)",
                           param="name")  # fmt: skip
        link.snapshot, link.seen = _snapshot(body), time.time()
        await self.fleet.store.publish(AGENT, name, {"snapshot": link.snapshot, "seen": link.seen})
        # An agent registers as it starts its runtime, so the first probe usually finds nothing yet: once the
        # agent says the runtime runs, look again now rather than at the next health round.
        runtime = link.snapshot.get("runtime") or {}
        if runtime.get("state") == "running" and self.parts.catalog.views[name].reachable is not True:
            self.fleet.spawn(self.parts.catalog.refresh_if_stale())

    async def apply(self, change: Change) -> None:
        """Another process heard from an agent."""
        data = change.data or {}
        if change.key not in self.parts.catalog.backends:
            return
        link = self.links.get(change.key)
        if "token" in data:
            try:
                link = await self._set(change.key, data["url"], data["token"])
            except SealError as exc:
                log.error("agent link of %s from another process cannot be opened: %s", change.key, exc)
                return
        if link is not None:
            link.snapshot, link.seen = data.get("snapshot", link.snapshot), data.get("seen", link.seen)
        self._apply_gpu(change.key, data.get("gpu_memory_gb"))

    # --- what the node view shows ---------------------------------------------------------------

    async def live(self, name: str) -> dict:
        """``agent``, ``hardware``, ``runtime``, ``alerts`` (and when it was last heard from) for GET /admin/nodes."""
        link = self.links.get(name)
        if link is None:
            return {"agent": False, "hardware": None, "runtime": None, "alerts": []}
        error = None
        # One connect timeout in all, connecting included: GET /admin/nodes asks every agent at once,
        # so a dead or hung agent costs the list that long and no more.
        bound = self.parts.config.timeouts.connect
        try:
            async with asyncio.timeout(bound):
                status = await link.client.status(timeout=bound * 2)  # the outer bound is the one that counts
            link.snapshot = _snapshot(status)
            link.seen = time.time()
        except TimeoutError:
            error = f"the agent at {link.url} did not answer within {bound:g}s"
        except Exception as exc:  # the agent is down: show what it said last, and why this is old
            error = f"the agent at {link.url}: {getattr(exc, 'message', None) or type(exc).__name__}"
        snap = link.snapshot or {}
        return {"agent": True, "hardware": snap.get("hardware"), "runtime": snap.get("runtime"),
                "alerts": snap.get("alerts") or [], "agent_url": link.url, "agent_error": error,
                "agent_seen": link.seen}  # fmt: skip
