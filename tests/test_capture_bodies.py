"""``history.capture_bodies``: request and response bodies kept with each history row, cut at
``history.max_body_bytes``; nothing kept when it is off (the default). A real proxy, real requests."""

from __future__ import annotations

import httpx

from proxy.sim import Behavior
from tests.support import running_proxy, wait_for


def config(ollama, **history) -> dict:
    return {"history": history, "cache": {"mode": "deterministic"},
            "backends": [{"name": "o", "kind": "ollama", "url": ollama.url}],
            "models": [{"name": "chat", "target": "llama3.1:8b"}]}  # fmt: skip


def row(proxy, response: httpx.Response) -> dict:
    found: dict = {}

    def finished() -> bool:
        found.update(httpx.get(f"{proxy.url}/admin/history/requests/{response.headers['x-request-id']}").json())
        return found.get("status") not in (None, "in_progress")

    assert wait_for(finished, 5), found
    return found


def test_bodies_are_stored_when_captured_and_cut_at_the_limit(ollama):
    ollama.behavior = Behavior(reply="the captured answer")
    message = {"role": "user", "content": "remember this question"}
    with running_proxy(config(ollama, capture_bodies=True, max_body_bytes=4096)) as proxy:
        plain = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": [message],
                                                                     "temperature": 0})  # fmt: skip
        assert plain.status_code == 200
        stored = row(proxy, plain)
        assert "remember this question" in stored["request_body"]
        assert "the captured answer" in stored["response_body"]
        again = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": [message],
                                                                     "temperature": 0})  # fmt: skip
        assert again.headers.get("x-cache") == "HIT"
        assert "the captured answer" in row(proxy, again)["response_body"]  # a cache hit keeps what it served

        streamed = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": [message],
                                                                        "stream": True})  # fmt: skip
        assert streamed.status_code == 200
        kept = row(proxy, streamed)["response_body"]
        assert kept.startswith("data: ") and "captured" in kept and "[DONE]" in kept  # the frames as sent

    with running_proxy(config(ollama, capture_bodies=True, max_body_bytes=64)) as proxy:
        long = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": [message],
                                                                    "stream": True})  # fmt: skip
        stored = row(proxy, long)
        assert len(stored["request_body"].encode()) == 64 and len(stored["response_body"].encode()) == 64


def test_nothing_is_stored_by_default(ollama):
    with running_proxy(config(ollama)) as proxy:
        answer = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": [
            {"role": "user", "content": "hi"}]})  # fmt: skip
        stored = row(proxy, answer)
        assert stored["request_body"] is None and stored["response_body"] is None
