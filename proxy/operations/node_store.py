"""Nodes registered at run time, as the fleet store keeps them: the one place that reads and writes them.

A registration is checked like a ``backends:`` entry of the config file. Its
text is literal (``$`` means ``$``: registration data is not config text, and
the proxy's environment is not the caller's to read), with one exception made
for secrets: an ``api_key`` that is exactly ``${LLM_PROXY_...}`` names an
environment variable of the proxy, resolved now and at every start, so the key
itself never travels through the admin API or into the database. Any other
``api_key`` is stored sealed (:mod:`proxy.storage.sealed`), never in the clear.

What is stored is what is restored: a node comes back after a restart exactly
as it was registered, or the log says why it could not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

import orjson

from ..config import BackendConfig, ConfigError, parse_config
from ..errors import Conflict, InvalidRequest
from ..storage.sealed import Sealer, SealError
from ..store.base import FleetStore

log = logging.getLogger("llm_proxy.nodes")

_REFUSED_AT_REGISTRATION = {"activate_command": "it runs a program on the proxy's host; set it in the config file"}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENV_PREFIX = "LLM_PROXY_"


def _literal(value):
    """Registration text with every ``$`` literal, for the config parser (which expands ``${...}``)."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


def _parse(spec: dict, source: str) -> BackendConfig:
    try:
        return parse_config({"backends": [_literal(spec)]}, env={}, source=source).backends[0]
    except ConfigError as exc:
        problems = [p.removeprefix("backends[0].") for p in exc.problems]
        raise InvalidRequest("Invalid node: " + "; ".join(problems), param=problems[0].split(":")[0]) from None


class NodeStore:
    def __init__(self, store: FleetStore, sealer: Sealer, env: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.sealer = sealer
        self.env = os.environ if env is None else env

    # --- registration ---------------------------------------------------------------------------

    def parse(self, spec: dict) -> tuple[BackendConfig, dict]:
        """The node a registration describes, and the form its key is kept in (400 listing every problem)."""
        if not isinstance(spec, dict):
            raise InvalidRequest("A node is a JSON object")
        for key, why in _REFUSED_AT_REGISTRATION.items():
            if key in spec:
                raise InvalidRequest(f"{key} cannot be set at registration: {why}", param=key)
        spec = dict(spec)
        raw_key = spec.get("api_key")
        kept: dict = {}
        if isinstance(raw_key, str) and (ref := _ENV_REFERENCE.fullmatch(raw_key)):
            name = ref.group(1)
            if not name.startswith(ENV_PREFIX):
                raise InvalidRequest(f"api_key may name an environment variable only if its name starts with "
                                     f"{ENV_PREFIX} (got {name}); send the key itself to have it stored encrypted",
                                     param="api_key")  # fmt: skip
            if name not in self.env:
                raise InvalidRequest(f"api_key names the environment variable {name}, which is not set in the "
                                     "proxy's environment", param="api_key")  # fmt: skip
            spec["api_key"] = self.env[name]
            kept = {"env": name}
        config = _parse(spec, "node")
        if config.api_key and not kept:
            kept = {"sealed": self.sealer.seal(config.api_key)}
        return config, kept

    async def add(self, config: BackendConfig, kept_key: dict, agent: dict | None = None) -> None:
        spec = {k: v for k, v in dataclasses.asdict(config).items() if v is not None and k != "api_key"}
        if kept_key:
            spec["api_key"] = kept_key
        if agent:
            spec["agent"] = agent  # {url, token: sealed}: how to reach the node's agent (proxy/operations/agents.py)
        if not await self.store.add_node(config.name, config.kind, config.url, orjson.dumps(spec).decode()):
            raise Conflict(f"A node called {config.name!r} exists already", param="name")

    async def remove(self, name: str) -> None:
        await self.store.remove_node(name)

    # --- restoring ------------------------------------------------------------------------------

    async def load(self) -> list[BackendConfig]:
        """Every stored node, oldest first; one that cannot be restored is logged and left out."""
        out = []
        for name, raw in await self.store.node_rows():
            try:
                out.append(await self._restore(name, raw))
            except (InvalidRequest, SealError, orjson.JSONDecodeError, TypeError) as exc:
                log.error("registered node %s cannot be restored: %s", name, getattr(exc, "message", exc))
        return out

    async def agents(self) -> dict[str, dict]:
        """Node name -> its agent link as stored ({url, token: sealed}), for the nodes that have one."""
        out = {}
        for name, raw in await self.store.node_rows():
            try:
                agent = orjson.loads(raw).get("agent")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(agent, dict):
                out[name] = agent
        return out

    async def set_agent(self, name: str, agent: dict) -> bool:
        """Store a registered node's new agent link (an agent restarted with a new token); False if no such row."""
        for row_name, raw in await self.store.node_rows():
            if row_name == name:
                spec = orjson.loads(raw)
                spec["agent"] = agent
                await self.store.update_node_spec(name, orjson.dumps(spec).decode())
                return True
        return False

    async def set_gpu_memory(self, name: str, gpu_memory_gb: float) -> bool:
        """A registered node's GPU memory as its agent measured it again; False if no such row."""
        for row_name, raw in await self.store.node_rows():
            if row_name == name:
                spec = orjson.loads(raw)
                spec["gpu_memory_gb"] = gpu_memory_gb
                await self.store.update_node_spec(name, orjson.dumps(spec).decode())
                return True
        return False

    async def _restore(self, name: str, raw: str) -> BackendConfig:
        spec = orjson.loads(raw)
        agent = spec.pop("agent", None)  # not a backend setting: read by agents()
        kept = spec.pop("api_key", None)
        if isinstance(kept, dict) and "env" in kept:
            value = self.env.get(kept["env"])
            if value is None:
                raise SealError(f"its api_key comes from {kept['env']}, which is not set in the proxy's environment")
            spec["api_key"] = value
        elif isinstance(kept, dict) and "sealed" in kept:
            spec["api_key"] = self.sealer.unseal(kept["sealed"])
        elif isinstance(kept, str):
            # Written by a release that kept keys in the clear: seal it now.
            spec["api_key"] = kept
        config = _parse(spec, f"nodes.{name}")
        if isinstance(kept, str):
            respec = {**spec, **({"agent": agent} if agent else {})}
            await self.store.update_node_spec(name, self._respec(respec, {"sealed": self.sealer.seal(kept)}))
            log.info("registered node %s: its api_key is now stored encrypted", name)
        return config

    @staticmethod
    def _respec(spec: dict, kept_key: dict) -> str:
        return orjson.dumps({**{k: v for k, v in spec.items() if k != "api_key"}, "api_key": kept_key}).decode()
