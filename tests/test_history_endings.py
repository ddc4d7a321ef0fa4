"""The history row of every way a request can end, read back through the admin API.

Each test drives a real proxy (under uvicorn) in front of a simulated Ollama node,
ends the request one way (answered, failed before or after the first byte, client
gone, timed out, proxy stopped), and then reads the row the proxy wrote.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import tempfile

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.config import parse_config
from proxy.sim import Behavior, ServerThread, SimOllama
from tests.support import ollama_models, reset_health, running_proxy, wait_for

MSG = [{"role": "user", "content": "How do requests end?"}]
LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"


@pytest.fixture(scope="module")
def sim():
    with SimOllama(models=ollama_models()) as node:
        yield node


def _config(sim: SimOllama, **timeouts: float) -> dict:
    with socket.socket() as probe:  # a port nobody listens on: an unreachable backend
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    return {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5, **timeouts},
        "cache": {"mode": "off"},  # every request must reach the backend
        "routing": {"retries": 1},
        "backends": [
            {"name": "n1", "kind": "ollama", "url": sim.url},
            {"name": "gone", "kind": "ollama", "url": f"http://127.0.0.1:{closed_port}"},
        ],
        "models": [
            {"name": "chat", "target": "llama3.1:8b", "backends": ["n1"]},
            {"name": "nowhere", "target": "llama3.1:8b", "backends": ["gone"]},
            {"name": "embed", "target": "nomic-embed-text", "backends": ["n1"]},
        ],
    }


@pytest.fixture(scope="module")
def module_proxy(sim):
    with running_proxy(_config(sim)) as server:
        yield server


@pytest.fixture
def proxy(module_proxy, sim):
    sim.behavior = Behavior(reply="It ends well.")
    sim.reset()
    reset_health(module_proxy)
    try:
        yield module_proxy
    finally:
        sim.behavior = Behavior()


def chat(proxy, body: dict, timeout: float = 10) -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": MSG, **body},
                      timeout=timeout)  # fmt: skip


def row(proxy, request_id: str) -> dict:
    response = httpx.get(f"{proxy.url}/admin/history/requests/{request_id}", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def finished_row(proxy, request_id: str) -> dict:
    """The row once it is no longer in progress (a stream's row closes as its last frame goes out)."""
    found: dict = {}

    def done() -> bool:
        found.update(row(proxy, request_id))
        return found["status"] != "in_progress"

    assert wait_for(done, timeout=5), found
    return found


def ids(proxy) -> set[str]:
    listing = httpx.get(f"{proxy.url}/admin/history/requests", params={"limit": 1000}, timeout=5).json()
    return {r["id"] for r in listing["data"]}


def new_finished_row(proxy, before: set[str]) -> dict:
    """The one row that appeared since ``before`` and finished: how to find a request whose client left."""
    found: list[dict] = []

    def done() -> bool:
        listing = httpx.get(f"{proxy.url}/admin/history/requests", params={"limit": 1000}, timeout=5).json()
        found[:] = [r for r in listing["data"] if r["id"] not in before]
        return len(found) == 1 and found[0]["status"] != "in_progress"

    assert wait_for(done, timeout=5), found
    return found[0]


def assert_closed(r: dict) -> None:
    assert r["finished_at"] is not None and r["finished_at"] >= r["started_at"]
    assert r["duration_seconds"] is not None and r["duration_seconds"] >= 0


def sse_data(text: str) -> list:
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# --- answered ---------------------------------------------------------------------------------------


def test_ok_not_streamed(proxy, sim):
    response = chat(proxy, {})
    assert response.status_code == 200
    r = finished_row(proxy, response.headers["x-request-id"])
    assert (r["status"], r["http_status"], r["backend"], r["attempts"]) == ("ok", 200, "n1", 1)
    assert (r["stream"], r["cache_hit"], r["error"]) == (False, False, None)
    assert r["prompt_tokens"] and r["completion_tokens"]
    assert_closed(r)
    assert len(sim.requests) == 1


def test_ok_streamed(proxy, sim):
    response = chat(proxy, {"stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    r = row(proxy, response.headers["x-request-id"])  # closed before the client had the last byte: no polling
    assert (r["status"], r["http_status"], r["backend"], r["attempts"]) == ("ok", 200, "n1", 1)
    assert r["stream"] is True and r["error"] is None and r["ttft_seconds"] is not None
    assert r["completion_tokens"]
    assert_closed(r)


# --- failed before the first byte -------------------------------------------------------------------


def test_backend_500_before_the_first_byte(proxy, sim):
    sim.behavior = Behavior(fail="http_500")
    response = chat(proxy, {"stream": True})
    assert response.status_code == 502
    r = finished_row(proxy, response.headers["x-request-id"])
    assert (r["status"], r["http_status"]) == ("error", 502)
    assert r["error"] and r["ttft_seconds"] is None
    assert_closed(r)
    assert sim.failed == 1  # the backend really was asked


def test_backend_unreachable(proxy):
    response = chat(proxy, {"model": "nowhere"})
    assert response.status_code in (502, 503), response.text
    r = finished_row(proxy, response.headers["x-request-id"])
    assert (r["status"], r["http_status"]) == ("error", response.status_code)
    assert r["error"] == response.json()["error"]["message"]
    assert_closed(r)


# --- failed after the first byte --------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["error_mid_stream", "die_mid_stream"])
def test_stream_that_fails_part_way(proxy, sim, failure):
    sim.behavior = Behavior(reply=LONG, fail=failure, fail_after_chunks=3)
    response = chat(proxy, {"stream": True})
    assert response.status_code == 200  # the status line went out before the failure
    events = sse_data(response.text)
    assert events[0]["choices"][0]["delta"] and "error" in events[-1]
    r = row(proxy, response.headers["x-request-id"])
    assert (r["status"], r["http_status"], r["backend"], r["attempts"]) == ("error", 200, "n1", 1)
    assert r["error"] == events[-1]["error"]["message"]
    assert r["ttft_seconds"] is not None
    assert_closed(r)


# --- the client went away ---------------------------------------------------------------------------


def test_client_gone_mid_stream(proxy, sim):
    sim.behavior = Behavior(reply=LONG, tokens_per_second=20)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=10,
                      json={"model": "chat", "messages": MSG, "stream": True}) as response:  # fmt: skip
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        next(lines), next(lines)
    assert wait_for(lambda: sim.cancelled == 1, timeout=5)  # the backend stopped generating
    r = finished_row(proxy, request_id)
    assert (r["status"], r["backend"], r["attempts"], r["stream"]) == ("cancelled", "n1", 1, True)
    assert r["http_status"] == 200  # what the client got before it left
    assert_closed(r)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "chat", "messages": MSG}),
    ("/v1/embeddings", {"model": "embed", "input": "a slow vector"}),
], ids=["chat", "embeddings"])  # fmt: skip
def test_client_gone_during_a_non_streamed_request(proxy, sim, path, body):
    sim.behavior = Behavior(reply="slow", ttft=30)
    before = ids(proxy)
    raw_body = orjson.dumps(body)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw_body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
        raw.sendall(head + raw_body)
        assert wait_for(lambda: sim.active == 1, timeout=5)  # the backend is working on it
    assert wait_for(lambda: sim.cancelled == 1, timeout=5)  # ... and stopped when the client left
    r = new_finished_row(proxy, before)
    assert (r["status"], r["http_status"], r["stream"], r["endpoint"]) == ("cancelled", 499, False, path)
    assert r["requested_model"] == body["model"]
    assert_closed(r)


# --- timed out --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient(sim):
    with running_proxy(_config(sim, first_byte=0.5, idle=0.5)) as server:
        yield server


@pytest.fixture
def slow_proxy(impatient, sim):
    sim.reset()
    reset_health(impatient)
    try:
        yield impatient
    finally:
        sim.behavior = Behavior()


def test_first_byte_timeout(slow_proxy, sim):
    sim.behavior = Behavior(reply="late", ttft=5)
    response = chat(slow_proxy, {})
    assert response.status_code == 504
    r = finished_row(slow_proxy, response.headers["x-request-id"])
    assert (r["status"], r["http_status"]) == ("error", 504)
    assert "first_byte" in r["error"] or "timed out" in r["error"] or "within" in r["error"], r["error"]
    assert_closed(r)
    assert wait_for(lambda: sim.cancelled == 1, timeout=5)  # the proxy hung up on the backend


def test_idle_timeout_mid_stream(slow_proxy, sim):
    sim.behavior = Behavior(reply="first then a long silence", tokens_per_second=1)
    response = chat(slow_proxy, {"stream": True})
    assert response.status_code == 200
    events = sse_data(response.text)
    assert "error" in events[-1]
    r = row(slow_proxy, response.headers["x-request-id"])
    assert (r["status"], r["http_status"], r["backend"], r["attempts"]) == ("error", 200, "n1", 1)
    assert r["error"] == events[-1]["error"]["message"]
    assert_closed(r)


# --- the proxy stopped ------------------------------------------------------------------------------


def test_shutdown_while_a_stream_is_open(sim):
    sim.reset()
    sim.behavior = Behavior(reply=LONG, tokens_per_second=5)
    with tempfile.TemporaryDirectory(prefix="llm-proxy-test-") as tmp:
        config = {**_config(sim), "storage": {"path": f"{tmp}/proxy.db"}}
        # A short grace period: uvicorn then cancels the open stream, as at the end of a real stop.
        server = ServerThread(create_app(parse_config(config, env={})), timeout_graceful_shutdown=0.3)
        server.start()
        try:
            with contextlib.ExitStack() as stack:
                response = stack.enter_context(httpx.stream(
                    "POST", f"{server.url}/v1/chat/completions", timeout=10,
                    json={"model": "chat", "messages": MSG, "stream": True}))  # fmt: skip
                request_id = response.headers["x-request-id"]
                next(response.iter_lines())
                server.stop()
        finally:
            sim.behavior = Behavior()
            server.stop()
        with contextlib.closing(sqlite3.connect(f"{tmp}/proxy.db")) as db:
            status, http_status, backend, finished, duration = db.execute(
                "SELECT status, http_status, backend, finished_at, duration_seconds FROM requests WHERE id = ?",
                (request_id,),
            ).fetchone()
    # uvicorn cancels the stream when the grace period ends; the stream closes its row on the way out,
    # before the history writer's last flush. (A row still in progress at that flush would become
    # "interrupted", with no end time: that is what a crash leaves, not a stop.)
    assert (status, http_status, backend) == ("cancelled", 200, "n1")
    assert finished is not None and duration is not None
    assert wait_for(lambda: sim.active == 0, timeout=5)  # and the backend stopped generating


# --- closed exactly once ----------------------------------------------------------------------------


def test_an_exchange_is_closed_once():
    """A second close (a late cancel after the answer went out) must neither rewrite the row nor count twice."""
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from proxy.config import HistoryConfig, MetricsConfig
    from proxy.exchange import Exchange
    from proxy.history import History
    from proxy.metrics import Metrics
    from proxy.storage import Database

    async def main() -> tuple[dict, float]:
        db = await Database.open(":memory:")
        history = History(db, HistoryConfig())
        await history.start()
        metrics = Metrics(MetricsConfig())
        exchange = Exchange(history, metrics, "chat", None)
        exchange.started({"model": "chat", "messages": MSG})
        exchange.close("ok", 200)
        exchange.close("cancelled", 500, "internal error")
        got = await history.get(exchange.id)
        await history.close()
        await db.close()
        text = metrics.render()[0].decode()
        total = sum(sample.value for family in text_string_to_metric_families(text)
                    if family.name == "llm_proxy_requests" for sample in family.samples
                    if sample.name == "llm_proxy_requests_total")  # fmt: skip
        return got, total

    got, total = asyncio.run(main())
    assert (got["status"], got["http_status"], got["error"]) == ("ok", 200, None)
    assert total == 1


# --- a stream cut by an exception -------------------------------------------------------------------


def test_a_stream_cut_by_an_exception_still_closes_its_row():
    """The server cancels the response task (a hard stop) or its send raises (a reset peer, under an
    ASGI server that reports it): the stream still reports its end, as cancelled, exactly once."""
    import asyncio

    from proxy.streaming import SSEResponse

    async def frames():
        yield b"data: {}\n\n"
        await asyncio.Event().wait()  # a backend that has more to say, later
        yield b"data: never\n\n"

    async def quiet_client():
        await asyncio.Event().wait()  # never disconnects on its own
        return {"type": "http.disconnect"}

    async def run(send) -> list[tuple]:
        ends: list[tuple] = []
        calls: list[dict] = []

        async def counted(message):
            calls.append(message)
            await send(message)

        response = SSEResponse(frames(), [], on_done=lambda *end: ends.append(end))
        task = asyncio.ensure_future(response({"type": "http"}, quiet_client, counted))
        while not task.done() and len(calls) < 2:  # until it waits on the backend (or failed to send)
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task
        return ends

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def broken_send(message):
        raise ConnectionResetError("peer reset")

    assert asyncio.run(run(send)) == [("cancelled", 200, None)]
    assert sent[0]["type"] == "http.response.start" and sent[1]["body"] == b"data: {}\n\n"
    assert asyncio.run(run(broken_send)) == [("cancelled", 200, None)]
