"""HTTP plumbing shared by the backend adapters, and the one place httpx exceptions become ours.

Each backend gets one pooled ``httpx.AsyncClient``. Three timeouts apply:
connecting, waiting for the first byte of the answer (long, since a cold node may
be loading a model), and the idle gap between two complete lines (NDJSON) or events
(SSE) of a stream. httpx has a single read timeout for both of the last two, so they
are enforced here instead, with a cap on how long an unfinished line may grow.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import httpx
import orjson

from ..config import BackendConfig, TimeoutConfig
from ..errors import BackendError, BackendTimeout, BackendUnavailable, ProxyError
from ._transport import Body, PooledTransport

_ERROR_BODY_LIMIT = 64 * 1024


class UpstreamStatus(Exception):
    """A non-2xx answer, before the adapter maps it: status and the decoded error message."""

    def __init__(self, status: int, message: str, body: object) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body


def _error_message(raw: bytes) -> tuple[str, object]:
    """The message inside an error body: Ollama ``{"error": str}``, OpenAI/vLLM nested or flat."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:500].decode("utf-8", "replace").strip(), None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", "")), body
        if isinstance(err, str):
            return err, body
        if "message" in body:  # vLLM before 0.10.1: a flat {"object": "error", "message": ...}
            return str(body["message"]), body
        if "detail" in body:  # FastAPI-style servers
            return str(body["detail"]), body
    return raw[:500].decode("utf-8", "replace"), body


class Upstream:
    """A backend's base URL, pooled client and timeouts."""

    def __init__(self, config: BackendConfig, timeouts: TimeoutConfig) -> None:
        self.name = config.name
        self.timeouts = timeouts
        self.base = config.url.rstrip("/")
        url = httpx.URL(self.base)
        self.transport = PooledTransport(
            url.host,
            url.port or (443 if url.scheme == "https" else 80),
            ssl=ssl.create_default_context() if url.scheme == "https" else None,
            connect_timeout=timeouts.connect,
        )
        # identity: answers are relayed byte for byte, so they must not arrive compressed.
        self.headers = {"accept-encoding": "identity", "content-type": "application/json"}
        if config.api_key:
            self.headers["authorization"] = f"Bearer {config.api_key}"
        # Per path, the head of its POSTs up to the length, and the request its responses refer to.
        self._posts: dict[str, tuple[bytes, httpx.Request]] = {}
        self.client = httpx.AsyncClient(
            base_url=self.base,
            headers=self.headers,
            transport=self.transport,
            # read=None: first-byte and idle timeouts are enforced around each read below.
            timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=timeouts.connect, pool=None),
            trust_env=False,  # a proxy from the environment must not sit between us and a LAN node
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _map(self, exc: Exception, during: str) -> ProxyError:
        name = self.name
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return BackendUnavailable(f"backend {name!r} is unreachable ({type(exc).__name__}) while {during}")
        if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
            return BackendTimeout(f"backend {name!r} timed out while {during}")
        if isinstance(exc, httpx.HTTPError):
            return BackendError(f"backend {name!r} dropped the connection while {during} ({type(exc).__name__})")
        raise exc

    @asynccontextmanager
    async def _mapped(self, during: str):
        try:
            yield
        except (httpx.HTTPError, TimeoutError) as exc:
            raise self._map(exc, during) from exc

    async def get_json(self, path: str, timeout: float | None = None) -> object:
        """A small GET (tags, models, version); a non-2xx answer raises :class:`UpstreamStatus`."""
        return await self.small("GET", path, None, timeout)

    async def small(self, method: str, path: str, body: object, timeout: float | None = None) -> object:
        """A small request with a small JSON answer (show, health, delete); non-2xx raises :class:`UpstreamStatus`."""
        content = orjson.dumps(body) if body is not None else None
        async with self._mapped(f"requesting {path}"), asyncio.timeout(timeout or self.timeouts.connect * 2):
            resp = await self.client.request(method, path, content=content)
        if resp.status_code >= 300:
            message, body = _error_message(resp.content)
            raise UpstreamStatus(resp.status_code, message, body)
        try:
            return orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            raise BackendError(f"backend {self.name!r} answered {path} with invalid JSON") from None

    async def post(self, path: str, body: bytes, *, stream: bool) -> httpx.Response:
        """Send a POST and wait (up to first_byte) for the status line and headers.

        The caller owns the returned response and must close it. A non-2xx
        answer is read, closed and raised as :class:`UpstreamStatus`.
        """
        # Straight to the transport: the client's send() adds auth, cookie and redirect handling
        # that a fixed JSON POST to a backend never needs, for a noticeable cost per request; and
        # the head is built once per path, since only its length changes.
        prebuilt = self._posts.get(path)
        if prebuilt is None:
            template = httpx.Request("POST", self.base + path, headers=self.headers)
            prebuilt = self._posts[path] = (PooledTransport.head_prefix(template), template)
        try:  # what _mapped() does, without a generator-based context manager on every request
            async with asyncio.timeout(self.timeouts.first_byte):
                resp = await self.transport.send_prebuilt(prebuilt[0], body, prebuilt[1])
                if resp.status_code >= 300 or not stream:
                    try:
                        raw = await resp.aread()  # an error body, or a whole non-stream answer
                    finally:
                        await resp.aclose()
                    if resp.status_code >= 300:
                        message, err = _error_message(raw[:_ERROR_BODY_LIMIT])
                        raise UpstreamStatus(resp.status_code, message, err)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise self._map(exc, f"waiting for the first byte from {path}") from exc
        return resp

    async def chunks(self, resp: httpx.Response, *, sse: bool = False) -> AsyncIterator[bytes]:
        """The raw body of a streamed response, chunk by chunk as it arrives.

        The idle timeout counts from the last complete frame, an NDJSON line (or an SSE
        event, blank-line terminated, with ``sse``), not from the last byte: a backend that
        sends a space a second without ever finishing a line is idle. The bytes since the
        last frame end may not exceed ``max_line_bytes``.
        """
        # The transport's stream itself rather than aiter_raw(), whose re-chunking and byte counting
        # cost a few microseconds per chunk for nothing here; the response is closed below all the same.
        # From our own transport the pieces are taken as they are, without its async generator: one
        # frame less that every wait for the backend suspends and resumes.
        body = resp.stream
        direct = isinstance(body, Body)
        reader = None if direct else body.__aiter__()  # type: ignore[union-attr]
        # Every read happens in the request's task (routing reads the first chunk, the response the
        # rest), so the task the watchdog may cancel is looked up once.
        watchdog = _Watchdog(asyncio.get_running_loop(), self.timeouts.idle, asyncio.current_task())
        cap = self.timeouts.max_line_bytes
        partial = 0  # bytes received since the last complete frame
        tail = b""  # the end of the previous chunk, where an SSE terminator may have begun
        try:
            while True:
                watchdog.arm()
                try:
                    if direct:
                        chunk = body.ready()  # type: ignore[union-attr]
                        while chunk is None:
                            await body.wait()  # type: ignore[union-attr]
                            chunk = body.ready()  # type: ignore[union-attr]
                        if not chunk:
                            return
                    else:
                        chunk = await reader.__anext__()  # type: ignore[union-attr]
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if watchdog.fired:
                        watchdog.reader.uncancel()  # type: ignore[union-attr]
                        raise self._map(TimeoutError(), "streaming the answer") from None
                    raise
                except (httpx.HTTPError, TimeoutError) as exc:
                    raise self._map(exc, "streaming the answer") from exc
                if sse:
                    end = _event_end(chunk, tail)
                    tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
                else:
                    end = chunk.rfind(b"\n") + 1
                if end:
                    partial = len(chunk) - end
                    watchdog.disarm(progress=True)
                else:
                    partial += len(chunk)
                    watchdog.disarm(progress=False)
                if partial > cap:
                    what = "an SSE event" if sse else "a line"
                    raise BackendError(f"backend {self.name!r} sent {what} longer than {cap} bytes "
                                       "(timeouts.max_line_bytes) without ending it")  # fmt: skip
                yield chunk
        finally:
            watchdog.stop()
            await resp.aclose()

    async def lines(self, resp: httpx.Response) -> AsyncIterator[dict]:
        """NDJSON objects from a streamed response (Ollama), one at a time."""
        async with aclosing(self.batches(resp)) as batches:
            async for batch in batches:
                for line in batch:
                    yield line

    async def batches(self, resp: httpx.Response) -> AsyncIterator[list[dict]]:
        """NDJSON objects from a streamed response, as lists: every line completed by one chunk.

        A whole non-streamed answer (20 tokens: 21 lines) usually arrives in one chunk; passed on
        as one list it costs one step of each generator above this one instead of 21.
        """
        parts: list[bytes] = []  # the unfinished line, in pieces: joined once, not once per chunk
        decode = self._decode
        async with aclosing(self.chunks(resp)) as chunks:
            async for chunk in chunks:
                end = chunk.rfind(b"\n")  # not `in`: CPython 3.11's bytes `in` formats and drops a TypeError
                if end < 0:
                    parts.append(chunk)
                    continue
                if parts:
                    end += sum(map(len, parts))
                    parts.append(chunk)
                    chunk = b"".join(parts)
                    parts = []
                if end + 1 < len(chunk):
                    parts.append(chunk[end + 1 :])
                if chunk.find(b"\n") == end:  # one line, as paced tokens arrive: no split, no list to filter
                    line = chunk[:end] if end + 1 < len(chunk) else chunk
                    batch = [decode(line)] if line.strip() else []
                else:
                    batch = [decode(line) for line in chunk[: end + 1].split(b"\n") if line.strip()]
                if batch:
                    yield batch
        pending = b"".join(parts)
        if pending.strip():
            yield [decode(pending)]

    def _decode(self, line: bytes) -> dict:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise BackendError(f"backend {self.name!r} sent a line that is not JSON") from None
        if not isinstance(obj, dict):
            raise BackendError(f"backend {self.name!r} sent a line that is not a JSON object")
        return obj


def _event_end(chunk: bytes, tail: bytes) -> int:
    """Where the last SSE event in ``chunk`` ends (just past its blank line), 0 if none ends there.

    LF and CRLF framing both occur (vLLM: LF; sse-starlette servers: CRLF). ``tail``, the
    previous chunk's last bytes, catches a terminator split across two chunks.
    """
    lf, crlf = chunk.rfind(b"\n\n"), chunk.rfind(b"\n\r\n")
    end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
    if end or not tail:
        return end
    joint = tail + chunk[:2]
    lf, crlf = joint.rfind(b"\n\n"), joint.rfind(b"\n\r\n")
    end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
    return max(end - len(tail), 0)


class _Watchdog:
    """The idle timeout between complete frames, for the price of a clock read per chunk.

    ``asyncio.timeout`` around every read schedules and cancels a timer per chunk;
    here one timer per stream wakes up at most once per ``seconds``, and cancels the
    reading task only if it has spent that long in reads since the last frame ended.
    Time outside reads (the client being slow to take what was sent) does not count.
    """

    __slots__ = ("loop", "seconds", "reader", "task", "started", "waited", "handle", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, reader: asyncio.Task | None) -> None:
        self.loop = loop
        self.seconds = seconds
        self.reader = reader
        self.task: asyncio.Task | None = None
        self.started = 0.0  # when the current read began
        self.waited = 0.0  # seconds spent in earlier reads since the last complete frame
        self.handle: asyncio.TimerHandle | None = None
        self.fired = False

    def arm(self) -> None:
        """A read begins."""
        self.task = self.reader
        self.started = self.loop.time()
        if self.handle is None:
            self.handle = self.loop.call_at(self.started + self.seconds - self.waited, self._check)

    def disarm(self, progress: bool) -> None:
        """The read returned; ``progress``: it completed a frame."""
        self.task = None
        self.waited = 0.0 if progress else self.waited + self.loop.time() - self.started

    def _check(self) -> None:
        self.handle = None
        if self.task is None:
            return  # not waiting on a read; the next arm() starts a timer again
        left = self.seconds - self.waited - (self.loop.time() - self.started)
        if left > 0:
            self.handle = self.loop.call_later(left, self._check)
            return
        self.fired = True
        self.task.cancel()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
