"""What the proxy knows about its fleet: backend health, served models, aliases, capabilities."""

from __future__ import annotations

import os

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ModelNotFound
from ..services import Services


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def backend_status(services: Services, name: str) -> dict:
    backend = services.catalog.backends[name]
    view = services.catalog.views[name]
    slots = services.slots[name]
    return {
        "name": name,
        "kind": backend.config.kind,
        "url": backend.config.url,
        **services.catalog.health[name].snapshot(),
        "max_concurrent": backend.config.max_concurrent,
        "queue_depth": slots.queued,
        "reachable": view.reachable,
        "listing_error": view.error,
        "checked_at": view.checked_at or None,
        "served_models": sorted(m.name for m in view.models),
    }


def fleet_snapshot(services: Services) -> dict:
    """Backends, aliases and mismatches from what the process holds in memory (no I/O): also the dashboard's feed."""
    catalog, resolver = services.catalog, services.resolver
    aliases = []
    for alias in services.resolver.alias_models():
        served_by = [
            n
            for n in (alias.backends or catalog.backends)
            if n in catalog.views and catalog.served_name(n, alias.target)
        ]
        usable = [n for n in served_by if catalog.health[n].eligible]
        aliases.append({"name": alias.name, "target": alias.target, "served_by": served_by,
                        "state": "ok" if usable else ("unavailable" if served_by else "not_served"),
                        "fallback": list(alias.fallback)})  # fmt: skip
    return {
        "backends": [backend_status(services, n) for n in catalog.backends],
        "aliases": aliases,
        "alias_mismatches": resolver.alias_mismatches(),
        # Which process answered (serve --workers N): each holds the whole fleet, this tells them apart.
        "process": {"pid": os.getpid(), "instance": services.store.instance if services.store else None},
        # Where the shared state lives; a Redis that is down is said here (the proxy then polls the database).
        "storage": {"kind": "postgresql" if services.config.storage.url else "sqlite", "location": services.db.path},
        "redis": services.bus.status() if services.bus is not None else None,
    }


async def fleet_status(request: Request) -> Response:
    return _json(fleet_snapshot(request.app.state.services))


def _model_entry(services: Services, public: str, target: str) -> dict:
    catalog = services.catalog
    alias = services.resolver.aliases.get(public)
    per_backend = {}
    for name in catalog.backends:
        served = catalog.served_name(name, target)
        if served is None:
            continue
        info = catalog.model_info(name, served)
        learned = catalog.learned.get((name, catalog.backends[name].model_key(served)))
        per_backend[name] = {
            "served_as": served,
            "state": catalog.health[name].state,
            **(info.as_dict() if info else {"capabilities": None, "context_length": None, "system_role": None}),
            "learned": {"system_role": learned.system_role, "alternating_roles": learned.alternating_roles}
            if learned
            else None,
        }
    entry = {
        "name": public,
        "target": target,
        "alias": alias is not None,
        "capabilities": sorted(services.resolver.capabilities(alias)) if alias else
        sorted({c for b in per_backend.values() for c in (b["capabilities"] or ())}),
        "backends": per_backend,
    }  # fmt: skip
    if alias is not None:
        entry["configured"] = {
            "capabilities": list(alias.capabilities),
            "preference": alias.preference,
            "supports_system_role": alias.supports_system_role,
            "alternating_roles": alias.alternating_roles,
            "system_prompt": bool(alias.system_prompt),
            "fallback": list(alias.fallback),
            "backends": list(alias.backends),
        }
    return entry


async def models(request: Request) -> Response:
    services: Services = request.app.state.services
    entries = {a.name: _model_entry(services, a.name, a.target) for a in services.resolver.alias_models()}
    for view in services.catalog.views.values():
        for model in view.models:
            if model.name not in entries:
                entries[model.name] = _model_entry(services, model.name, model.name)
    return _json({"models": list(entries.values())})


async def capabilities(request: Request) -> Response:
    services: Services = request.app.state.services
    name = request.path_params["name"]
    alias = services.resolver.aliases.get(name)
    target = alias.target if alias else name
    entry = _model_entry(services, name, target)
    if alias is None and not entry["backends"]:
        raise ModelNotFound(f"No alias or served model is called {name!r}", param="name")
    return _json(entry)
