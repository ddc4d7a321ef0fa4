"""Running the proxy under uvicorn: the listening socket, the options, logging, and client timeouts.

``llm-proxy serve``, ``llm-proxy demo`` and the test servers (:class:`proxy.sim.ServerThread`)
all start uvicorn from :func:`uvicorn_options`, so they run the same protocol class and log
the same way.

uvicorn times out idle keep-alive connections but not a client that is slow to send a
request: one that sends its head a byte at a time, or announces a body that never comes,
holds its connection (and its memory) for ever. :class:`TimedHttpProtocol` is uvicorn's
httptools protocol with two more deadlines, ``server.header_timeout`` from the first byte
of a request to the end of its head, and ``server.body_timeout`` from there to the end of
its body. When one passes, the client gets a ``408`` with an OpenAI-shaped body and
``connection: close`` while no response has started, and the connection is closed.
A new connection that sends nothing at all within ``header_timeout`` is closed without
an answer: no request was made, so there is nothing to answer (uvicorn treats an idle
keep-alive connection the same way).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import logging.config
import socket
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from .config import Config
from .errors import RequestTimeout

log = logging.getLogger("llm_proxy.server")

_NONE, _OPENED, _HEAD, _BODY = 0, 1, 2, 3  # what a connection is waiting for from its client
_WHAT = {_HEAD: "request head", _BODY: "request body"}

# Loggers that are noisy or unsafe below these levels, whatever --log-level says: httpx and
# httpcore log every request to a backend (every health probe) at INFO, and aiosqlite logs
# SQL statements with their parameters (API keys among them) at DEBUG.
_QUIET = {"httpx": "WARNING", "httpcore": "WARNING", "aiosqlite": "INFO"}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _timeout_response(message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = orjson.dumps(RequestTimeout(message).body())
    head = [STATUS_LINE[RequestTimeout.status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class _Held:
    """Stands in for the transport while uvicorn renders a response head, keeping the bytes."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)


class _Prefixed:
    """The real transport, with the held head written in front of the next write (one ``write()``)."""

    __slots__ = ("transport", "head")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        self.transport.write(self.head + data)

    def __getattr__(self, name: str) -> Any:  # close(), is_closing(): the real transport's
        return getattr(self.transport, name)


# In an ``http.response.start`` message: the app sends its first body part right after, so the
# head may wait for it (proxy/streaming.py's SSEResponse, whose first frame is already read).
HEAD_WITH_BODY = "llm_proxy.head_with_body"


def _sized(message) -> bool:
    if message.get(HEAD_WITH_BODY):
        return True
    for name, _ in message.get("headers", ()):
        if name.lower() == b"content-length":
            return True
    return False


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, writing a response's head together with its first body part.

    uvicorn writes the head as soon as the app sends ``http.response.start``: two ``write()``
    calls per answer, and on a loopback or LAN client two wake-ups. Here the head of an answer
    with a ``content-length`` (its whole body is ready: it follows at once) waits for the
    ``http.response.body`` and goes out in the same write. A streamed answer's head is written
    at once as before (its first part may take a while, and the client should see the status
    meanwhile), unless the app says its first part follows at once (:data:`HEAD_WITH_BODY`). Everything else (validation of headers, framing, keep-alive, completion) is
    uvicorn's own code, run unchanged on the held bytes.
    """

    _held: bytes | None = None

    async def send(self, message) -> None:
        if not self.response_started and message["type"] == "http.response.start" and _sized(message):
            transport, held = self.transport, _Held()
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._held = b"".join(held.parts)
            return
        head = self._held
        if head is None:
            await super().send(message)
            return
        self._held = None
        transport = self.transport
        self.transport = _Prefixed(transport, head)  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with deadlines for the request head and body.

    One timer per connection, not one per request: a phase change only moves the
    deadline, and the timer, when it fires early, sleeps on until the current one.
    A keep-alive connection costs a timer wake-up per ``header_timeout`` at most.
    """

    def __init__(self, *args: Any, header_timeout: float = 10.0, body_timeout: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self._phase = _NONE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _arm(self, phase: int, seconds: float) -> None:
        self._phase = phase
        self._deadline = self.loop.time() + seconds
        if self._timer is not None:
            if self._timer_at <= self._deadline:
                return  # it fires first and then waits on for the rest
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = self.loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._phase == _NONE or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._expire)
            return
        cycle = self.cycle
        if (self._phase == _HEAD and cycle is not None and not cycle.response_complete) or (
            self._phase == _BODY and self.pipeline
        ):
            # A pipelined request, behind a response still being sent (uvicorn stops reading
            # meanwhile): its time starts when that response is done, which is later than this.
            self._arm(self._phase, self.header_timeout if self._phase == _HEAD else self.body_timeout)
            return
        phase, self._phase = self._phase, _NONE
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if phase == _OPENED:
            log.debug("%s sent nothing within %gs; closing", client, self.header_timeout)
        elif phase == _HEAD or not (cycle is not None and cycle.response_started):
            seconds = self.header_timeout if phase == _HEAD else self.body_timeout
            key = "server.header_timeout" if phase == _HEAD else "server.body_timeout"
            log.debug("%s did not send its %s within %gs; answering 408", client, _WHAT[phase], seconds)
            message = f"The {_WHAT[phase]} did not arrive within {seconds:g}s ({key}); closing the connection."
            if cycle is not None and phase == _BODY:
                # The app may be waiting in receive(): it hears a disconnect, and anything it
                # sends after this is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(_timeout_response(message, self.server_state.default_headers))
        else:
            log.debug("%s did not send its request body within %gs; closing", client, self.body_timeout)
        self.transport.close()

    # --- the connection and parser callbacks where a phase starts or ends -----------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(_OPENED, self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _NONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(_HEAD, self.header_timeout)

    def on_headers_complete(self) -> None:
        self._arm(_BODY, self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _NONE
        super().on_message_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.__class__ = OneWriteCycle  # created by uvicorn's on_headers_complete; not started yet
        super()._start_asgi_task(cycle, app)


# --- the listening socket -----------------------------------------------------------------------


class BindError(OSError):
    """The address cannot be listened on (in use, not ours, no permission); the message names it."""


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), before anything else starts.

    Bound by us rather than by uvicorn, so that a port in use fails at once, before
    the database is opened and the backends are probed, and so that the port is
    listening by the time anything says it is.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP, and
    # without it every keep-alive request waits out a delayed ACK (about 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise BindError(f"cannot listen on {where}: {reason}") from None
    sock.setblocking(False)
    sock.set_inheritable(True)  # worker processes serve the same socket
    return sock


# --- logging ------------------------------------------------------------------------------------


def logging_config(level: str = "info") -> dict:
    """The ``logging.config`` dict for the proxy's own process and for every uvicorn worker.

    uvicorn applies it in each worker it spawns, so with ``--workers N`` every line still
    has a timestamp, level and logger name, and ``llm_proxy`` logs at ``level``.
    """
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            # uvicorn expects these two names (it sets use_colors on them when asked).
            "default": {"format": LOG_FORMAT},
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(asctime)s %(levelname)s %(name)s: %(client_addr)s - "%(request_line)s" %(status_code)s',
                "use_colors": False,
            },
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"},
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "llm_proxy": {"level": level},
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            **{name: {"level": floor if _rank(floor) > _rank(level) else level} for name, floor in _QUIET.items()},
        },
    }


def _rank(level: str) -> int:
    return logging.getLevelName(level)


def configure_logging(level: str = "info") -> None:
    """Configure this process's logging as :func:`logging_config` describes (CLI commands without uvicorn)."""
    logging.config.dictConfig(logging_config(level))


# --- uvicorn ------------------------------------------------------------------------------------


def protocol_for(config: Config) -> functools.partial:
    """The HTTP protocol factory with the configured client timeouts (picklable, for worker processes)."""
    return functools.partial(
        TimedHttpProtocol, header_timeout=config.server.header_timeout, body_timeout=config.server.body_timeout
    )


def uvicorn_options(
    config: Config, *, log_level: str = "info", access_log: bool = False, configure_logging: bool = True
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``, the same for ``serve``, ``demo`` and the tests.

    ``configure_logging=False`` leaves the process's logging alone (a server in a test
    thread must not reconfigure the test runner's logging).
    """
    return {
        "host": config.server.host,
        "port": config.server.port,
        "http": protocol_for(config),
        "loop": "uvloop",
        "log_level": log_level,
        "access_log": access_log,
        "log_config": logging_config(log_level) if configure_logging else None,
        "timeout_graceful_shutdown": 30,
    }


def run(app: Any, config: Config, sock: socket.socket, *, workers: int = 1, **options: Any) -> bool:
    """Serve ``app`` on the already bound ``sock`` until a signal stops it; False if it never started.

    With ``workers > 1``, ``app`` must be an import string naming an app factory (each
    worker process builds its own app); the workers share the socket.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    settings = {**uvicorn_options(config, **options), "workers": workers}
    # uvicorn says where it listens only when it binds the socket itself.
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d%s", host, port, f" with {workers} worker processes" if workers > 1 else "")
    if workers > 1:
        Multiprocess(uvicorn.Config(app, factory=True, **settings), sockets=[sock]).run()
        return True
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    server.run(sockets=[sock])
    return server.started
