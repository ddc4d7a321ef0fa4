"""Client-side plumbing: reading request bodies, SSE responses, and noticing a client that left.

A client that disconnects must stop the backend from generating. The ASGI
server tells us with an ``http.disconnect`` message on ``receive``; a small
watcher task waits for it and cancels the request's task, which closes the
upstream connection on its way out (Ollama and vLLM both abort generation when
their client goes away).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import orjson

from .errors import BodyTooLarge, ClientGone, InvalidRequest, ProxyError, internal_error, sse_error_event
from .server import HEAD_WITH_BODY

log = logging.getLogger("llm_proxy")


async def read_json(receive, headers: list[tuple[bytes, bytes]], limit: int, *, optional: bool = False) -> dict:
    """The request body as a JSON object, refusing more than ``limit`` bytes; ``{}`` if empty and ``optional``."""
    declared = next((value for name, value in headers if name == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Request body of {int(declared)} bytes is larger than the limit of {limit} bytes.")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("The client disconnected while sending the request body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not raw.strip() and optional:
        return {}
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


class DisconnectWatch:
    """Cancels the current task if the client disconnects while the block runs.

    Use it around work that waits on a backend; afterwards ``disconnected``
    tells whether the work was cut short for that reason.
    """

    def __init__(self, receive) -> None:
        self.receive = receive
        self.disconnected = False
        self._task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self._task is not None:
                    self._task.cancel()
                return

    def __enter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._watcher.cancel()  # type: ignore[union-attr]
        if self.disconnected and exc_type is asyncio.CancelledError:
            self._task.uncancel()  # type: ignore[union-attr]
            return True  # the client is gone; nothing is left to answer
        return False


class SSEResponse:
    """Streams SSE frames to the client as they come; a failure mid-way becomes an error event.

    Once the status line is sent nothing can be retried, so this never raises a
    :class:`ProxyError`: it writes ``data: {"error": ...}`` and closes.
    """

    media_type = b"text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]],
                 on_done: Callable[[str, int, ProxyError | None], None] | None = None,
                 error_event: Callable[[ProxyError], bytes] = sse_error_event) -> None:  # fmt: skip
        self.frames = frames
        self.headers = headers
        self.error_event = error_event  # the client API's shape for an error after the first byte
        self.status = "ok"  # ok, error or cancelled, for whoever records the request afterwards
        self.error: ProxyError | None = None
        self.on_done = on_done  # called once with (status, 200, error) when the stream is over
        self._reported = False

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._send(scope, receive, send)
        except BaseException:
            self.status = "cancelled"  # the server gave up on the connection (shutdown, client reset)
            raise
        finally:
            self._report()

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            if self.on_done is not None:
                self.on_done(self.status, 200, self.error)

    async def _send(self, scope, receive, send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                # The first frame was read before this response was made (backends.primed, a cached
                # answer): the server may write the head with it, one write instead of two.
                HEAD_WITH_BODY: True,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),  # tell nginx-like fronts not to buffer the stream
                    *self.headers,
                ],
            }
        )
        tail = b""
        with DisconnectWatch(receive) as watch:
            try:
                async for frame in self.frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
            except ProxyError as exc:
                self.status, self.error, tail = "error", exc, self.error_event(exc)
            except OSError:  # the server could not write: the client went away
                self.status = "cancelled"
                return
            except Exception as exc:
                # One line per failed stream, as for any unexpected error (middleware.UnexpectedErrors)
                request_id = scope.get("state", {}).get("request_id", "-")
                log.error("request %s: stream failed after it started: %s: %s", request_id, type(exc).__name__, exc)
                log.debug("traceback of request %s", request_id, exc_info=exc)
                self.status, self.error = "error", internal_error()
                tail = self.error_event(self.error)
            finally:
                await self.frames.aclose()  # type: ignore[attr-defined]
        if watch.disconnected:
            self.status = "cancelled"
            return
        # Reported before the last byte goes out, so a client that has its whole answer finds the
        # request already in the history and the metrics.
        self._report()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
