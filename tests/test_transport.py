"""The upstream HTTP transport against a deliberately awkward server on loopback."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.backends._transport import PooledTransport


async def _server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await reader.readexactly(length)


def test_keep_alive_reuse_and_a_stale_connection_is_retried_once():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if len(connections) == 1:
            await _read_request(reader)  # second request reuses this connection
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok2")
            await writer.drain()
        writer.close()  # then the server drops it while it sits idle in the pool

    async def main():
        server, port = await _server(handler)
        transport = PooledTransport("127.0.0.1", port)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.post("/", content=b"{}")).text == "ok"
            assert (await client.post("/", content=b"{}")).text == "ok2"
            await asyncio.sleep(0.05)
            assert (await client.post("/", content=b"{}")).text == "ok"  # stale one replaced, not an error
        server.close()
        return len(connections)

    assert asyncio.run(main()) == 2


def test_chunked_body_streams_and_an_abandoned_response_closes_its_connection():
    async def main():
        seen_eof = asyncio.Event()

        async def handler(reader, writer):
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            if await reader.read(1) == b"":
                seen_eof.set()  # the client hung up: a backend would stop generating here
            writer.close()

        server, port = await _server(handler)
        transport = PooledTransport("127.0.0.1", port)
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/", content=b"{}")
        response = await transport.handle_async_request(request)
        first = await response.aiter_raw().__anext__()
        await response.aclose()
        await asyncio.wait_for(seen_eof.wait(), 2)
        server.close()
        return first

    assert asyncio.run(main()) == b"hello"


def test_a_refused_connection_is_an_httpx_connect_error():
    async def main():
        transport = PooledTransport("127.0.0.1", 9)  # discard port: nothing listens here
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(httpx.Request("POST", "http://127.0.0.1:9/", content=b"{}"))

    asyncio.run(main())
