"""Slow peers are timed out: clients slow to send a request (raw sockets), backends slow to finish a line.

Client side: the proxy runs under uvicorn with :class:`proxy.server.TimedHttpProtocol`
(via ``ServerThread(config=...)``, the same options ``llm-proxy serve`` uses).
Backend side: the simulators' ``trickle`` and ``endless_line`` failure modes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import tempfile
import time

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.config import parse_config
from proxy.server import TimedHttpProtocol, uvicorn_options
from proxy.sim import Behavior, ServerThread, SimOllama, SimVLLM

_BOUND = 6.0  # seconds a socket read may block before the test counts the connection as held


@contextlib.contextmanager
def timed_proxy(config: dict):
    """The proxy on a free port, with the protocol class and timeouts ``serve`` would use."""
    with tempfile.TemporaryDirectory(prefix="llm-proxy-test-") as tmp:
        parsed = parse_config({**config, "storage": {"path": f"{tmp}/proxy.db"}}, env={})
        with ServerThread(create_app(parsed), config=parsed) as server:
            yield server


def _connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=_BOUND)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a server that keeps the socket open fails the test."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the proxy kept the connection open; got so far: {data!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _trickle(sock: socket.socket, data: bytes, every: float) -> bool:
    """Send ``data`` a byte at a time, ``every`` seconds apart; False once the server answered or closed."""
    for i in range(len(data)):
        try:
            sock.sendall(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return False
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            return False
    return True


def _split(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
    return status, headers, body


CLIENT_TIMEOUTS = {"server": {"header_timeout": 1, "body_timeout": 1}}


@pytest.fixture(scope="module")
def strict_proxy():
    with timed_proxy(CLIENT_TIMEOUTS) as server:
        yield server


def test_a_head_sent_a_byte_at_a_time_gets_408_and_is_closed(strict_proxy):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n" * 3
    with _connect(strict_proxy) as sock:
        # 0.3 s per byte: the head would take over a minute to arrive.
        still_sending = _trickle(sock, head, 0.3)
        response = _read_all(sock)
    assert not still_sending, "the proxy let the client send its whole slow head"
    status, headers, body = _split(response)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert "server.header_timeout" in error["message"] and error["param"] is None


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(strict_proxy):
    with _connect(strict_proxy) as sock:
        assert _read_all(sock) == b""


def test_a_chunked_body_that_never_completes_gets_408_and_is_closed(strict_proxy):
    with _connect(strict_proxy) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b'9\r\n{"model":\r\n'  # and the rest never comes
        )
        response = _read_all(sock)
    status, headers, body = _split(response)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert headers[b"connection"] == b"close"
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_timeout" and "server.body_timeout" in error["message"]


def test_a_slow_client_within_the_limits_is_served_and_kept_alive(strict_proxy):
    request = b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n"
    with _connect(strict_proxy) as sock:
        for _ in range(3):  # keep-alive: each request gets its own head deadline
            for part in (request[:10], request[10:25], request[25:]):
                sock.sendall(part)
                time.sleep(0.2)  # pacing the client, not waiting for the server: 0.6 s per head < 1 s
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"connection: close" not in answer.lower()
        # a body sent in pieces, in time
        body = orjson.dumps({"model": "nothing-serves-this", "messages": [{"role": "user", "content": "hi"}]})
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        time.sleep(0.3)
        sock.sendall(body[:10])
        time.sleep(0.3)
        sock.sendall(body[10:])
        status, _, _ = _split(sock.recv(65536))
        assert status.startswith(b"HTTP/1.1 4") and b"408" not in status  # the proxy's own answer about the model


def test_serve_options_carry_the_configured_timeouts():
    config = parse_config({"server": {"header_timeout": 3, "body_timeout": 7}}, env={})
    factory = uvicorn_options(config)["http"]
    assert factory.func is TimedHttpProtocol
    assert factory.keywords == {"header_timeout": 3.0, "body_timeout": 7.0}
    defaults = uvicorn_options(parse_config({}, env={}))["http"].keywords
    assert defaults == {"header_timeout": 10.0, "body_timeout": 60.0}


# --- slow and misbehaving backends ---------------------------------------------------------------

ADMIN_KEY = "adm-timeouts"
MSG = [{"role": "user", "content": "Tell me something"}]
LINE_CAP = 256 * 1024


@pytest.fixture(scope="module")
def sims():
    from tests.support import VLLM_KEY, ollama_models

    with (
        SimOllama(models=ollama_models()) as ollama,
        SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"], api_key=VLLM_KEY) as vllm,
    ):
        yield ollama, vllm


def _backends(sims, **timeouts) -> dict:
    from tests.support import backends_config

    config = backends_config(*sims)
    config["timeouts"] = {"connect": 2, "first_byte": 5, "idle": 1, "max_line_bytes": LINE_CAP, **timeouts}
    config["server"] = {"admin_keys": [ADMIN_KEY]}
    return config


@pytest.fixture(scope="module")
def _backend_proxy(sims):
    with timed_proxy(_backends(sims)) as server:
        yield server


@pytest.fixture
def backend_proxy(_backend_proxy):
    from tests.support import reset_health

    reset_health(_backend_proxy)  # a failure one test provoked must not steer the next
    return _backend_proxy


@pytest.fixture
def fresh(sims):
    for sim in sims:
        sim.behavior = Behavior()
        sim.reset()
    yield dict(zip(("ollama", "vllm"), sims))
    for sim in sims:
        sim.behavior = Behavior()


KINDS = [("ollama", "chat"), ("vllm", "qwen-chat")]


def _stream(proxy, model: str) -> tuple[httpx.Response, list]:
    """The stream's data events (decoded JSON, or the string "[DONE]") as a client reads them."""
    events = []
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions",
                      json={"model": model, "messages": MSG, "stream": True}, timeout=10) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append("[DONE]" if data == "[DONE]" else orjson.loads(data))
    return resp, events


def _history_row(proxy, request_id: str) -> dict:
    from tests.support import wait_for

    url = f"{proxy.url}/admin/history/requests/{request_id}"
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert wait_for(lambda: httpx.get(url, headers=headers).status_code == 200)
    return httpx.get(url, headers=headers).json()


@pytest.mark.parametrize("kind,model", KINDS)
def test_a_backend_that_trickles_spaces_is_idle(backend_proxy, fresh, kind, model):
    fresh[kind].behavior = Behavior(reply="one two three four five", fail="trickle", fail_after_chunks=2,
                                    trickle_interval=0.1)  # fmt: skip
    resp, events = _stream(backend_proxy, model)
    assert resp.status_code == 200
    assert "[DONE]" not in events
    assert sum(1 for e in events if "choices" in e) >= 2  # what came before the stall reached the client
    error = events[-1]["error"]
    assert error["code"] == "backend_timeout", error
    from tests.support import wait_for

    assert wait_for(lambda: fresh[kind].active == 0)  # the proxy hung up on it


@pytest.mark.parametrize("kind,model", KINDS)
def test_a_slow_backend_whose_lines_come_within_idle_is_not_cut(backend_proxy, fresh, kind, model):
    # 0.3 s between tokens, six of them: the stream outlasts timeouts.idle (1 s), no gap does.
    fresh[kind].behavior = Behavior(reply="one two three four five six", tokens_per_second=1 / 0.3)
    resp, events = _stream(backend_proxy, model)
    assert resp.status_code == 200 and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e != "[DONE]" and e["choices"])
    assert text == "one two three four five six"


@pytest.mark.parametrize("kind,model,what", [("ollama", "chat", "a line"), ("vllm", "qwen-chat", "an SSE event")])
def test_a_line_longer_than_the_cap_ends_the_stream(backend_proxy, fresh, kind, model, what):
    fresh[kind].behavior = Behavior(reply="one two three four five", fail="endless_line", fail_after_chunks=2)
    resp, events = _stream(backend_proxy, model)
    assert resp.status_code == 200 and "[DONE]" not in events
    error = events[-1]["error"]
    assert error["code"] == "backend_error"
    assert f"sent {what} longer than {LINE_CAP} bytes (timeouts.max_line_bytes)" in error["message"]


def test_an_endless_line_before_anything_was_sent_is_a_502(sims, fresh):
    fresh["ollama"].behavior = Behavior(fail="endless_line", fail_after_chunks=0)
    with timed_proxy(_backends(sims, max_line_bytes=1000)) as server:
        resp = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"model": "chat", "messages": MSG, "stream": True}, timeout=10)  # fmt: skip
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["code"] == "backend_error" and "longer than 1000 bytes (timeouts.max_line_bytes)" in error["message"]


@pytest.mark.parametrize("kind,model", KINDS)
def test_an_error_mid_stream_ends_it_without_done_and_is_recorded(backend_proxy, fresh, kind, model):
    fresh[kind].behavior = Behavior(reply="one two three four five six", fail="error_mid_stream", fail_after_chunks=2)
    resp, events = _stream(backend_proxy, model)
    assert resp.status_code == 200
    assert "[DONE]" not in events  # the answer is not complete, so nothing may say it is
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and events[-1] == {"error": errors[0]}
    assert errors[0]["message"] and errors[0]["type"] == "api_error"
    assert sum(1 for e in events if "choices" in e) >= 2
    row = _history_row(backend_proxy, resp.headers["x-request-id"])
    assert row["status"] == "error", row


def test_a_pipelined_request_waits_its_turn_without_a_408(sims, fresh):
    """uvicorn holds a pipelined request until the response before it is done; that wait is not the client's."""
    fresh["ollama"].behavior = Behavior(reply="one two three four five six", tokens_per_second=1 / 0.3)
    body = orjson.dumps({"model": "chat", "messages": MSG, "stream": True})
    first = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body)) + body  # fmt: skip
    second = b"GET /health HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    with timed_proxy({**_backends(sims), "server": CLIENT_TIMEOUTS["server"]}) as server, _connect(server) as sock:
        sock.sendall(first + second[:12])  # the stream takes about 1.8 s, over header_timeout (1 s)
        time.sleep(1.3)  # pacing the client: the rest of the second head comes after its deadline
        sock.sendall(second[12:])
        response = _read_all(sock)
    assert b"408" not in response.split(b"\r\n", 1)[0] and b"request_timeout" not in response
    assert response.count(b"HTTP/1.1 200 OK") == 2, response
    assert b"data: [DONE]" in response  # the stream finished before the second answer
