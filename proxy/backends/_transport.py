"""An httpx transport for talking HTTP/1.1 to one backend: keep-alive connections parsed by httptools.

httpx stays the interface (requests, responses, exceptions); this replaces only
httpcore underneath. Profiles showed httpcore's pool as the proxy's largest
cost under load: it walks every pooled connection, with a ``poll()`` each, when
any request starts or ends (quadratic in connections), and h11 validates and
writes headers and body separately. Here an idle connection is popped from a
list, the request goes out in one ``write()``, and the response is parsed by
httptools (the C parser uvicorn uses) as bytes arrive.

The rules that keep it correct: a connection goes back to the pool only after
its response was read to the end and the server did not ask to close it; a
response abandoned half-way closes its connection (which is also what makes a
backend stop generating); a request on a reused connection that the server had
already closed before answering is retried once on a new connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import httptools
import httpx

_HIGH_WATER = 1 << 20  # stop reading the socket when this much body is waiting for the consumer
_SKIP_HEADERS = frozenset({b"connection", b"transfer-encoding"})


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "parser", "status", "headers", "chunks", "buffered", "complete", "closed",
                 "error", "waiter", "head_done", "keep_alive", "idle_since", "paused", "_name", "_value")  # fmt: skip

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future | None = None
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.head_done = False
        self.keep_alive = True
        self.paused = False

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"invalid HTTP response from the backend: {exc}")
            self.close()
        self._wake()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = httpx.RemoteProtocolError("the backend closed the connection before the response ended")
        self._wake()

    def pause_writing(self) -> None:  # requests are small; nothing to hold back
        pass

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if not body:
            return  # an empty piece would read as the end in Body.ready()
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # --- used by the transport -------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wait(self) -> asyncio.Future:
        """A future that ``_wake`` resolves when bytes, the end or an error arrive: await it.

        A plain future rather than a coroutine around one: a stream waits here once per chunk, and a
        coroutine would be one more frame to leave and re-enter every time. A waiter left behind (done,
        or cancelled with a reader that left) is harmless: ``_wake`` skips a done one, the next wait
        replaces it.
        """
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        return waiter

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Body(httpx.AsyncByteStream):
    def __init__(self, connection: _Connection, pool: PooledTransport) -> None:
        self.connection = connection
        self.pool = pool
        self.done = False

    async def __aiter__(self):
        conn = self.connection
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                break
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait()
        self.done = True
        self.pool.release(conn)

    def ready(self) -> bytes | None:
        """The next piece of the body if one is here, ``b""`` at its end, None while it must be waited
        for (:meth:`wait`); raises the connection's error. What ``__aiter__`` does, for a reader that
        would rather not stack one more async generator under every await (``Upstream.chunks``)."""
        conn = self.connection
        if conn.chunks:
            return conn.take()
        if conn.complete:
            if not self.done:
                self.done = True
                self.pool.release(conn)
            return b""
        if conn.error is not None:
            raise conn.error
        return None

    def wait(self) -> asyncio.Future:
        return self.connection.wait()

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.connection.close()  # abandoned half-way: the connection cannot be reused


class PooledTransport(httpx.AsyncBaseTransport):
    def __init__(self, host: str, port: int, *, ssl=None, connect_timeout: float = 5.0,
                 max_idle: int = 256, idle_expiry: float = 60.0) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self._open.add(conn)
        return conn

    def _reusable(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_expiry:
                return conn
            conn.close()
            self._open.discard(conn)
        return None

    def release(self, conn: _Connection) -> None:
        if conn.closed or not conn.keep_alive or len(self._idle) >= self.max_idle:
            conn.close()
            self._open.discard(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    @staticmethod
    def _head(request: httpx.Request, length: int) -> bytes:
        target = request.url.raw_path
        lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            if name.lower() in _SKIP_HEADERS or name.lower() == b"content-length":
                continue
            lines += [name, b": ", value, b"\r\n"]
        if length or request.method in ("POST", "PUT", "PATCH"):
            lines += [b"content-length: ", str(length).encode(), b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    @classmethod
    def head_prefix(cls, request: httpx.Request) -> bytes:
        """A request's head up to its ``content-length`` value, for :meth:`send_prebuilt`."""
        head = cls._head(request, 0)
        marker = b"content-length: 0\r\n\r\n"
        assert head.endswith(marker), "a body-carrying method always gets a content-length"
        return head[: -len(marker)] + b"content-length: "

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        return await self._exchange(self._head(request, len(body)) + body, request)

    async def send_prebuilt(self, prefix: bytes, body: bytes, request: httpx.Request) -> httpx.Response:
        """Send ``prefix`` (from :meth:`head_prefix`), the body's length and the body, in one write.

        For the POSTs every generation makes: their head differs only in its length, so
        building an ``httpx.Request`` (URL parsing, header normalizing) each time bought
        nothing. ``request`` is the template the response refers to (its body is not this one).
        """
        return await self._exchange(b"%s%d\r\n\r\n%s" % (prefix, len(body), body), request)

    async def _exchange(self, payload: bytes, request: httpx.Request) -> httpx.Response:
        for attempt in range(2):
            conn = self._reusable() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            conn.reset()
            try:
                conn.transport.write(payload)  # type: ignore[union-attr]
                while not conn.head_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait()
            except httpx.RemoteProtocolError:
                conn.close()
                self._open.discard(conn)
                if reused and not conn.status:
                    continue  # the server closed this idle connection as we sent: try a fresh one
                raise
            except BaseException:
                conn.close()  # cancelled (a timeout, a client that left) mid-request: not reusable
                self._open.discard(conn)
                raise
            headers = [(k, v) for k, v in conn.headers if k.lower() not in _SKIP_HEADERS]
            return httpx.Response(conn.status, headers=headers, stream=Body(conn, self), request=request)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
