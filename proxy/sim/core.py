"""Machinery shared by the simulated backends.

- :class:`SimApp` records every request and gives handlers a way to drop the
  connection (ASGI itself has no "reset this socket" message).
- :class:`Generation` runs one generation as an ASGI response while watching
  the client connection, so a client that goes away stops the generation and
  is counted, and pacing sleeps never outlive their client.
- :class:`SimBase` owns counters, the request log, the behaviour, the
  ``/_sim/`` control endpoints and the server thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .behavior import FAILURE_MODES, Behavior
from .server import ServerThread

log = logging.getLogger(__name__)

_JSON_KEY = "llm_proxy.sim.json"
_TRANSPORT_KEY = "llm_proxy.sim.transport"

# Graceful shutdown waits for open connections; generations are cut by stop(),
# this only bounds the wait for anything else that is still open.
_GRACEFUL_SHUTDOWN_S = 3


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class AbortConnection(Exception):
    """Raised when the server cannot reach the socket to reset it; uvicorn then closes it."""


def _find_transport(send: Send) -> asyncio.BaseTransport | None:
    # uvicorn's send is a bound method of its per-request cycle, which holds the
    # connection's transport. It is the only handle on the socket an ASGI app
    # gets; without it, die_mid_stream degrades to raising AbortConnection.
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


class SimApp(Starlette):
    """A Starlette app that buffers and records each request body before routing."""

    def __init__(
        self,
        *,
        on_request: Callable[[Scope, Any], None],
        gate: Callable[[Scope], Response | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._on_request = on_request
        self._gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        scope[_JSON_KEY] = parsed = parse_json(body)
        scope[_TRANSPORT_KEY] = _find_transport(send)
        self._on_request(scope, parsed[0])
        if self._gate is not None and (denied := self._gate(scope)) is not None:
            await denied(scope, receive, send)
            return

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await super().__call__(scope, replay, send)


def parse_json(body: bytes) -> tuple[Any, str | None]:
    """(parsed body or None when empty, decode error text or None)."""
    if not body.strip():
        return None, None
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError as exc:
        return None, str(exc)


def request_json(request: Request) -> tuple[Any, str | None]:
    """The body :class:`SimApp` already buffered and parsed for this request."""
    return request.scope.get(_JSON_KEY, (None, None))


class Output:
    """The response side of a :class:`Generation`: raw ASGI sends plus connection abort."""

    def __init__(self, send: Send, transport: asyncio.BaseTransport | None) -> None:
        self._send = send
        self._transport = transport
        self.started = False
        self.aborted = False
        # Set just before the client can see the end (last byte or reset): from then on the
        # generation is only bookkeeping, and counter reads wait for it (see SimBase._settled).
        self.ending = False

    async def start(self, status: int, media_type: str) -> None:
        headers = [(b"content-type", media_type.encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        self.ending = True
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def respond(self, status: int, body: bytes, media_type: str = "application/json") -> None:
        headers = [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True
        await self.finish(body)

    async def respond_json(self, status: int, content: Any, media_type: str = "application/json") -> None:
        await self.respond(status, orjson.dumps(content), media_type)

    def abort(self) -> None:
        """Drop the connection without finishing the response, like a crashed server."""
        self.aborted = True
        self.ending = True
        if self._transport is None:
            raise AbortConnection()
        self._transport.abort()


async def paced(events: Iterable[Any], behavior: Behavior) -> AsyncIterator[tuple[Any, bool]]:
    """Yield ``(event, is_last)`` after the ttft wait and between-token delays.

    An empty reply still waits ttft once (with ``event`` None), because a real
    node also spends prefill time before it says it is done.
    """
    items = list(events)
    delay = behavior.token_delay()
    if behavior.ttft > 0:
        await asyncio.sleep(behavior.ttft)
    if not items:
        return
    for i, item in enumerate(items):
        if i and delay:
            await asyncio.sleep(delay)
        yield item, i == len(items) - 1


async def hang_forever() -> None:
    """The "hang" failure: accept the request, never answer (cancelled when the client leaves)."""
    await asyncio.Event().wait()


async def stall(mode: str, behavior: Behavior, out: Output) -> None:
    """The stall failures (``STALL_FAILURES``): a stream that never completes its line or event.

    Runs until the client leaves (the generation is cancelled then). ``endless_line`` is
    paced only by the transport's flow control, as a real server's writes would be.
    """
    if mode == "trickle":
        while True:
            await out.write(b" ")
            await asyncio.sleep(behavior.trickle_interval)
    piece = b"x" * 65536
    while True:
        await out.write(piece)
        await asyncio.sleep(0)  # let the client's disconnect be noticed


Runner = Callable[[Output], Awaitable[bool]]


class Generation:
    """An ASGI response that runs ``runner`` while watching for client disconnect.

    ``runner(output)`` writes the response and returns True when the reply
    finished normally, False when it failed on purpose (error or abort).
    ``counted=False`` keeps it out of the generation counters (a model pull
    keeps its own) while still cutting it when the server stops.
    """

    def __init__(self, sim: SimBase, runner: Runner, *, counted: bool = True) -> None:
        self._sim = sim
        self._runner = runner
        self.counted = counted
        self._task: asyncio.Task | None = None
        self._output: Output | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        output = Output(send, scope.get(_TRANSPORT_KEY))
        self._output = output
        disconnected = asyncio.Event()

        async def watch() -> None:
            # With ASGI spec < 2.4 a send to a closed socket is silently dropped,
            # so only http.disconnect tells us the client is gone.
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        loop = asyncio.get_running_loop()
        self._task = task = asyncio.ensure_future(self._runner(output))
        watcher = asyncio.ensure_future(watch())
        self._sim._generation_started(self, loop)
        outcome = "failed"
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                succeeded = not task.cancelled() and task.exception() is None and task.result()
                outcome = "completed" if succeeded else "failed"
            elif output.aborted:
                outcome = "failed"
            else:
                outcome = "cancelled"
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if output.aborted and not disconnected.is_set():
                # Let uvicorn see the connection loss before we return, so it
                # does not try to answer the aborted request with a 500.
                await asyncio.wait({watcher}, timeout=1.0)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            self._sim._generation_finished(self, outcome)
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            raise exc  # AbortConnection or a bug: uvicorn logs it and closes the connection

    @property
    def ending(self) -> bool:
        return self._output is not None and self._output.ending

    def kill(self) -> None:
        """Server shutdown: cut the connection like a dying process would."""
        if self._output is not None and not self._output.aborted:
            try:
                self._output.abort()
            except AbortConnection:
                pass
        if self._task is not None:
            self._task.cancel()


class SimBase:
    """State and lifecycle shared by SimOllama and SimVLLM."""

    def __init__(self, behavior: Behavior | None, host: str, port: int) -> None:
        self.behavior = behavior if behavior is not None else Behavior()
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # notified whenever a generation is counted
        self._requests: list[tuple[str, str, Any, dict[str, str]]] = []
        self._active = 0
        self._max_active = 0
        self._cancelled = 0
        self._completed = 0
        self._failed = 0
        self._live: dict[Generation, asyncio.AbstractEventLoop] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's loop, once a generation ran on it
        self.app = SimApp(
            routes=self._routes() + self._control_routes(),
            on_request=self._record,
            gate=self._gate,
            exception_handlers=self._exception_handlers(),
        )
        self._server = ServerThread(self.app, host, port, timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)

    # ----------------------------------------------------------- subclass hooks

    def _routes(self) -> list[Route]:
        raise NotImplementedError

    def _gate(self, scope: Scope) -> Response | None:
        return None

    def _exception_handlers(self) -> dict:
        return {}

    # ----------------------------------------------------------- lifecycle

    def start(self) -> SimBase:
        self._server.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and cut in-flight generations; start() rebinds the port."""
        with self._lock:
            live = list(self._live.items())
        for generation, loop in live:
            try:
                loop.call_soon_threadsafe(generation.kill)
            except RuntimeError:  # loop already closed
                pass
        self._server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def host(self) -> str:
        return self._server.host

    # ----------------------------------------------------------- counters

    @property
    def requests(self) -> list[tuple[str, str, Any, dict[str, str]]]:
        return self._requests

    @property
    def active(self) -> int:
        with self._settled():
            return self._active

    @property
    def max_active(self) -> int:
        with self._settled():
            return self._max_active

    @property
    def cancelled(self) -> int:
        with self._settled():
            return self._cancelled

    @property
    def completed(self) -> int:
        with self._settled():
            return self._completed

    @property
    def failed(self) -> int:
        """Generations that ended in a scripted failure (not part of the brief's API, but handy)."""
        with self._settled():
            return self._failed

    def reset(self) -> None:
        """Forget requests and counters; models and behaviour stay as they are.

        Generations that already answered are counted first, so a test's reset is not
        undone by the previous test's last generation finishing its bookkeeping late.
        """
        with self._settled():
            del self._requests[:]
            self._max_active = self._active
            self._cancelled = self._completed = self._failed = 0

    def stats(self) -> dict[str, int]:
        with self._settled():
            return {
                "active": self._active,
                "max_active": self._max_active,
                "cancelled": self._cancelled,
                "completed": self._completed,
                "failed": self._failed,
                "requests": len(self._requests),
            }

    def _ending(self) -> bool:
        return any(g.counted and g.ending for g in self._live)

    @contextlib.contextmanager
    def _settled(self, timeout: float = 2.0):
        """Hold the lock once every generation whose client has seen the end is counted.

        A client has its whole answer (or its reset) a moment before the generation's
        bookkeeping runs on the server's loop; without this wait a test reading a
        counter right after its request would race that bookkeeping. On the server's
        own loop nothing can finish while we wait, so there it does not wait (the
        ``/_sim/stats`` handler waits asynchronously instead).
        """
        with self._lock:
            if not self._on_server_loop():
                self._ended.wait_for(lambda: not self._ending(), timeout)
            yield

    def _on_server_loop(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return loop in self._live.values() or loop is self._loop

    def _record(self, scope: Scope, parsed: Any) -> None:
        if scope["path"].startswith("/_sim/"):
            return  # the control plane is not traffic the proxy sent
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            self._requests.append((scope["method"], scope["path"], parsed, headers))

    def _generation_started(self, generation: Generation, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            self._live[generation] = loop
            if not generation.counted:
                return
            self._active += 1
            self._max_active = max(self._max_active, self._active)

    def _generation_finished(self, generation: Generation, outcome: str) -> None:
        with self._lock:
            self._live.pop(generation, None)
            if not generation.counted:
                return
            self._active -= 1
            if outcome == "completed":
                self._completed += 1
            elif outcome == "cancelled":
                self._cancelled += 1
            else:
                self._failed += 1
            self._ended.notify_all()

    # ----------------------------------------------------------- behaviour

    def _snapshot(self) -> Behavior:
        # copy, not dataclasses.replace: a field assigned directly may be invalid,
        # and that should surface as a scripted 500 (see _take_failure), not a crash.
        return copy.copy(self.behavior)

    def _take_failure(self) -> str | None:
        """The failure this request should suffer, counting down ``fail_times``."""
        with self._lock:
            behavior = self.behavior
            if behavior.fail is None:
                return None
            if behavior.fail_times is not None:
                if behavior.fail_times <= 0:
                    return None
                behavior.fail_times -= 1
            mode = behavior.fail
        if mode not in FAILURE_MODES:
            # Only reachable by assigning the attribute directly; fail loudly but in-protocol.
            log.warning("unknown sim failure mode %r, answering 500", mode)
            return "http_500"
        return mode

    # ----------------------------------------------------------- /_sim/ control plane

    def _control_routes(self) -> list[Route]:
        return [
            Route("/_sim/behavior", self._get_behavior, methods=["GET"]),
            Route("/_sim/behavior", self._patch_behavior, methods=["PATCH", "PUT"]),
            Route("/_sim/stats", self._get_stats, methods=["GET"]),
            Route("/_sim/reset", self._post_reset, methods=["POST"]),
        ]

    async def _get_behavior(self, request: Request) -> Response:
        return ORJSONResponse(self.behavior.to_dict())

    async def _patch_behavior(self, request: Request) -> Response:
        changes, error = request_json(request)
        if error is not None or not isinstance(changes, dict):
            return ORJSONResponse({"error": "body must be a JSON object of Behavior fields"}, status_code=400)
        try:
            if request.method == "PUT":
                self.behavior = Behavior(**changes)
            else:
                self.behavior.update(changes)
        except (TypeError, ValueError) as exc:
            return ORJSONResponse({"error": str(exc)}, status_code=400)
        return ORJSONResponse(self.behavior.to_dict())

    async def _settled_here(self) -> None:
        """What :meth:`_settled` waits for, from a handler on the server's own loop (which must keep running)."""
        for _ in range(200):
            with self._lock:
                if not self._ending():
                    return
            await asyncio.sleep(0.01)

    async def _get_stats(self, request: Request) -> Response:
        await self._settled_here()
        return ORJSONResponse(self.stats())

    async def _post_reset(self, request: Request) -> Response:
        await self._settled_here()
        self.reset()
        return ORJSONResponse(self.stats())
