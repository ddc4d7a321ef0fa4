"""``GET /admin/events``: one Server-Sent Events stream per dashboard page, carrying the fleet as it changes.

A page opens this one stream instead of polling each backend, operation or
request row. Every half second the process's in-memory view of the fleet (the
same as ``GET /admin/status``, plus the most recent operations) is rendered,
and sent only when it differs from the last frame; the newest request-history
rows are looked up once a second (one indexed query) and sent when they change.
Frames::

    event: fleet
    data: {"backends": [...], "aliases": [...], "alias_mismatches": [...], "operations": [...]}

    event: requests
    data: {"data": [row, ...]}          # the newest rows, as GET /admin/history/requests

A comment line every 15 s keeps proxies from closing a quiet stream. The
stream ends after ``_LIFETIME`` seconds so a long-open page does not pin one
connection forever; the page reconnects.

It also ends as soon as the server is told to stop. uvicorn finishes open
responses before it shuts down (and runs the lifespan's shutdown only after),
so an endless stream would hold a Ctrl-C or a SIGTERM until the browser tab
closes; the stream listens for the same signals, chained to uvicorn's handler.
"""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import InvalidRequest
from .status import fleet_snapshot

_TICK = 0.5  # seconds between looks at the in-memory fleet (operations push progress at most this often)
_REQUESTS_EVERY = 2  # ticks between history queries
_KEEPALIVE = 15.0
_LIFETIME = 300.0
_OPERATIONS = 50  # newest operations in each fleet frame
_ROWS = 25  # newest history rows in each requests frame


def _frame(event: str, payload: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def stopping(app) -> asyncio.Event:
    """Set when SIGINT or SIGTERM reaches this process (kept on the app; chained once, on first use)."""
    event = getattr(app.state, "events_stopping", None)
    if event is not None:
        return event
    event = app.state.events_stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous) -> None:
                loop.call_soon_threadsafe(event.set)
                if callable(previous):
                    previous(signum, frame)

            signal.signal(sig, handler)
        except ValueError:  # not the main thread (a server in a test thread): nothing to chain to
            break
    return event


def fleet_frame(services) -> bytes:
    snapshot = fleet_snapshot(services)
    snapshot["operations"] = [op.as_dict() for op in services.fleet.manager.list(limit=_OPERATIONS)]
    return orjson.dumps(snapshot)


async def stream(request: Request) -> Response:
    """GET /admin/events[?requests=0]: fleet frames, and request-history frames unless ``requests=0``."""
    unknown = set(request.query_params) - {"requests"}
    if unknown:
        raise InvalidRequest(f"Unknown parameter(s): {', '.join(sorted(unknown))}; valid: requests",
                             param=sorted(unknown)[0])  # fmt: skip
    with_requests = request.query_params.get("requests", "1") not in ("0", "false", "no")
    services = request.app.state.services
    stop = stopping(request.app)

    async def frames():
        last_fleet = last_rows = b""
        quiet_since = started = time.monotonic()
        tick = 0
        yield b"retry: 2000\n\n"
        while time.monotonic() - started < _LIFETIME and not stop.is_set():
            sent = False
            fleet = fleet_frame(services)
            if fleet != last_fleet:
                last_fleet = fleet
                yield _frame("fleet", fleet)
                sent = True
            if with_requests and tick % _REQUESTS_EVERY == 0:
                page = await services.history.list(limit=_ROWS)
                rows = orjson.dumps({"data": page["data"]})
                if rows != last_rows:
                    last_rows = rows
                    yield _frame("requests", rows)
                    sent = True
            now = time.monotonic()
            if sent:
                quiet_since = now
            elif now - quiet_since >= _KEEPALIVE:
                quiet_since = now
                yield b": keepalive\n\n"
            tick += 1
            try:
                await asyncio.wait_for(stop.wait(), _TICK)
            except TimeoutError:
                pass

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})  # fmt: skip
