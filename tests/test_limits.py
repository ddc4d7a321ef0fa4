"""server.max_body_bytes at its boundary: exactly the limit is read, one byte more is 413.

Both ways a client can send a body are covered: with Content-Length (refused before
reading) and chunked (refused while reading, as soon as the count passes the limit),
for the OpenAI endpoints and for the admin API, which goes through the same reader.
"""

from __future__ import annotations

import httpx
import orjson
import pytest

from proxy.sim import Behavior, SimOllama
from tests.support import ollama_models, running_proxy

LIMIT = 4096


@pytest.fixture(scope="module")
def sim():
    with SimOllama(models=ollama_models()) as node:
        yield node


@pytest.fixture(scope="module")
def proxy(sim):
    config = {
        "server": {"max_body_bytes": LIMIT},
        "cache": {"mode": "off"},
        "backends": [{"name": "n1", "kind": "ollama", "url": sim.url}],
        "models": [{"name": "chat", "target": "llama3.1:8b"}],
    }
    with running_proxy(config) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(sim):
    sim.behavior = Behavior(reply="Fits.")
    sim.reset()


def sized(template: dict, field: str, size: int) -> bytes:
    """``template`` as JSON, with the string at ``field`` padded so the whole body is ``size`` bytes."""
    empty = orjson.dumps({**template, field: ""})
    body = orjson.dumps({**template, field: "x" * (size - len(empty))})
    assert len(body) == size
    return body


def chat_body(size: int) -> bytes:
    empty = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": ""}]})
    text = "x" * (size - len(empty))
    body = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": text}]})
    assert len(body) == size
    return body


def chunked(body: bytes, piece: int = 1000):
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""

    def pieces():
        for i in range(0, len(body), piece):
            yield body[i : i + piece]

    return pieces()


def post(url: str, body: bytes, *, with_length: bool) -> httpx.Response:
    content = body if with_length else chunked(body)
    response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=10)
    assert ("content-length" in response.request.headers) == with_length
    return response


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
def test_a_chat_body_of_exactly_the_limit_is_answered(proxy, sim, with_length):
    response = post(f"{proxy.url}/v1/chat/completions", chat_body(LIMIT), with_length=with_length)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Fits."
    assert len(sim.requests) == 1


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
def test_a_chat_body_one_byte_over_the_limit_is_413(proxy, sim, with_length):
    assert_too_large(post(f"{proxy.url}/v1/chat/completions", chat_body(LIMIT + 1), with_length=with_length))
    assert sim.requests == []  # refused before any backend heard of it


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
def test_an_admin_body_of_exactly_the_limit_is_read(proxy, with_length):
    # A node of an unknown kind is refused, but only once the body was read and judged: 400, not 413.
    body = sized({"name": "big", "url": "http://127.0.0.1:9"}, "kind", LIMIT)
    response = post(f"{proxy.url}/admin/nodes", body, with_length=with_length)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "kind"


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
def test_an_admin_body_one_byte_over_the_limit_is_413(proxy, with_length):
    body = sized({"name": "big", "url": "http://127.0.0.1:9"}, "kind", LIMIT + 1)
    assert_too_large(post(f"{proxy.url}/admin/nodes", body, with_length=with_length))
    assert "big" not in [n["name"] for n in httpx.get(f"{proxy.url}/admin/nodes", timeout=5).json()["data"]]
