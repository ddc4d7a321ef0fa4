"""The nodes: what each is, holds and runs; registering, draining and removing them; the model matrix.

Installed and loaded models are asked of each Ollama node when the view is
requested (``/api/tags``, ``/api/ps``, all nodes at once, with the connect
timeout), so the answer is current; a node that does not answer shows what the
last health round saw, with the error. A vLLM node's loaded model is the one
it serves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from ..backends.ollama import normalize
from ..errors import InvalidRequest, ProxyError
from ..operations.distribution import tier_models
from ..operations.fleet import Fleet
from .operations import current_fleet, flag, json_response, read_body


@dataclass
class _Live:
    installed: list[dict] = field(default_factory=list)  # {model, size, digest, modified_at}
    loaded: list[dict] = field(default_factory=list)  # {model, size_vram, expires_at}
    error: str | None = None
    agent: dict = field(default_factory=dict)  # agent, hardware, runtime, alerts (proxy/operations/agents.py)


async def _live(fleet: Fleet, name: str) -> _Live:
    live, agent = await asyncio.gather(_runtime_live(fleet, name), fleet.agents.live(name))
    live.agent = agent
    return live


async def _runtime_live(fleet: Fleet, name: str) -> _Live:
    parts = fleet.parts
    backend = parts.catalog.backends[name]
    view = parts.catalog.views[name]
    cached = [{"model": m.name, "size": m.details.get("size"), "digest": m.details.get("digest"),
               "modified_at": m.details.get("modified_at")} for m in view.models]  # fmt: skip
    if backend.config.kind != "ollama":
        return _Live(cached, [{"model": m["model"], "size_vram": None, "expires_at": None} for m in cached],
                     view.error if view.reachable is False else None)  # fmt: skip
    admin = fleet.registry.ollama(name)
    try:
        tags, ps = await asyncio.gather(admin.tags(), admin.ps())
    except ProxyError as exc:
        return _Live(cached, [], exc.message)
    installed = [{"model": e.get("model") or e.get("name"), "size": e.get("size"), "digest": e.get("digest"),
                  "modified_at": e.get("modified_at")} for e in tags]  # fmt: skip
    loaded = [{"model": e.get("model") or e.get("name"), "size_vram": e.get("size_vram"),
               "expires_at": e.get("expires_at")} for e in ps]  # fmt: skip
    return _Live(installed, loaded)


def _view(fleet: Fleet, name: str, live: _Live) -> dict:
    parts = fleet.parts
    config = parts.catalog.backends[name].config
    health = parts.catalog.health[name]
    catalog_view = parts.catalog.views[name]
    downloading = [{"model": op.model, "operation": op.id, "state": op.state, "status": op.status,
                    "fraction": round(op.fraction, 4)}
                   for op in fleet.manager.list(node=name, kind="pull", limit=10_000) if op.active]  # fmt: skip
    return {
        "name": name,
        "kind": config.kind,
        "url": config.url,
        "source": fleet.registry.source(name),
        "state": health.state,
        "draining": health.draining,
        "version": health.version,
        "weight": config.weight,
        "gpu_memory_gb": config.gpu_memory_gb,
        "tier_models": list(tier_models(parts.config.distribution.tiers, config.gpu_memory_gb)),
        "in_flight": health.in_flight,
        "max_concurrent": config.max_concurrent,
        "reachable": catalog_view.reachable,
        "error": live.error,
        "installed": live.installed,
        "loaded": live.loaded,
        "downloading": downloading,
        **live.agent,
    }


async def _views(fleet: Fleet, names: list[str]) -> list[dict]:
    lives = await asyncio.gather(*(_live(fleet, n) for n in names))
    return [_view(fleet, n, live) for n, live in zip(names, lives)]


async def list_nodes(request: Request) -> Response:
    fleet = await current_fleet(request)
    return json_response({"object": "list", "data": await _views(fleet, fleet.registry.names())})


async def get_node(request: Request) -> Response:
    fleet = await current_fleet(request)
    name = request.path_params["name"]
    fleet.registry.config_of(name)
    return json_response((await _views(fleet, [name]))[0])


async def manifest(request: Request) -> Response:
    """GET /admin/nodes/{name}/manifest: what the node's agent holds (Hugging Face models, with checksums)."""
    fleet = await current_fleet(request)
    return json_response({"object": "list", "data": await fleet.agents.client(request.path_params["name"]).manifest()})


async def register_agent(request: Request) -> Response:
    """POST /admin/agents {name, kind, url, agent_url, token, gpu_memory_gb?, hardware?, runtime?, alerts?}.

    201 with the node when it is new, 200 when an existing node is linked to its agent."""
    fleet = await current_fleet(request)
    body = await read_body(request)
    _, ops, created = await fleet.agents.register(body)
    await fleet.settle()
    name = body["name"]
    view = (await _views(fleet, [name]))[0]
    return json_response({"node": view, "operations": [op.as_dict() for op in ops]}, 201 if created else 200)


async def agent_heartbeat(request: Request) -> Response:
    """POST /admin/agents/{name}/heartbeat {hardware, runtime, alerts, agent}; 404 asks the agent to register."""
    fleet = await current_fleet(request)
    await fleet.agents.heartbeat(request.path_params["name"], await read_body(request))
    return json_response({"ok": True})


async def register_node(request: Request) -> Response:
    """POST /admin/nodes {name, kind, url, weight?, gpu_memory_gb?, api_key?, max_concurrent?, ...} -> 201."""
    fleet = await current_fleet(request)
    config, ops = await fleet.register_node(await read_body(request))
    submitted = [op.as_dict() for op in ops]
    await fleet.settle()
    view = (await _views(fleet, [config.name]))[0]
    return json_response({"node": view, "operations": submitted}, 201)


def _timeout(request: Request, body: dict) -> float | None:
    raw = request.query_params.get("timeout", body.get("timeout"))
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidRequest("timeout must be a number of seconds", param="timeout") from None
    if value < 0:
        raise InvalidRequest("timeout must be 0 or more", param="timeout")
    return value


async def remove_node(request: Request) -> Response:
    """DELETE /admin/nodes/{name}[?timeout=S&force=true]: drain, wait for in-flight requests, remove."""
    body = await read_body(request, optional=True)
    force = request.query_params.get("force", "").lower() in ("1", "true", "yes") or flag(body, "force")
    outcome = await (await current_fleet(request)).remove_node(request.path_params["name"], timeout=_timeout(request, body),
                                                  force=force)  # fmt: skip
    return json_response(outcome)


async def drain_node(request: Request) -> Response:
    """POST /admin/nodes/{name}/drain: no new requests go there; those in flight finish."""
    fleet = await current_fleet(request)
    name = request.path_params["name"]
    await fleet.drain_node(name, True)
    return json_response((await _views(fleet, [name]))[0])


async def resume_node(request: Request) -> Response:
    """POST /admin/nodes/{name}/resume: the node takes requests again."""
    fleet = await current_fleet(request)
    name = request.path_params["name"]
    await fleet.drain_node(name, False)
    return json_response((await _views(fleet, [name]))[0])


async def model_matrix(request: Request) -> Response:
    """GET /admin/models/matrix: for each model and node, installed / loaded / downloading (with fraction)."""
    fleet = await current_fleet(request)
    names = fleet.registry.names()
    lives = dict(zip(names, await asyncio.gather(*(_live(fleet, n) for n in names))))
    rows: dict[str, dict] = {}

    def cell(model: str, node: str) -> dict:
        row = rows.setdefault(normalize(model), {"model": model, "nodes": {}})
        return row["nodes"].setdefault(node, {"installed": False, "loaded": False, "downloading": False,
                                              "fraction": None, "operation": None})  # fmt: skip

    for node, live in lives.items():
        for entry in live.installed:
            cell(entry["model"], node)["installed"] = True
        for entry in live.loaded:
            cell(entry["model"], node)["loaded"] = True
    for op in fleet.manager.list(kind="pull", limit=10_000):
        if op.active and op.node in lives:
            spot = cell(op.model, op.node)
            spot.update(downloading=True, fraction=round(op.fraction, 4), operation=op.id)
    empty = {"installed": False, "loaded": False, "downloading": False, "fraction": None, "operation": None}
    models = []
    for row in sorted(rows.values(), key=lambda r: r["model"]):
        row["nodes"] = {n: row["nodes"].get(n, dict(empty)) for n in names}
        models.append(row)
    errors = {n: live.error for n, live in lives.items() if live.error}
    return json_response({"nodes": names, "models": models, "errors": errors})
