"""From the model name a client sent to the backends that can answer it.

A name is a configured alias (``models:``), a router name (``auto``: pick a
model for the task), or a model some backend serves under that name. The answer
is a :class:`Route`: the public name to echo back, and groups of candidates in
the order they should be tried. The first group is the model asked for (or the
best one for the task); later groups are its ``fallback`` models, or, for a
routed request, the next-best models and finally ``routing.default_model``.
Choosing among the candidates of a group by health is the router's business.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from .backends import Backend
from .catalog import Catalog
from .config import TASK_TYPES, Config, ModelConfig
from .errors import BackendUnavailable, InvalidRequest, ModelNotFound

log = logging.getLogger("llm_proxy.resolve")

# Capabilities a request needs because of what it contains, checked against what models offer.
TOOLS, VISION, EMBEDDING = "tools", "vision", "embedding"


@dataclass(frozen=True)
class Candidate:
    backend: Backend
    model: str  # the name this backend knows the model by
    alias: ModelConfig | None = None  # the configured model it comes from: adaptation, defaults


@dataclass(frozen=True)
class Route:
    public: str
    target: str
    groups: tuple[tuple[Candidate, ...], ...]
    alias: ModelConfig | None = None
    reason: str = ""  # how a router name or a fallback chose, for logs and history

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(c for group in self.groups for c in group)


def requirements(operation: str, body: dict) -> set[str]:
    needs = set()
    if operation == "embeddings":
        needs.add(EMBEDDING)
    if body.get("tools"):
        needs.add(TOOLS)
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "input_image") for p in content
        ):
            needs.add(VISION)
            break
    return needs


class Resolver:
    def __init__(self, config: Config, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.aliases = {m.name: m for m in config.models}
        self._mismatches: dict[str, dict] = {}

    @property
    def backends(self) -> dict[str, Backend]:
        return self.catalog.backends

    # --- alias targets (activation) ------------------------------------------------------------

    def alias_models(self) -> list[ModelConfig]:
        """The configured aliases, in config order, with their current targets (after any activation).

        Everything that lists aliases reads this rather than the config's list, so an activated
        alias is seen the same way by resolution, task ranking, mismatches and listings.
        """
        return [self.aliases[m.name] for m in self.config.models]

    def set_target(self, name: str, target: str) -> ModelConfig:
        """Repoint alias ``name`` to ``target``; returns the previous entry.

        One dict assignment of a new frozen entry, so the switch is atomic for the event
        loop: a request resolved before it keeps its Route (and the old target) to the
        end, the next one resolves to the new target.
        """
        old = self.aliases[name]
        self.aliases[name] = dataclasses.replace(old, target=target)
        return old

    # --- resolution ----------------------------------------------------------------------------

    async def resolve(self, name: str, operation: str = "chat", body: dict | None = None,
                      task: str | None = None) -> Route:  # fmt: skip
        route = self._route(name, operation, body or {}, task)
        if not route.candidates and await self.catalog.refresh_if_stale():
            route = self._route(name, operation, body or {}, task)  # maybe pulled or back a moment ago
        if not route.candidates:
            raise self._why_not(route)
        return route

    def _route(self, name: str, operation: str, body: dict, task: str | None) -> Route:
        if name in self.config.routing.routers:
            return self._routed(name, operation, body, task)
        alias = self.aliases.get(name)
        if alias is None:
            return Route(name, name, (self._serving(name, self.backends),), None)
        groups = [self._alias_candidates(alias)]
        for other in alias.fallback:
            groups.append(self._named(other))
        return Route(
            name,
            alias.target,
            tuple(groups),
            alias,
            "fallback order: " + ", ".join(alias.fallback) if alias.fallback else "",
        )

    def _named(self, name: str) -> tuple[Candidate, ...]:
        alias = self.aliases.get(name)
        return self._alias_candidates(alias) if alias else self._serving(name, self.backends)

    def _alias_candidates(self, alias: ModelConfig) -> tuple[Candidate, ...]:
        listed = (
            {b: self.backends[b] for b in alias.backends if b in self.backends} if alias.backends else self.backends
        )
        candidates = self._serving(alias.target, listed, alias)
        if alias.backends:
            # A backend the config says serves the target, but that has not answered a listing
            # (down, or not asked yet): still worth a try, after the ones known to be good.
            known = {c.backend.name for c in candidates}
            candidates += tuple(
                Candidate(b, alias.target, alias)
                for n, b in listed.items()
                if n not in known and not self.catalog.views[n].reachable
            )
        return candidates

    def _serving(
        self, model: str, backends: dict[str, Backend], alias: ModelConfig | None = None
    ) -> tuple[Candidate, ...]:
        out = []
        for name, backend in backends.items():
            served = self.catalog.served_name(name, model)
            if served is not None:
                out.append(Candidate(backend, served, alias))
        return tuple(out)

    # --- capability routing --------------------------------------------------------------------

    def _routed(self, name: str, operation: str, body: dict, task: str | None) -> Route:
        routing = self.config.routing
        needs = requirements(operation, body)
        capability = None
        if task:
            capability = self.config.task_capability(task)
            if capability is None:
                known = sorted({*self.config.routing.task_types, *TASK_TYPES})
                raise InvalidRequest(f"Unknown task type {task!r}; valid task types: {', '.join(known)}",
                                     param="task_type", code="invalid_task_type")  # fmt: skip
        elif EMBEDDING in needs:
            capability = EMBEDDING
        ranked = self.ranked(capability, needs) if capability else []
        chosen = [m.name for m in ranked]
        if routing.default_model and routing.default_model not in chosen and EMBEDDING not in needs:
            chosen.append(routing.default_model)  # the general model: a chat model, no use for embeddings
        if not chosen:
            raise InvalidRequest(
                f"Model {name!r} picks a model by task: send a task type in the X-Task-Type header or a task_type "
                "field, or set routing.default_model" if not capability else
                f"No model declares the capability {capability!r} (models[].capabilities) and routing.default_model "
                "is not set",
                param="model", code="no_model_for_task",
            )  # fmt: skip
        groups = tuple(self._named(m) for m in chosen)
        reason = f"task {task} -> {capability}" if task else (f"needs {capability}" if capability else "default model")
        return Route(name, chosen[0], groups, self.aliases.get(chosen[0]), f"{reason}: {', '.join(chosen)}")

    def ranked(self, capability: str, needs: set[str]) -> list[ModelConfig]:
        """Configured models offering ``capability``, best first, minus those known to lack a need."""
        scored = []
        for order, model in enumerate(self.alias_models()):
            offered = self.capabilities(model)
            if capability not in offered:
                continue
            if any(need not in offered for need in needs) and self._reports_capabilities(model):
                continue
            position = (
                model.capabilities.index(capability) if capability in model.capabilities else len(model.capabilities)
            )
            scored.append(((position, model.preference, order), model))
        return [model for _, model in sorted(scored, key=lambda pair: pair[0])]

    def capabilities(self, model: ModelConfig) -> set[str]:
        """Declared in the config, plus what a backend serving the target reports (Ollama /api/show)."""
        found = set(model.capabilities)
        for info in self._infos(model.target):
            found.update(info.capabilities or ())
        return found

    def _reports_capabilities(self, model: ModelConfig) -> bool:
        # Only a backend that lists capabilities (Ollama) can say a model lacks one; vLLM says
        # nothing, and a model nobody describes is given the benefit of the doubt.
        return any(info.capabilities is not None for info in self._infos(model.target))

    def _infos(self, target: str):
        for name in self.backends:
            served = self.catalog.served_name(name, target)
            info = self.catalog.model_info(name, served) if served else None
            if info is not None:
                yield info

    # --- explaining failures -------------------------------------------------------------------

    def _why_not(self, route: Route) -> Exception:
        views = self.catalog.views
        relevant = route.alias.backends if route.alias and route.alias.backends else tuple(self.backends)
        down = [n for n in relevant if n in views and not views[n].reachable]
        what = f"model {route.public!r} (an alias for {route.target!r})" if route.alias else f"model {route.public!r}"
        if down and len(down) == len(relevant):
            return BackendUnavailable(f"{what} cannot be served: no backend is reachable ({', '.join(down)})")
        if route.alias:
            instead = self._served_instead(relevant)
            return ModelNotFound(f"{what} is not served by any backend{instead}"
                                 + (f"; unreachable backends: {', '.join(down)}" if down else ""), param="model")  # fmt: skip
        served = sorted({m for n in relevant if views[n].reachable for m in views[n].index.values()})
        public = sorted(set(self.aliases) | set(served))
        hint = f"; available: {', '.join(public)}" if public else ""
        if down:
            hint += f"; unreachable backends: {', '.join(down)}"
        return ModelNotFound(f"The model {route.public!r} does not exist{hint}", param="model")

    def _served_instead(self, backends) -> str:
        parts = []
        for name in backends:
            view = self.catalog.views.get(name)
            if view and view.reachable:
                parts.append(f"{name} serves {', '.join(sorted(view.index.values())) or 'nothing'}")
        return f" ({'; '.join(parts)})" if parts else ""

    def alias_mismatches(self) -> list[dict]:
        """Aliases whose target no reachable backend serves, with what those backends serve instead."""
        out = []
        for alias in self.alias_models():
            relevant = alias.backends or tuple(self.backends)
            reachable = [n for n in relevant if n in self.catalog.views and self.catalog.views[n].reachable]
            if not reachable or any(self.catalog.served_name(n, alias.target) for n in reachable):
                continue
            out.append({
                "alias": alias.name,
                "target": alias.target,
                "served_instead": {n: sorted(self.catalog.views[n].index.values()) for n in reachable},
            })  # fmt: skip
        return out

    def report_mismatches(self) -> list[dict]:
        """Log each mismatch when it appears and when it clears; return the current ones."""
        current = {m["alias"]: m for m in self.alias_mismatches()}
        for name, m in current.items():
            if name not in self._mismatches:
                instead = "; ".join(f"{b} serves {', '.join(ms) or 'nothing'}" for b, ms in m["served_instead"].items())
                log.warning("alias %s points to %s, which no reachable backend serves (%s)", name, m["target"], instead)
        for name in set(self._mismatches) - set(current):
            log.info("alias %s is served again", name)
        self._mismatches = current
        return list(current.values())

    # --- listing -------------------------------------------------------------------------------

    def public_models(self) -> list[dict]:
        """Model cards for /v1/models: aliases first, then every served name, with capabilities and backends."""
        out: dict[str, dict] = {}
        for alias in self.alias_models():
            served_by = [n for n in (alias.backends or self.backends) if self.catalog.served_name(n, alias.target)]
            out[alias.name] = {"id": alias.name, "object": "model", "created": 0, "owned_by": "llm-proxy",
                               "target": alias.target, "capabilities": sorted(self.capabilities(alias)),
                               "served_by": served_by}  # fmt: skip
        for name, view in self.catalog.views.items():
            if not view.reachable:
                continue
            for model in view.models:
                card = out.get(model.name)
                if card is None:
                    info = view.info.get(model.name)
                    card = out[model.name] = {"id": model.name, "object": "model", "created": model.created,
                                              "owned_by": name, "capabilities": sorted(info.capabilities or ())
                                              if info else [], "served_by": []}  # fmt: skip
                if "target" not in card:
                    card["served_by"].append(name)
        return list(out.values())
