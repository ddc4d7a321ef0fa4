"""Alias targets set by activation, kept in SQLite (``alias_overrides``) and applied at start-up.

The override records the alias's target in the config file when it was made.
If the file later says something else, an operator edited it on purpose after
the activation: the file wins and the override is dropped (and logged).
"""

from __future__ import annotations

import logging
import time

from ..resolve import Resolver
from ..storage import Database

log = logging.getLogger("llm_proxy.aliases")


class AliasOverrides:
    def __init__(self, db: Database, resolver: Resolver) -> None:
        self.db = db
        self.resolver = resolver
        self.configured = {m.name: m.target for m in resolver.config.models}

    async def apply(self) -> dict[str, str]:
        """Point each alias at its stored target; returns alias -> target for those applied."""
        applied = {}
        rows = await self.db.fetchall("SELECT alias, target, config_target FROM alias_overrides")
        for alias, target, config_target in rows:
            if alias not in self.configured:
                log.warning("alias %s was activated to %s but is no longer in the config; ignored", alias, target)
                continue
            if self.configured[alias] != config_target:
                log.warning("alias %s: the config now says %s (it said %s when %s was activated); the config wins",
                            alias, self.configured[alias], config_target, target)  # fmt: skip
                await self.db.execute("DELETE FROM alias_overrides WHERE alias = ?", (alias,))
                continue
            self.resolver.set_target(alias, target)
            applied[alias] = target
            log.info("alias %s -> %s (activated; the config says %s)", alias, target, config_target)
        return applied

    async def set(self, alias: str, target: str, *, operation_id: str | None = None) -> str:
        """Store, then switch; returns the previous target. Stored first: a switch that is not saved would
        silently revert at the next restart."""
        previous = self.resolver.aliases[alias].target
        await self.db.execute(
            "INSERT INTO alias_overrides (alias, target, config_target, previous, operation_id, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (alias) DO UPDATE SET target = excluded.target, "
            "config_target = excluded.config_target, previous = excluded.previous, "
            "operation_id = excluded.operation_id, updated_at = excluded.updated_at",
            (alias, target, self.configured[alias], previous, operation_id, time.time()),
        )
        self.resolver.set_target(alias, target)
        return previous
