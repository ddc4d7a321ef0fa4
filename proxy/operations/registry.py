"""The nodes: those of the config file, and those registered at run time (``POST /admin/nodes``).

Registered nodes are stored in SQLite (table ``nodes``) and added again at
start-up, before the first health round. A node of the config file can be
drained but not removed here: the file would bring it back at the next start,
so removing it is refused (409) with that explanation.

Removing a registered node drains it first (``BackendHealth.draining``: the
router sends it nothing new), waits up to its ``drain_timeout`` for the
requests in flight to finish, cancels its operations, then takes it out of the
catalog and closes its connections. If requests are still running when the
wait ends, removal is refused (409) unless forced, and the node stays drained.

``activate_command`` cannot be given at registration: it runs a program on the
proxy's host, which only whoever controls the config file may decide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import orjson

from ..backends.ollama_admin import OllamaAdmin
from ..config import BackendConfig, ConfigError, parse_config
from ..errors import Conflict, InvalidRequest, NotFound
from ..storage import Database

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("llm_proxy.nodes")

_REFUSED_AT_REGISTRATION = {"activate_command": "it runs a program on the proxy's host; set it in the config file"}


def _no_env(value):
    """Registration data is not config text: ``$`` is literal, and the proxy's environment stays private."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, list):
        return [_no_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _no_env(v) for k, v in value.items()}
    return value


def parse_node(spec: dict) -> BackendConfig:
    """A node description checked like a ``backends:`` entry of the config file (400 listing every problem)."""
    for key, why in _REFUSED_AT_REGISTRATION.items():
        if key in spec:
            raise InvalidRequest(f"{key} cannot be set at registration: {why}", param=key)
    try:
        config = parse_config({"backends": [_no_env(spec)]}, env={}, source="node")
    except ConfigError as exc:
        problems = [p.removeprefix("backends[0].") for p in exc.problems]
        raise InvalidRequest("Invalid node: " + "; ".join(problems), param=problems[0].split(":")[0]) from None
    return config.backends[0]


def _spec(config: BackendConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}


class NodeRegistry:
    def __init__(self, services: Services, db: Database) -> None:
        self.services = services
        self.db = db
        self.config_names = {b.name for b in services.config.backends}
        self._admins: dict[str, OllamaAdmin] = {}
        self._closing: set[asyncio.Task] = set()  # adapters of removed nodes, closed once their requests end

    async def load(self) -> None:
        for name, spec in await self.db.fetchall("SELECT name, spec FROM nodes ORDER BY created_at"):
            if name in self.services.catalog.backends:
                log.warning("registered node %s is now also in the config file; the config's entry wins", name)
                continue
            try:
                config = parse_config({"backends": [orjson.loads(spec)]}, env={}, source=f"nodes.{name}").backends[0]
            except (ConfigError, orjson.JSONDecodeError) as exc:
                log.error("registered node %s cannot be restored: %s", name, exc)
                continue
            self.services.add_backend(config)
            log.info("registered node %s (%s, %s) restored", name, config.kind, config.url)

    async def close(self) -> None:
        admins, self._admins = list(self._admins.values()), {}
        await asyncio.gather(*(a.aclose() for a in admins))
        for task in list(self._closing):
            task.cancel()

    # --- looking up -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.services.catalog.backends)

    def config_of(self, name: str) -> BackendConfig:
        backend = self.services.catalog.backends.get(name)
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
            timeouts = self.services.config.timeouts_for(config)
            admin = self._admins[name] = OllamaAdmin(
                config, timeouts, pull_idle=self.services.config.pulls.idle_timeout
            )
        return admin

    # --- changing -------------------------------------------------------------------------------

    async def register(self, spec: dict) -> BackendConfig:
        config = parse_node(spec)
        if config.name in self.services.catalog.backends:
            raise Conflict(f"A node called {config.name!r} exists already", param="name")
        await self.db.execute(
            "INSERT INTO nodes (name, kind, url, spec, created_at) VALUES (?, ?, ?, ?, ?)",
            (config.name, config.kind, config.url, orjson.dumps(_spec(config)).decode(), time.time()),
        )
        self.services.add_backend(config)
        log.info("node %s registered (%s, %s)", config.name, config.kind, config.url)
        return config

    def drain(self, name: str, draining: bool = True) -> None:
        self.config_of(name)
        self.services.catalog.health[name].draining = draining
        log.info("node %s %s", name, "drained: no new requests" if draining else "takes requests again")

    async def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the node's requests in flight to finish; True if they did."""
        health = self.services.catalog.health[name]
        deadline = time.monotonic() + timeout
        while health.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return health.in_flight <= 0

    async def remove(self, name: str, *, timeout: float | None = None, force: bool = False) -> dict:
        config = self.config_of(name)
        if self.source(name) == "config":
            raise Conflict(f"Node {name!r} is defined in the config file: remove it there and restart the proxy "
                           f"(until then it can be drained: POST /admin/nodes/{name}/drain)", param="name")  # fmt: skip
        self.drain(name)
        health = self.services.catalog.health[name]
        wait = config.drain_timeout if timeout is None else timeout
        idle = await self.wait_idle(name, wait)
        if not idle and not force:
            raise Conflict(f"Node {name!r} still has {health.in_flight} request(s) in flight after {wait:g}s; it stays "
                           "drained. Try again later, or add ?force=true to remove it anyway", param="name")  # fmt: skip
        left = health.in_flight
        catalog = self.services.catalog
        backend = catalog.backends[name]
        catalog.remove(name)
        self.services.slots.pop(name, None)
        await self.db.execute("DELETE FROM nodes WHERE name = ?", (name,))
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
        log.info("node %s removed", name)
        return {"removed": name, "in_flight_left": left}

    @staticmethod
    async def _close_later(backend, health, limit: float = 600.0) -> None:
        deadline = time.monotonic() + limit
        while health.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await backend.aclose()
