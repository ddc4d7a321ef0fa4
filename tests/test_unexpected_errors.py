"""An exception nobody expected: one OpenAI-shaped 500, one log line, and the connection lives on.

The proxy runs in a thread of the test process, so patching a translator here makes
the running proxy fail exactly where a real bug would.
"""

from __future__ import annotations

import http.client
import json
import logging
from urllib.parse import urlsplit

import pytest

from proxy.middleware import UnexpectedErrors
from proxy.sim import ServerThread
from proxy.translate import ollama_chat
from tests.support import backends_config, running_proxy

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "chat", "messages": MSG}


@pytest.fixture(scope="module")
def proxy_url(ollama, vllm):
    config = {**backends_config(ollama, vllm), "cache": {"mode": "off"}}
    with running_proxy(config) as server:
        yield server.url


class Connection:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
        self.conn.connect()
        self.sock = self.conn.sock

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes, dict]:
        payload = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=payload, headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        assert self.conn.sock is self.sock, "the keep-alive connection was closed"
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}

    def close(self) -> None:
        self.conn.close()


def _boom(*args, **kwargs):
    raise RuntimeError("translator exploded")


def _problems(caplog) -> list[logging.LogRecord]:
    # Where a failing request is reported: our top-level logger, or uvicorn's traceback. Other
    # proxies of the session (their health rounds in their own threads) may log meanwhile.
    return [r for r in caplog.records
            if r.levelno >= logging.WARNING and (r.name == "llm_proxy" or r.name.startswith("uvicorn"))]  # fmt: skip


def test_unexpected_exception_is_one_500_one_line_and_the_connection_survives(proxy_url, monkeypatch, caplog):
    connection = Connection(proxy_url)
    try:
        assert connection.request("POST", "/v1/chat/completions", CHAT)[0] == 200
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            monkeypatch.setattr(ollama_chat, "chat_request", _boom)
            status, data, headers = connection.request("POST", "/v1/chat/completions", CHAT)
            monkeypatch.undo()
        assert status == 500
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "internal_error"
        assert "exploded" not in error["message"]  # the exception's text stays in the log
        request_id = headers["x-request-id"]
        assert request_id

        problems = _problems(caplog)
        assert len(problems) == 1, [r.getMessage() for r in problems]
        line = problems[0]
        assert line.levelno == logging.ERROR
        assert request_id in line.getMessage()
        assert "RuntimeError: translator exploded" in line.getMessage()
        assert "\n" not in line.getMessage() and line.exc_info is None  # no traceback at WARNING or above
        assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)  # it is there at DEBUG

        # the same connection serves the next request
        status, data, _ = connection.request("POST", "/v1/chat/completions", CHAT)
        assert status == 200, data
    finally:
        connection.close()


def test_exception_mid_stream_ends_the_stream_with_an_error_event_and_one_line(proxy_url, monkeypatch, caplog):
    real_feed = ollama_chat.ChatStream.feed
    calls = {"n": 0}

    def feed_then_fail(self, line):
        calls["n"] += 1
        if calls["n"] > 1:  # after the first frame went out: the response has started
            raise KeyError("lost")
        return real_feed(self, line)

    connection = Connection(proxy_url)
    try:
        with caplog.at_level(logging.INFO):
            monkeypatch.setattr(ollama_chat.ChatStream, "feed", feed_then_fail)
            status, data, headers = connection.request(
                "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "one two three"}],
                                                 "stream": True})  # fmt: skip
            monkeypatch.undo()
        assert status == 200
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        assert events and json.loads(events[-1])["error"]["code"] == "internal_error"
        problems = _problems(caplog)
        assert len(problems) == 1, [r.getMessage() for r in problems]
        assert headers["x-request-id"] in problems[0].getMessage()
        assert problems[0].exc_info is None
        assert connection.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    finally:
        connection.close()


# --- the middleware on its own, behind a bare ASGI app ------------------------------------------


async def _failing_app(scope, receive, send):
    if scope["type"] != "http":
        return
    scope["state"]["request_id"] = "req-123"
    if scope["path"] == "/before":
        raise ValueError("before the answer")
    if scope["path"] == "/during":  # chunked: no content-length, so the body may end early
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("half way")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_middleware_answers_before_and_ends_during_without_dropping_the_connection(caplog):
    with ServerThread(UnexpectedErrors(_failing_app)) as server:
        connection = Connection(server.url)
        try:
            with caplog.at_level(logging.WARNING):
                status, data, headers = connection.request("GET", "/before")
                assert status == 500
                assert json.loads(data)["error"]["code"] == "internal_error"
                assert headers["x-request-id"] == "req-123"
                assert connection.request("GET", "/fine")[:2] == (200, b"ok")
                status, data, _ = connection.request("GET", "/during")
                assert (status, data) == (200, b"partial")
                assert connection.request("GET", "/fine")[:2] == (200, b"ok")
            lines = [r.getMessage() for r in _problems(caplog)]
            assert len(lines) == 2, lines
            assert all("req-123" in line for line in lines)
            assert "ValueError: before the answer" in lines[0] and "ValueError: half way" in lines[1]
        finally:
            connection.close()
