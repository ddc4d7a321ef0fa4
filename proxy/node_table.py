"""The one owner of a node's parts: its adapter, health, catalog view, admission slots and metric series.

A node lives in several tables, each read on the request path by the part that
needs it (the catalog's backends, health and views; the router's slots). Adding
or removing one in a single place keeps them from drifting apart: a node is
either in all of them or in none. Services builds it; the admin side
(:mod:`proxy.operations`) adds and removes registered nodes through it.
"""

from __future__ import annotations

from .admission import Slots
from .backends import Backend, make_backend
from .catalog import Catalog
from .config import BackendConfig, Config
from .health import BackendHealth
from .metrics import Metrics


class NodeTable:
    def __init__(self, config: Config, catalog: Catalog, slots: dict[str, Slots], metrics: Metrics) -> None:
        self.config = config
        self.catalog = catalog
        self.slots = slots
        self.metrics = metrics

    def add(self, config: BackendConfig) -> Backend:
        backend = make_backend(config, self.config.timeouts_for(config))
        routing = self.config.routing
        self.slots[config.name] = Slots(config.name, config.max_concurrent, routing.queue_size, routing.queue_timeout)
        self.catalog.add(config.name, backend, BackendHealth(config.name, config.weight, self.config.health))
        return backend

    def remove(self, name: str) -> None:
        """Out of routing, the catalog and the metrics (its adapter is closed by the caller)."""
        self.catalog.remove(name)
        self.slots.pop(name, None)
        self.metrics.remove_backend(name)

    def names(self) -> list[str]:
        return list(self.catalog.backends)

    def __contains__(self, name: str) -> bool:
        return name in self.catalog.backends
