"""Alias targets set by activation, kept in the fleet store and applied at start-up and in every process.

The override records the alias's target in the config file when it was made.
If the file later says something else, an operator edited it on purpose after
the activation: the file wins and the override is dropped (and logged). An
activation in one process reaches the others as an ``alias`` change, on which
they apply the stored overrides again.
"""

from __future__ import annotations

import logging

from ..resolve import Resolver
from ..store.base import FleetStore

log = logging.getLogger("llm_proxy.aliases")


class AliasOverrides:
    def __init__(self, store: FleetStore, resolver: Resolver) -> None:
        self.store = store
        self.resolver = resolver
        self.configured = {m.name: m.target for m in resolver.config.models}

    async def apply(self) -> dict[str, str]:
        """Point each alias at its stored target; returns alias -> target for those applied."""
        applied = {}
        rows = await self.store.alias_overrides()
        for alias, target, config_target in rows:
            if alias not in self.configured:
                log.warning("alias %s was activated to %s but is no longer in the config; ignored", alias, target)
                continue
            if self.configured[alias] != config_target:
                log.warning("alias %s: the config now says %s (it said %s when %s was activated); the config wins",
                            alias, self.configured[alias], config_target, target)  # fmt: skip
                await self.store.drop_alias_override(alias)
                continue
            if self.resolver.aliases[alias].target == target:
                continue
            self.resolver.set_target(alias, target)
            applied[alias] = target
            log.info("alias %s -> %s (activated; the config says %s)", alias, target, config_target)
        return applied

    async def set(self, alias: str, target: str, *, operation_id: str | None = None) -> str:
        """Store, then switch; returns the previous target. Stored first: a switch that is not saved would
        silently revert at the next restart."""
        previous = self.resolver.aliases[alias].target
        await self.store.set_alias_override(alias, target, self.configured[alias], previous, operation_id)
        self.resolver.set_target(alias, target)
        return previous
