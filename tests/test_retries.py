"""Retries on the same node when no other can take the request, and a cloud service as the last fallback."""

from __future__ import annotations

import contextlib
import logging
import tempfile

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.config import parse_config
from proxy.sim import Behavior, ServerThread, SimOllama, SimVLLM
from tests.support import ollama_models, reset_health, running_proxy, wait_for

MSG = [{"role": "user", "content": "hi"}]


def chats(sim) -> int:
    return sum(1 for r in sim.requests if r[1] in ("/api/chat", "/v1/chat/completions"))


def _single(url: str, **routing) -> dict:
    return {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "health": {"interval": 60, "cooldown": 0.2, "max_cooldown": 0.5},
        "routing": {"retry_backoff": 0.01, **routing},
        "backends": [{"name": "only", "kind": "ollama", "url": url}],
        "models": [{"name": "chat", "target": "llama3.1:8b"}],
    }


@pytest.fixture(scope="module")
def node():
    with SimOllama(models=ollama_models()) as sim:
        yield sim


@pytest.fixture(scope="module")
def single(node):
    with running_proxy(_single(node.url)) as server:
        yield server


@pytest.fixture
def client(single, node):
    reset_health(single)
    node.behavior = Behavior(reply="answered")
    node.reset()
    with openai.OpenAI(base_url=f"{single.url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("fail", ["busy", "http_500"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_single_node_is_asked_again_after_a_transient_failure(client, node, fail, stream):
    node.behavior = Behavior(reply="answered", fail=fail, fail_times=2)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG, stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert text == "answered"
    assert raw.headers["x-proxy-backend"] == "only"
    assert raw.headers["x-proxy-attempts"] == "3"
    assert wait_for(lambda: node.failed == 2 and node.completed == 1), node.stats()


def test_retries_stop_after_retry_same_and_the_error_counts_them(client, node, single):
    node.behavior = Behavior(fail="busy")
    response = httpx.post(f"{single.url}/v1/chat/completions", json={"model": "chat", "messages": MSG}, timeout=10)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_unavailable"
    assert "3 attempts on 1 backend" in response.json()["error"]["message"]
    assert response.headers["x-proxy-attempts"] == "3"
    assert chats(node) == 3  # the first try and routing.retry_same (2) more


def test_a_client_error_is_never_retried(client, node):
    with pytest.raises(openai.BadRequestError):  # llama3.1:8b has no thinking: Ollama answers 400
        client.chat.completions.create(model="chat", messages=MSG, reasoning_effort="high")
    assert chats(node) == 1


def test_a_model_missing_on_the_node_is_not_retried(client, node):
    node.behavior = Behavior(fail="not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="chat", messages=MSG)
    assert chats(node) == 1


def test_a_stream_that_broke_after_its_first_chunk_is_not_retried(client, node):
    node.behavior = Behavior(reply="one two three four five", fail="die_mid_stream", fail_after_chunks=2, fail_times=1)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="chat", messages=MSG, stream=True):
            pass
    assert chats(node) == 1  # the client had part of an answer: asking again would repeat it


def test_retry_same_zero_turns_retries_off(node):
    node.behavior = Behavior(reply="answered", fail="busy", fail_times=1)
    node.reset()
    with running_proxy(_single(node.url, retry_same=0)) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": MSG}, timeout=10)
    assert response.status_code == 503
    assert response.headers["x-proxy-attempts"] == "1"
    assert chats(node) == 1


def test_no_retry_whose_backoff_would_pass_the_deadline(node):
    node.behavior = Behavior(reply="answered", fail="busy", fail_times=1)
    node.reset()
    with running_proxy(_single(node.url, retry_backoff=30, deadline=2)) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": MSG}, timeout=10)
    # The backend's own error, not a 504 after sleeping into the deadline.
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_unavailable"
    assert chats(node) == 1


def test_other_backends_come_before_asking_the_same_one_again():
    with SimOllama(models=ollama_models()) as first, SimOllama(models=ollama_models()) as second:
        config = _single(first.url)
        config["backends"] = [
            {"name": "first", "kind": "ollama", "url": first.url, "weight": 1_000_000},
            {"name": "second", "kind": "ollama", "url": second.url, "weight": 1},
        ]
        first.behavior = Behavior(fail="busy")
        second.behavior = Behavior(reply="answered")
        with running_proxy(config) as server:
            response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", "messages": MSG})
        assert response.status_code == 200
        assert response.headers["x-proxy-backend"] == "second"
        assert response.headers["x-proxy-attempts"] == "2"
        assert chats(first) == 1 and chats(second) == 1


# --- an external OpenAI-compatible service as the last fallback -----------------------------------

CLOUD_KEY = "sk-cloud-d41d8cd98f00b204e9800998ecf8427e"


@contextlib.contextmanager
def proxy_with_env(config: dict, env: dict[str, str]):
    """Like tests.support.running_proxy, but with ``${VAR}`` taken from ``env`` (as at start-up)."""
    with tempfile.TemporaryDirectory(prefix="llm-proxy-test-") as tmp:
        config = {**config, "storage": {"path": f"{tmp}/proxy.db"}}
        server = ServerThread(create_app(parse_config(config, env=env)))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def test_a_cloud_service_answers_when_the_local_node_fails(caplog):
    caplog.set_level(logging.DEBUG)
    with SimOllama(models=ollama_models()) as local, \
            SimVLLM(model="gpt-4o-mini", api_key=CLOUD_KEY) as cloud:  # fmt: skip
        config = {
            "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
            "routing": {"retry_backoff": 0.01},
            "backends": [
                {"name": "local", "kind": "ollama", "url": local.url},
                {"name": "cloud", "kind": "openai", "url": cloud.url, "api_key": "${CLOUD_API_KEY}"},
            ],
            "models": [
                {"name": "chat", "target": "llama3.1:8b", "backends": ["local"], "fallback": ["cloud-chat"]},
                {"name": "cloud-chat", "target": "gpt-4o-mini", "backends": ["cloud"]},
            ],
        }
        local.behavior = Behavior(fail="http_500")
        cloud.behavior = Behavior(reply="from the cloud")
        with proxy_with_env(config, {"CLOUD_API_KEY": CLOUD_KEY}) as server:
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG)
                streamed = client.chat.completions.with_raw_response.create(model="chat", messages=MSG, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
            status = httpx.get(f"{server.url}/admin/status").text
            history = httpx.get(f"{server.url}/admin/history/requests").text
        assert raw.parse().choices[0].message.content == "from the cloud"
        assert raw.parse().model == "chat"
        assert raw.headers["x-proxy-backend"] == "cloud"
        assert raw.headers["x-proxy-alias"] == "cloud-chat"
        assert raw.headers["x-proxy-attempts"] == "2"  # a fallback exists, so the local node is not asked again
        # The local node now sits out its cooldown (health.cooldown, 5 s), so the cloud goes first.
        assert text == "from the cloud" and streamed.headers["x-proxy-attempts"] == "1"
        # The cloud got the key from the environment, as a bearer token ...
        sent = [r[3].get("authorization") for r in cloud.requests if r[1] == "/v1/chat/completions"]
        assert sent == [f"Bearer {CLOUD_KEY}"] * 2
        # ... and it is nowhere else: not in the log, the status page or the history.
        assert caplog.records, "the proxy logged nothing, so the check below proves nothing"
        assert any("local" in r.getMessage() for r in caplog.records)
        for record in caplog.records:
            assert CLOUD_KEY not in record.getMessage()
        assert CLOUD_KEY not in caplog.text
        assert "cloud" in status and CLOUD_KEY not in status
        assert "cloud" in history and CLOUD_KEY not in history
        assert chats(local) == 1 and chats(cloud) == 2
