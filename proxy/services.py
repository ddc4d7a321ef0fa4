"""Everything the proxy runs on, built in one place at start-up and closed at shutdown.

The whole chain is wired here, in the order a request meets it, so one file
shows how the parts fit: backends (adapters) -> health and admission per backend
-> catalog (what each serves) -> resolver (names to candidates) -> router
(choice and failover) -> gateway (the HTTP-facing chain), with storage, history,
cache and metrics beside it. The app keeps the
result on ``app.state.services``; nothing lives in module globals.

The process is not alone (``serve --workers N``): what all processes must agree
on (registered nodes, drains, aliases, operations, health) goes through the
fleet store (:mod:`proxy.store`), whose change feed applies the others' changes
here in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from .admission import Slots
from .backends import Backend
from .cache import ResponseCache
from .caching import Caching
from .catalog import Catalog
from .config import BackendConfig, Config
from .gateway import Gateway
from .health import Monitor
from .history import History
from .metrics import Metrics, mark_process_dead
from .node_table import NodeTable
from .operations import Fleet, FleetParts
from .resolve import Resolver
from .routing import Router
from .storage import Database
from .storage.background import Periodic
from .storage.sealed import Sealer, key_path_for
from .store import Bus, ChangeFeed, FleetStore, SQLiteStore, open_bus
from .store.base import HEALTH
from .store.health import HealthShare
from .store.postgres import PostgresStore

log = logging.getLogger("llm_proxy")

# How long start-up waits for the first health round before serving anyway.
_FIRST_ROUND_TIMEOUT = 15.0
# Seconds between checks that the database file is still the one opened.
_STORAGE_CHECK_INTERVAL = 2.0


@dataclass
class Services:
    config: Config
    db: Database
    history: History
    cache: ResponseCache
    metrics: Metrics
    catalog: Catalog
    slots: dict[str, Slots]
    resolver: Resolver
    router: Router
    gateway: Gateway
    monitor: Monitor
    fleet: Fleet | None = None  # the admin side: nodes, operations, activation (proxy/operations)
    sealer: Sealer | None = None  # encrypts the secrets kept in the database
    storage_watch: Periodic | None = None  # notices a database file deleted or replaced under us
    store: FleetStore | None = None  # state shared with the other proxy processes
    feed: ChangeFeed | None = None  # their changes, applied here
    bus: Bus | None = None  # with redis.url: health, hot cache, progress and wake-ups reach the others at once
    health_share: HealthShare | None = None  # backend cooldowns learned here, applied there (and back)
    nodes: NodeTable | None = None  # adds and removes a node's parts, all at once

    @classmethod
    async def open(cls, config: Config) -> Services:
        """Open storage and build the chain; :meth:`start` then brings it to life."""
        if config.storage.url:
            from .storage.postgres import PostgresDatabase

            db = await PostgresDatabase.open(config.storage.url)
            log.info("storage: PostgreSQL %s (schema version %d)", db.path, db.schema_version)
        else:
            db = await Database.open(config.storage.path)
            log.info("storage: %s (schema version %d)", db.path if db.path == ":memory:" else os.path.abspath(db.path),
                     db.schema_version)  # fmt: skip
        sealer = await asyncio.to_thread(Sealer.open, key_path_for(config.storage.path, config.storage.key_path))
        metrics = Metrics(config.metrics)
        history = History(db, config.history)
        cache = ResponseCache(db, config.cache, metrics=metrics)
        catalog = Catalog({}, {})
        slots: dict[str, Slots] = {}
        resolver = Resolver(config, catalog)
        router = Router(config.routing, catalog.health, slots)
        gateway = Gateway(config, catalog, resolver, router, history, metrics, Caching(cache, config.cache))
        services = cls(config, db, history, cache, metrics, catalog, slots, resolver, router, gateway,
                       Monitor(config.health.interval, lambda: services.check()))  # fmt: skip
        router.on_model_missing = lambda c: catalog.recheck_soon()
        services.sealer = sealer
        services.nodes = NodeTable(config, catalog, slots, metrics)
        services.storage_watch = Periodic("storage-watch", _STORAGE_CHECK_INTERVAL, db.check_file)
        services.store = PostgresStore(db) if config.storage.url else SQLiteStore(db)
        services.feed = ChangeFeed(services.store)
        services.bus = bus = open_bus(config.redis.url, services.store, services.feed)
        cache.share(bus)
        share = services.health_share = HealthShare(services.store, catalog.health, bus)
        services.feed.on(HEALTH, share.apply)
        services.feed.every(0.0, share.publish)
        for backend in config.backends:
            services.add_backend(backend)
        services.fleet = Fleet(FleetParts(config, catalog, resolver, services.nodes, services.store, services.feed,
                                          history, sealer, bus))  # fmt: skip
        return services

    def add_backend(self, config: BackendConfig) -> Backend:
        return self.nodes.add(config)

    async def check(self) -> None:
        """One health round: probe and list every backend, then report aliases nobody serves."""
        await self.catalog.refresh()
        mismatched = {(m["alias"], m["target"]) for m in self.resolver.report_mismatches()}
        for alias in self.resolver.alias_models():
            self.metrics.alias_mismatch(alias.name, alias.target, ",".join(alias.backends) or "*",
                                        (alias.name, alias.target) in mismatched)  # fmt: skip
        self.update_gauges()

    def update_gauges(self) -> None:
        """Per-backend state, in-flight and queue gauges (also refreshed on every scrape)."""
        for name, health in self.catalog.health.items():
            self.metrics.backend_state(name, health.state)
            self.metrics.set_backend_in_flight(name, health.in_flight)
            self.metrics.set_backend_queue(name, self.slots[name].queued)
        self.metrics.history_buffer(self.history.buffered, self.history.stats.dropped + self.history.stats.deferred)

    async def start(self) -> None:
        await self.history.start()
        await self.cache.start()
        # Before the first round: registered nodes are probed with the others, activated aliases apply.
        await self.fleet.start()
        # Cooldowns other processes published before this one started (a worker restarted after a crash,
        # a replica added): without them it would pay a failed attempt of its own on each dead node.
        if await self.health_share.load():
            log.info("backends in cooldown, as other proxy processes found them: %s", ", ".join(
                name for name, h in self.catalog.health.items() if h.cooling()))  # fmt: skip
        try:
            await asyncio.wait_for(self.check(), _FIRST_ROUND_TIMEOUT)
        except TimeoutError:
            log.warning("some backends did not answer their first health check in time; serving anyway")
        for name, view in self.catalog.views.items():
            state = f"{len(view.models)} models" if view.reachable else f"unreachable ({view.error})"
            log.info("backend %s: %s", name, state)
        self.monitor.start()
        self.storage_watch.start()
        self.feed.start()
        if self.bus is not None:
            self.bus.start()

    def remove_backend(self, name: str) -> None:
        """Take a node out of routing, the catalog and the metrics (its adapter is closed by the caller)."""
        self.nodes.remove(name)

    async def close(self) -> None:
        await self.storage_watch.close()
        await self.feed.close()
        if self.bus is not None:
            await self.bus.close()
        await self.fleet.close()  # first: running operations end as interrupted while history can record it
        await self.monitor.stop()
        await asyncio.gather(*(b.aclose() for b in self.catalog.backends.values()))
        # The order matters: the cache and history flush into the database before it closes.
        await self.cache.close()
        await self.history.close()
        await self.db.close()
        mark_process_dead()
