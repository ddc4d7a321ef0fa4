"""Before the first byte reaches the client, a failing backend is replaced by another serving the model."""

from __future__ import annotations

import openai
import pytest

from proxy.sim import Behavior, SimOllama
from tests.support import ollama_models, reset_health, running_proxy

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pair():
    with SimOllama(models=ollama_models()) as first, SimOllama(models=ollama_models()) as second:
        config = {
            "backends": [
                # Weights this lopsided make "first" the first choice in all but a few runs in a million.
                {"name": "first", "kind": "ollama", "url": first.url, "weight": 1_000_000},
                {"name": "second", "kind": "ollama", "url": second.url, "weight": 1},
            ],
            "models": [{"name": "chat", "target": "llama3.1:8b"}],
        }
        with running_proxy(config) as server:
            yield server, first, second


@pytest.fixture
def client(pair):
    server, first, second = pair
    reset_health(server)
    for sim in (first, second):
        sim.behavior = Behavior(reply="answered")
        sim.reset()
    try:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    finally:  # a failure a test injected does not outlive it, passed or not
        for sim in (first, second):
            sim.behavior = Behavior(reply="answered")


@pytest.mark.parametrize("fail", ["busy", "http_500", "not_found"])
@pytest.mark.parametrize("stream", [False, True])
def test_fails_over_when_a_backend_fails_before_answering(client, pair, fail, stream):
    _, first, second = pair
    first.behavior = Behavior(fail=fail)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG, stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert text == "answered"
    assert raw.headers["x-proxy-backend"] == "second"
    assert raw.headers["x-proxy-attempts"] == "2"
    # the sims' counters settle before they are read, so no waiting here
    assert (first.failed, second.completed) == (1, 1), (first.stats(), second.stats())


def test_fails_over_when_a_backend_refuses_connections(client, pair):
    _, first, second = pair
    first.stop()
    try:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG)
        assert raw.parse().choices[0].message.content == "answered"
        assert raw.headers["x-proxy-backend"] == "second"
    finally:
        first.start()


def test_a_client_error_is_not_retried_elsewhere(client, pair):
    _, first, second = pair
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=MSG, reasoning_effort="high")  # no thinking capability
    chats = [r for sim in (first, second) for r in sim.requests if r[1] == "/api/chat"]
    assert len(chats) == 1  # the same request would fail the same way anywhere


def test_all_backends_failing_gives_the_last_error(client, pair):
    _, first, second = pair
    first.behavior = second.behavior = Behavior(fail="busy")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="chat", messages=MSG)
    assert info.value.status_code == 503
