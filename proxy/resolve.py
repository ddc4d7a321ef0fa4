"""From the model name a client sent to the backends that can answer it.

A name is either a configured alias (``models:`` in the config), or a model
some backend serves under that name. Either way the answer is a :class:`Route`:
the public name to echo back and, per backend, the name that backend knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends import Backend
from .catalog import Catalog
from .config import Config, ModelConfig
from .errors import BackendUnavailable, ModelNotFound


@dataclass(frozen=True)
class Candidate:
    backend: Backend
    model: str  # the name this backend knows the model by


@dataclass(frozen=True)
class Route:
    public: str
    target: str
    candidates: tuple[Candidate, ...]
    alias: ModelConfig | None = None


class Resolver:
    def __init__(self, config: Config, backends: dict[str, Backend], catalog: Catalog) -> None:
        self.backends = backends
        self.catalog = catalog
        self.aliases = {m.name: m for m in config.models}

    async def resolve(self, name: str) -> Route:
        route = self._route(name)
        if not route.candidates and await self.catalog.refresh_if_stale():
            route = self._route(name)  # maybe it was pulled or the node came back a moment ago
        if not route.candidates:
            raise self._why_not(route)
        return route

    def _route(self, name: str) -> Route:
        alias = self.aliases.get(name)
        if alias is None:
            return Route(name, name, self._serving(name, self.backends), None)
        listed = {b: self.backends[b] for b in alias.backends} if alias.backends else self.backends
        candidates = self._serving(alias.target, listed)
        if alias.backends:
            # A backend the config says serves the target, but that has not answered a listing
            # (down, or not asked yet): still worth a try, after the ones known to be good.
            known = {c.backend.name for c in candidates}
            candidates += tuple(
                Candidate(b, alias.target)
                for n, b in listed.items()
                if n not in known and not self.catalog.views[n].reachable
            )
        return Route(name, alias.target, candidates, alias)

    def _serving(self, model: str, backends: dict[str, Backend]) -> tuple[Candidate, ...]:
        out = []
        for name, backend in backends.items():
            served = self.catalog.served_name(name, model)
            if served is not None:
                out.append(Candidate(backend, served))
        return tuple(out)

    def _why_not(self, route: Route) -> Exception:
        views = self.catalog.views
        relevant = route.alias.backends if route.alias and route.alias.backends else tuple(self.backends)
        down = [n for n in relevant if not views[n].reachable]
        what = (
            f"model {route.public!r} (an alias for {route.target!r})" if route.alias else f"model {route.public!r}"
        )
        if down and len(down) == len(relevant):
            return BackendUnavailable(f"{what} cannot be served: no backend is reachable ({', '.join(down)})")
        served = sorted({m for n in relevant if views[n].reachable for m in views[n].index.values()})
        public = sorted(set(self.aliases) | set(served))
        hint = f"; available: {', '.join(public)}" if public else ""
        if down:
            hint += f"; unreachable backends: {', '.join(down)}"
        if route.alias:
            return ModelNotFound(f"{what} is not served by any backend{hint}", param="model")
        return ModelNotFound(f"The model {route.public!r} does not exist{hint}", param="model")

    def public_models(self) -> list[tuple[str, int, str]]:
        """(id, created, owned_by) for /v1/models: aliases first, then every served name."""
        out: dict[str, tuple[str, int, str]] = {}
        for alias in self.aliases.values():
            out[alias.name] = (alias.name, 0, "llm-proxy")
        for name, view in self.catalog.views.items():
            if not view.reachable:
                continue
            for model in view.models:
                out.setdefault(model.name, (model.name, model.created, name))
        return list(out.values())
