"""Everything the proxy runs on, built in one place at start-up and closed at shutdown.

The whole chain is wired here, in the order a request meets it, so one file
shows how the parts fit: backends (adapters) -> health and admission per backend
-> catalog (what each serves) -> resolver (names to candidates) -> router
(choice and failover) -> gateway (the HTTP-facing chain). The app keeps the
result on ``app.state.services``; nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .admission import Slots
from .backends import Backend, make_backend
from .catalog import Catalog
from .config import BackendConfig, Config
from .gateway import Gateway
from .health import BackendHealth, Monitor
from .resolve import Resolver
from .routing import Router

log = logging.getLogger("llm_proxy")

# How long start-up waits for the first health round before serving anyway.
_FIRST_ROUND_TIMEOUT = 15.0


@dataclass
class Services:
    config: Config
    catalog: Catalog
    slots: dict[str, Slots]
    resolver: Resolver
    router: Router
    gateway: Gateway
    monitor: Monitor

    @classmethod
    def build(cls, config: Config) -> Services:
        catalog = Catalog({}, {})
        slots: dict[str, Slots] = {}
        resolver = Resolver(config, catalog)
        router = Router(config.routing, catalog.health, slots)
        services = cls(config, catalog, slots, resolver, router, Gateway(config, catalog, resolver, router),
                       Monitor(config.health.interval, lambda: services.check()))  # fmt: skip
        router.on_model_missing = lambda c: catalog.recheck_soon()
        for backend in config.backends:
            services.add_backend(backend)
        return services

    def add_backend(self, config: BackendConfig) -> Backend:
        backend = make_backend(config, self.config.timeouts_for(config))
        routing = self.config.routing
        self.slots[config.name] = Slots(config.name, config.max_concurrent, routing.queue_size, routing.queue_timeout)
        self.catalog.add(config.name, backend, BackendHealth(config.name, config.weight, self.config.health))
        return backend

    async def check(self) -> None:
        """One health round: probe and list every backend, then report aliases nobody serves."""
        await self.catalog.refresh()
        self.resolver.report_mismatches()

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self.check(), _FIRST_ROUND_TIMEOUT)
        except TimeoutError:
            log.warning("some backends did not answer their first health check in time; serving anyway")
        for name, view in self.catalog.views.items():
            state = f"{len(view.models)} models" if view.reachable else f"unreachable ({view.error})"
            log.info("backend %s: %s", name, state)
        self.monitor.start()

    async def close(self) -> None:
        await self.monitor.stop()
        await asyncio.gather(*(b.aclose() for b in self.catalog.backends.values()))
