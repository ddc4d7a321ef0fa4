"""A lean asyncio load generator, for what Locust does poorly on two cores.

    python -m loadtest.aioload --host URL --kind chat|stream --users N \\
        --warmup S --duration S [--ramp S] --out FILE

Same requests (the ``LOAD_*`` variables of ``locustfile.py``), entry names and output
(:mod:`loadtest.samples`) as :mod:`loadtest.locust_round`. Why it exists:

- The many-streams scenario holds 1000+ streams open at once. Locust would run 1000
  greenlets each driving ``requests``; httpx with one shared pool spends most of its time
  in httpcore's pool bookkeeping, which scans every connection on every request start and
  end (85% of the generator's CPU at 1000 streams, measured with py-spy). Here each user owns
  one keep-alive connection, parsed by httptools, on one uvloop event loop.
- It needs only the proxy's own dependencies (uvicorn[standard] brings uvloop and httptools),
  so the runner's smoke test runs where Locust is not installed (``--client asyncio``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
import orjson

from loadtest.samples import Recorder, round_arguments

TIMEOUT = float(os.environ.get("LOAD_TIMEOUT", "60"))


def chat_body(stream: bool, serial: int) -> bytes:
    """Mirrors ``locustfile.chat_body`` (which cannot be imported without Locust)."""
    prompt = os.environ.get("LOAD_PROMPT", "Write two sentences about load testing.")
    if os.environ.get("LOAD_UNIQUE", "") not in ("", "0"):
        prompt = f"{prompt} [{os.getpid()}-{serial}]"
    body: dict = {"model": os.environ.get("LOAD_CHAT_MODEL", "chat"), "messages": [{"role": "user", "content": prompt}]}
    max_tokens = int(os.environ.get("LOAD_MAX_TOKENS", "64"))
    if max_tokens > 0:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time, body pieces as they arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.events.put_nowait(("error", exc))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.events.put_nowait(("error", exc or ConnectionResetError("connection closed by the server")))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.events.put_nowait(("status", self.parser.get_status_code()))

    def on_body(self, body: bytes) -> None:
        self.events.put_nowait(("body", body))

    def on_message_complete(self) -> None:
        self.events.put_nowait(("end", None))

    # client side
    async def send(self, request: bytes) -> int:
        """Write a request and wait for its status line and headers."""
        assert self.transport is not None
        self.transport.write(request)
        kind, value = await self.events.get()
        if kind == "error":
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]

    async def pieces(self) -> AsyncIterator[bytes]:
        while True:
            kind, value = await self.events.get()
            if kind == "end":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Load:
    def __init__(self, host: str, recorder: Recorder) -> None:
        url = urlsplit(host)
        self.address = (url.hostname or "127.0.0.1", url.port or 80)
        self.recorder = recorder
        self.serials = itertools.count()
        self.open_streams = 0
        self.peak_open = 0
        auth = f"authorization: Bearer {os.environ['LOAD_API_KEY']}\r\n" if os.environ.get("LOAD_API_KEY") else ""
        self.head = (f"POST {url.path.rstrip('/')}/v1/chat/completions HTTP/1.1\r\nhost: {url.netloc}\r\n"
                     f"content-type: application/json\r\naccept: */*\r\n{auth}content-length: ")  # fmt: skip

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, *self.address)
        return conn

    def request(self, stream: bool) -> bytes:
        body = chat_body(stream, next(self.serials))
        return f"{self.head}{len(body)}\r\n\r\n".encode() + body

    async def chat(self, conn: Connection) -> None:
        started = time.perf_counter()
        status = await conn.send(self.request(False))
        body = b"".join([piece async for piece in conn.pieces()])
        ms = (time.perf_counter() - started) * 1000
        if status != 200:
            self.recorder.add("chat", ms, f"status {status}: {body[:200].decode(errors='replace')}")
        elif not orjson.loads(body)["choices"][0]["message"].get("content"):
            self.recorder.add("chat", ms, "empty answer")
        else:
            self.recorder.add("chat", ms)

    async def stream(self, conn: Connection) -> None:
        add = self.recorder.add
        started = time.perf_counter()
        status = await conn.send(self.request(True))
        add("chat-stream", (time.perf_counter() - started) * 1000, None if status == 200 else f"status {status}")
        last: float | None = None
        done = False
        error = None if status == 200 else f"status {status}"
        buffer = b""
        opened = status == 200
        if opened:
            self.open_streams += 1
            self.peak_open = max(self.peak_open, self.open_streams)
        try:
            async for piece in conn.pieces():
                buffer += piece
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if error is not None or not event.startswith(b"data: "):
                        continue
                    data = event[6:]
                    if data == b"[DONE]":
                        done = True
                        continue
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        error = str(chunk["error"].get("message", "error event"))
                    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        now = time.perf_counter()
                        if last is None:
                            add("TTFT", (now - started) * 1000)
                        else:
                            add("inter-token", (now - last) * 1000)
                        last = now
        finally:
            if opened:
                self.open_streams -= 1
        if error is None and not done:
            error = "stream ended without [DONE]"
        add("stream-total", (time.perf_counter() - started) * 1000, error)

    async def user(self, kind: str, delay: float) -> None:
        await asyncio.sleep(delay)
        step = self.stream if kind == "stream" else self.chat
        name = "stream-total" if kind == "stream" else "chat"
        conn: Connection | None = None
        while True:
            started = time.perf_counter()
            try:
                if conn is None or conn.closed:
                    conn = await self.connect()
                async with asyncio.timeout(TIMEOUT):
                    await step(conn)
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                self.recorder.add(name, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                await asyncio.sleep(0.05)  # a refused connection must not become a busy loop


async def run(args: argparse.Namespace) -> None:
    recorder = Recorder()
    load = Load(args.host, recorder)
    step = args.ramp / args.users if args.users else 0.0
    users = [asyncio.create_task(load.user(args.kind, i * step)) for i in range(args.users)]
    await asyncio.sleep(args.ramp + args.warmup)
    recorder.start()
    await asyncio.sleep(args.duration)
    recorder.stop()
    for task in users:
        task.cancel()
    await asyncio.gather(*users, return_exceptions=True)
    recorder.dump(args.out, users=args.users, client="asyncio", peak_open_streams=load.peak_open)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return round_arguments("python -m loadtest.aioload", ["chat", "stream"], argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.users > 500:
        from loadtest.procs import raise_open_files  # a descriptor per user, whoever started us

        raise_open_files()
    try:
        import uvloop
    except ImportError:  # the default loop works, it only costs the generator more CPU
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
