"""Model pulls, deletes, sync and activation, and the operations they run as.

Long work answers ``202`` with the operation(s) at once; follow them with
``GET /admin/operations/{id}`` or the SSE stream ``/events``. What each
operation does is in :mod:`proxy.operations`; this module only reads requests
and shapes answers.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import InvalidRequest
from ..operations.fleet import Fleet
from ..operations.hf_pulls import SOURCES
from ..operations.manager import check_filters
from ..operations.model import ACTIVE
from ..streaming import read_json
from .events import stopping

HEARTBEAT = 4.5  # seconds: an event at least every 5 s, even when nothing changed


def json_response(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def fleet_of(request: Request) -> Fleet:
    return request.app.state.services.fleet


async def current_fleet(request: Request) -> Fleet:
    """The fleet with what other proxy processes changed applied, so a read after their write sees it."""
    fleet = fleet_of(request)
    await fleet.catch_up()
    return fleet


async def read_body(request: Request, *, optional: bool = False) -> dict:
    """The JSON object in the body; ``{}`` for an empty body when ``optional``."""
    limit = request.app.state.services.config.server.max_body_bytes
    return await read_json(request.receive, request.scope["headers"], limit, optional=optional)


def flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false", param=name)
    return value


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model is required (a non-empty string)", param="model")
    return model.strip()


def _listing(ops) -> dict:
    return {"object": "list", "data": [op.as_dict() for op in ops]}


# --- models -------------------------------------------------------------------------------------


async def pull(request: Request) -> Response:
    """POST /admin/models/pull {model, nodes: [..] | "all" | "auto", force?} -> 202, one operation per node.

    With ``"source": "huggingface"`` (and ``revision?``, ``confirm?``): through the vLLM nodes' agents."""
    body = await read_body(request)
    fleet = await current_fleet(request)
    source = body.get("source", "ollama")
    if source not in SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}", param="source")
    if source == "huggingface":
        ops = await fleet.pull_hf(_model(body), body.get("nodes", "all"), revision=body.get("revision", "main"),
                                  confirm=flag(body, "confirm"), force=flag(body, "force"))  # fmt: skip
        listing = _listing(ops)
    else:
        listing = _listing(fleet.pull(_model(body), body.get("nodes", "all"), force=flag(body, "force")))
    await fleet.settle()  # as submitted, not as it stands after the write
    return json_response(listing, 202)


async def delete_model(request: Request) -> Response:
    """DELETE /admin/models/{model} {nodes: [..] | "all", force?}: removes it, waits for the deletes."""
    body = await read_body(request)
    fleet = await current_fleet(request)
    ops = await fleet.delete_model(request.path_params["model"], body.get("nodes"), force=flag(body, "force"),
                                   source=body.get("source"))  # fmt: skip
    return json_response(_listing(ops))


async def sync(request: Request) -> Response:
    """POST /admin/models/sync {dry_run?, skip_existing?, no_download?, manifest_path?}."""
    body = await read_body(request, optional=True)
    unknown = set(body) - {"dry_run", "skip_existing", "no_download", "manifest_path"}
    if unknown:
        raise InvalidRequest(f"Unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    path = body.get("manifest_path")
    if path is not None and (not isinstance(path, str) or not path):
        raise InvalidRequest("manifest_path must be a path", param="manifest_path")
    fleet = await current_fleet(request)
    answer = await fleet.sync(dry_run=flag(body, "dry_run"), skip_existing=flag(body, "skip_existing"),
                              no_download=flag(body, "no_download"), manifest_path=path)  # fmt: skip
    await fleet.settle()
    return json_response(answer, 200 if answer["dry_run"] else 202)


async def activate(request: Request) -> Response:
    """POST /admin/models/activate {alias, model, pull?, unload_old?, served_name?} -> 202, one operation."""
    body = await read_body(request)
    fleet = await current_fleet(request)
    plan = await fleet.activator.plan(body)
    answer = fleet.activator.submit(plan, body).as_dict()
    await fleet.settle()
    return json_response(answer, 202)


# --- operations ---------------------------------------------------------------------------------


async def list_operations(request: Request) -> Response:
    """GET /admin/operations?state=&node=&kind=&model=&limit= (newest first)."""
    query = request.query_params
    unknown = set(query) - {"state", "node", "kind", "model", "limit"}
    if unknown:
        raise InvalidRequest(f"Unknown filter(s): {', '.join(sorted(unknown))}; valid: state, node, kind, model, "
                             "limit", param=sorted(unknown)[0])  # fmt: skip
    check_filters(query.get("state"), query.get("kind"))
    try:
        limit = int(query.get("limit", 100))
    except ValueError:
        raise InvalidRequest("limit must be an integer", param="limit") from None
    ops = (await current_fleet(request)).manager.list(state=query.get("state"), node=query.get("node"), kind=query.get("kind"),
                                         model=query.get("model"), limit=min(max(limit, 1), 1000))  # fmt: skip
    return json_response(_listing(ops))


async def get_operation(request: Request) -> Response:
    return json_response((await current_fleet(request)).manager.get(request.path_params["id"]).as_dict())


async def cancel_operation(request: Request) -> Response:
    """DELETE /admin/operations/{id}: cancels, and answers once it has stopped (or after a few seconds)."""
    manager = (await current_fleet(request)).manager
    op = await manager.cancel(request.path_params["id"])
    try:
        await manager.wait(op.id, timeout=5.0)
    except TimeoutError:
        pass
    return json_response(op.as_dict())


async def retry_operation(request: Request) -> Response:
    """POST /admin/operations/{id}/retry: runs a failed, cancelled or interrupted operation again (same id)."""
    fleet = await current_fleet(request)
    answer = (await fleet.manager.retry(request.path_params["id"])).as_dict()
    await fleet.settle()
    return json_response(answer, 202)


async def _next(queue: asyncio.Queue, stopped: asyncio.Future) -> dict | None:
    """The next snapshot; None after HEARTBEAT seconds without one, or once the server stops."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait((getter, stopped), timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()  # the queue keeps an item that arrives meanwhile: get() takes it only when it wakes
    return None


def _frame(snapshot: dict) -> bytes:
    return b"data: " + orjson.dumps(snapshot) + b"\n\n"


async def operation_events(request: Request) -> Response:
    """GET /admin/operations/{id}/events: SSE, one ``data:`` frame per change, ending with the operation.

    It also ends when the server is told to stop (as ``/admin/events`` does): uvicorn waits for open
    responses before it shuts down, and a pull can run for an hour. The follower reconnects to the
    next server, where the operation reads ``interrupted`` or still runs on another process.
    """
    manager = (await current_fleet(request)).manager
    op_id = request.path_params["id"]
    op = manager.get(op_id)
    stop = stopping(request.app)
    queue = manager.subscribe(op_id)  # before the first frame, so no change falls in between

    async def frames():
        stopped = asyncio.ensure_future(stop.wait())
        try:
            snapshot = op.as_dict()
            yield _frame(snapshot)
            while snapshot["state"] in ACTIVE:
                news = await _next(queue, stopped)
                if stopped.done():
                    break
                snapshot = news if news is not None else op.as_dict()
                yield _frame(snapshot)
        finally:
            stopped.cancel()
            manager.unsubscribe(op_id, queue)

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})  # fmt: skip
