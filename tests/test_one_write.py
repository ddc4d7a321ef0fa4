"""OneWriteCycle (proxy/server.py): a sized answer's head and body leave in one write; a stream's head at once.

The cycle is driven directly with a transport that records its writes: over a real socket two
writes in a row usually arrive in one read, so a test through HTTP could not tell them apart.
The end-to-end tests cover the same code over loopback (every answer of the suite goes through it).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.flow_control import FlowControl

from proxy.server import HEAD_WITH_BODY, OneWriteCycle


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _cycle(transport: Recorder) -> OneWriteCycle:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "http_version": "1.1"}
    log = logging.getLogger("test")
    return OneWriteCycle(scope=scope, transport=transport, flow=FlowControl(transport), logger=log,  # type: ignore[arg-type]
                         access_logger=log, access_log=False, default_headers=[(b"server", b"t")],
                         message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
                         on_response=lambda: None)  # fmt: skip


def test_a_sized_answer_goes_out_in_one_write():
    asyncio.run(_a_sized_answer_goes_out_in_one_write())


async def _a_sized_answer_goes_out_in_one_write():
    transport = Recorder()
    cycle = _cycle(transport)
    body = b'{"ok":true}'
    await cycle.send({"type": "http.response.start", "status": 200,
                      "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})  # fmt: skip
    assert transport.writes == []  # held until the body
    await cycle.send({"type": "http.response.body", "body": body})
    assert len(transport.writes) == 1
    head, _, rest = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11" in head and b"server: t" in head
    assert rest == body
    assert cycle.response_complete and not transport.closed


def test_a_stream_gets_its_head_at_once_then_each_part():
    asyncio.run(_a_stream_gets_its_head_at_once_then_each_part())


async def _a_stream_gets_its_head_at_once_then_each_part():
    transport = Recorder()
    cycle = _cycle(transport)
    await cycle.send({"type": "http.response.start", "status": 200,
                      "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
    assert len(transport.writes) == 1 and b"transfer-encoding: chunked" in transport.writes[0]
    await cycle.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert transport.writes[1:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]
    assert cycle.response_complete


def test_a_body_shorter_than_its_length_is_still_refused():
    asyncio.run(_a_body_shorter_than_its_length_is_still_refused())


async def _a_body_shorter_than_its_length_is_still_refused():
    transport = Recorder()
    cycle = _cycle(transport)
    await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    try:
        await cycle.send({"type": "http.response.body", "body": b"abc"})
    except RuntimeError as exc:
        assert "shorter than Content-Length" in str(exc)
    else:
        raise AssertionError("a short body must fail as it does in uvicorn")


def test_a_stream_whose_first_part_is_ready_sends_its_head_with_it():
    asyncio.run(_a_stream_whose_first_part_is_ready_sends_its_head_with_it())


async def _a_stream_whose_first_part_is_ready_sends_its_head_with_it():
    transport = Recorder()
    cycle = _cycle(transport)
    await cycle.send({"type": "http.response.start", "status": 200, HEAD_WITH_BODY: True,
                      "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
    assert transport.writes == []
    await cycle.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert transport.writes[1:] == [b"0\r\n\r\n"]
