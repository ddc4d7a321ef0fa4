"""GET /admin/catalog: models that can be installed, and whether each fits each node's GPU.

``?source=ollama|huggingface`` (default: both), ``q=`` (a case-insensitive substring of the
name), ``limit=`` (default 50, at most 500), ``refresh=true`` (ask the sources again now).
What the sources are and how answers are kept is in :mod:`proxy.installable`; this module reads
the query and shapes the answer.
"""

from __future__ import annotations

import asyncio
from itertools import chain, zip_longest

from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidRequest
from ..installable import Installable, fits, gpu_bytes, matches
from ..installable.parse import SOURCES
from .operations import current_fleet, json_response

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_QUERY = 200
_PARAMS = ("source", "q", "limit", "refresh")


def _query(request: Request) -> tuple[list[str], str, int, bool]:
    params = request.query_params
    for name in params:
        if name not in _PARAMS:
            raise InvalidRequest(f"unknown parameter {name!r} (known: {', '.join(_PARAMS)})", param=name)
    source = params.get("source", "")
    if source and source not in SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}, got {source!r}", param="source")
    query = params.get("q", "").strip()
    if len(query) > MAX_QUERY:
        raise InvalidRequest(f"q must be at most {MAX_QUERY} characters", param="q")
    raw = params.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidRequest(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw!r}", param="limit"
        ) from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be from 1 to {MAX_LIMIT}, got {limit}", param="limit")
    refresh = params.get("refresh", "false").lower()
    if refresh not in ("true", "false", "1", "0"):
        raise InvalidRequest("refresh must be true or false", param="refresh")
    return ([source] if source else list(SOURCES)), query, limit, refresh in ("true", "1")


async def installable(request: Request) -> Response:
    sources, query, limit, refresh = _query(request)
    catalog: Installable = request.app.state.installable
    fleet = await current_fleet(request)
    nodes = {name: gpu_bytes(fleet.registry.config_of(name).gpu_memory_gb) for name in fleet.registry.names()}
    answers = await asyncio.gather(*(catalog.answer(s, query, refresh=refresh) for s in sources))
    per_source = [[e.with_estimates() for e in a.entries if matches(e, query)] for a in answers]
    # Taken in turn from each source, so a limit does not hide one source behind the other.
    merged = [e for e in chain.from_iterable(zip_longest(*per_source)) if e is not None]
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry in merged:
        if (entry.source, entry.name) not in seen:
            seen.add((entry.source, entry.name))
            unique.append(entry)
    data = [entry.as_dict(fits(entry, nodes)) for entry in unique[:limit]]
    body = {
        "object": "list",
        "data": data,
        "sources": {s: a.state for s, a in zip(sources, answers)},
        "errors": {s: a.error for s, a in zip(sources, answers) if a.error},
        "nodes": [{"name": n, "gpu_memory_bytes": b} for n, b in nodes.items()],
        "truncated": len(unique) > limit,
    }
    return json_response(body)
