"""What each backend actually serves, learned by asking it, and whether it answered.

Refreshed at start-up, on an interval, and on demand when a client names a
model nobody is known to serve (it may have been pulled a moment ago).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .backends import Backend, ServedModel
from .errors import ProxyError

log = logging.getLogger("llm_proxy.catalog")

_ON_DEMAND_MIN_INTERVAL = 2.0  # seconds between refreshes triggered by unknown model names


@dataclass
class BackendView:
    reachable: bool | None = None  # None: not asked yet
    models: tuple[ServedModel, ...] = ()
    index: dict[str, str] = field(default_factory=dict)  # model_key -> the name the backend uses
    error: str | None = None
    checked_at: float = 0.0


class Catalog:
    def __init__(self, backends: dict[str, Backend], interval: float) -> None:
        self.backends = backends
        self.interval = interval
        self.views: dict[str, BackendView] = {name: BackendView() for name in backends}
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Future | None = None
        self._last_refresh = 0.0

    async def _ask(self, name: str, backend: Backend) -> None:
        view = self.views[name]
        try:
            models = await backend.list_models()
        except ProxyError as exc:
            if view.reachable is not False:
                log.warning("backend %s is not answering: %s", name, exc.message)
            view.reachable, view.error = False, exc.message
        else:
            if view.reachable is False:
                log.info("backend %s is answering again", name)
            view.reachable, view.error, view.models = True, None, tuple(models)
            view.index = {backend.model_key(m.name): m.name for m in models}
        view.checked_at = time.time()

    async def refresh(self) -> None:
        """Ask every backend at once; concurrent callers share one round."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        self._refreshing = asyncio.ensure_future(
            asyncio.gather(*(self._ask(n, b) for n, b in self.backends.items()))
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

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # the loop must outlive any one bad round
                log.exception("refreshing the model catalog failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="catalog-refresh")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def served_name(self, backend: str, requested: str) -> str | None:
        """The name ``backend`` knows ``requested`` by, if it serves it."""
        return self.views[backend].index.get(self.backends[backend].model_key(requested))

    def any_reachable(self) -> bool:
        return any(v.reachable for v in self.views.values())
