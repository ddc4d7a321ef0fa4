"""What each backend actually serves, learned by asking it, and whether it answered.

Refreshed at start-up, on every health check round, and on demand when a
client names a model nobody is known to serve (it may have been pulled a moment
ago). A round probes each backend first (its health), then lists its models and
describes the ones not seen before (Ollama ``/api/show``: template, capabilities,
context length). What a template refused at request time is remembered here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .backends import Backend, ServedModel
from .errors import ProxyError
from .health import BackendHealth, read_signals
from .translate.model_info import ModelInfo

log = logging.getLogger("llm_proxy.catalog")

_ON_DEMAND_MIN_INTERVAL = 2.0  # seconds between refreshes triggered by unknown model names


@dataclass
class BackendView:
    reachable: bool | None = None  # None: not asked yet
    models: tuple[ServedModel, ...] = ()
    index: dict[str, str] = field(default_factory=dict)  # model_key -> the name the backend uses
    error: str | None = None
    checked_at: float = 0.0
    info: dict[str, ModelInfo] = field(default_factory=dict)  # served name -> what the backend said
    described: dict[str, object] = field(default_factory=dict)  # served name -> the listing it was described from


@dataclass
class Learned:
    """Limits a model's template showed at request time (vLLM answers a 400 naming the rule)."""

    system_role: bool = True
    alternating_roles: bool = False


class Catalog:
    def __init__(self, backends: dict[str, Backend], health: dict[str, BackendHealth]) -> None:
        self.backends = backends
        self.health = health
        self.views: dict[str, BackendView] = {name: BackendView() for name in backends}
        self.learned: dict[tuple[str, str], Learned] = {}  # (backend, model key) -> limits
        self._refreshing: asyncio.Future | None = None
        self._recheck: asyncio.Future | None = None
        self._last_refresh = 0.0

    def add(self, name: str, backend: Backend, health: BackendHealth) -> None:
        self.backends[name] = backend
        self.health[name] = health
        self.views[name] = BackendView()

    def remove(self, name: str) -> None:
        for table in (self.backends, self.health, self.views):
            table.pop(name, None)

    async def _ask(self, name: str, backend: Backend) -> None:
        view = self.views[name]
        health = self.health[name]
        try:
            version = await backend.probe()
            health.probed(True, version=version)
            models = await backend.list_models()
        except ProxyError as exc:
            health.probed(False, error=exc.message)  # which logs the change of state, once
            view.reachable, view.error = False, exc.message
        else:
            view.reachable, view.error, view.models = True, None, tuple(models)
            view.index = {backend.model_key(m.name): m.name for m in models}
            await self._describe(name, backend, view)
            await read_signals(backend, health)
        view.checked_at = time.time()

    async def _describe(self, name: str, backend: Backend, view: BackendView) -> None:
        """Describe models that are new or changed since last time (Ollama: a new digest)."""
        current = {m.name: m for m in view.models}
        for gone in set(view.info) - set(current):
            view.info.pop(gone, None)
            view.described.pop(gone, None)
        for model_name, model in current.items():
            stamp = model.details.get("digest") or model.created
            if view.described.get(model_name) == stamp and model_name in view.info:
                continue
            try:
                view.info[model_name] = await backend.describe(model)
                view.described[model_name] = stamp
            except ProxyError as exc:
                log.info("backend %s could not describe %s: %s", name, model_name, exc.message)

    async def refresh(self) -> None:
        """Ask every backend at once; concurrent callers share one round."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        self._refreshing = asyncio.ensure_future(
            asyncio.gather(*(self._ask(n, b) for n, b in list(self.backends.items())))
        )
        try:
            await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None
            self._last_refresh = time.monotonic()

    async def refresh_if_stale(self) -> bool:
        """Refresh unless one just happened; True when it did."""
        if time.monotonic() - self._last_refresh < _ON_DEMAND_MIN_INTERVAL:
            return False
        await self.refresh()
        return True

    def served_name(self, backend: str, requested: str) -> str | None:
        """The name ``backend`` knows ``requested`` by, if it serves it."""
        return self.views[backend].index.get(self.backends[backend].model_key(requested))

    def any_reachable(self) -> bool:
        return any(v.reachable for v in self.views.values())

    def recheck_soon(self) -> None:
        """A backend denied having a model it listed: refresh in the background, without delaying anyone."""
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.ensure_future(self.refresh_if_stale())

    def model_info(self, backend: str, served: str) -> ModelInfo | None:
        view = self.views.get(backend)
        return view.info.get(served) if view else None

    def limits(self, backend: str, served: str) -> Learned | None:
        """What the proxy knows of a model's template: learned from errors, else read from /api/show."""
        learned = self.learned.get((backend, self.backends[backend].model_key(served)))
        if learned is not None:
            return learned
        info = self.model_info(backend, served)
        if info is not None and info.system_role is False:
            return Learned(system_role=False)
        return None

    def learn(self, backend: str, served: str, *, system_role: bool, alternation: bool) -> Learned:
        key = (backend, self.backends[backend].model_key(served))
        learned = self.learned.setdefault(key, Learned())
        if system_role:
            learned.system_role = False
        if alternation:
            learned.alternating_roles = True
        log.info(
            "model %s on %s: template limits learned (system role: %s, alternation: %s)",
            served,
            backend,
            learned.system_role,
            learned.alternating_roles,
        )
        return learned
