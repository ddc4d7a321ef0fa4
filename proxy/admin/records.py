"""What went through the proxy, and what it remembers: request history and the response cache."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidRequest, NotFound
from ..history import RequestRecord


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


_FILTERS = ("model", "backend", "status", "endpoint", "since", "until", "cursor")


async def list_requests(request: Request) -> Response:
    """GET /admin/history/requests?model=&backend=&status=&endpoint=&since=&until=&limit=&cursor="""
    history = request.app.state.services.history
    query = request.query_params
    unknown = set(query) - {*_FILTERS, "limit", "offset"}
    if unknown:
        raise InvalidRequest(f"Unknown filter(s): {', '.join(sorted(unknown))}; valid: "
                             f"{', '.join((*_FILTERS, 'limit', 'offset'))}", param=sorted(unknown)[0])  # fmt: skip
    try:
        limit = int(query.get("limit", 100))
        offset = int(query.get("offset", 0))
    except ValueError:
        raise InvalidRequest("limit and offset must be integers", param="limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be between 1 and 1000", param="limit")
    try:
        page = await history.list(**{k: query[k] for k in _FILTERS if k in query}, limit=limit, offset=offset)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return _json(page)


async def get_request(request: Request) -> Response:
    history = request.app.state.services.history
    row = await history.get(request.path_params["id"])
    if row is None:
        raise NotFound(f"No request with id {request.path_params['id']!r} in the history")
    return _json(row)


async def purge_cache(request: Request) -> Response:
    """DELETE /admin/cache (everything) or DELETE /admin/cache?model=NAME (an alias or a served name)."""
    services = request.app.state.services
    model = request.query_params.get("model")
    target = model
    if model is not None:
        alias = services.resolver.aliases.get(model)
        target = alias.target if alias else model
    record = RequestRecord("admin:cache-purge", requested_model=model)
    services.history.begin(record)
    deleted = await services.cache.purge(target)
    record.status, record.http_status = "ok", 200
    services.history.finish(record)
    return _json({"purged": deleted, "model": target})
