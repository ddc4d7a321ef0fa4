"""Embeddings and the model list through the proxy, with the official openai SDK."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

from proxy.sim import SimVLLM
from tests.support import running_proxy


def norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_embeddings_default_is_base64_decoded_by_the_sdk(client, ollama):
    # The SDK asks for base64 when the caller names no format, and decodes little-endian float32.
    resp = client.embeddings.create(model="embed", input=["first text", "second text"])
    assert [d.index for d in resp.data] == [0, 1]
    assert len(resp.data[0].embedding) == 16
    assert abs(norm(resp.data[0].embedding) - 1.0) < 1e-5
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.model == "embed"
    assert resp.usage.prompt_tokens > 0
    assert [call["input"] for call in embed_calls(ollama)] == [["first text", "second text"]]


def embed_calls(sim) -> list[dict]:
    """What the proxy asked the backend for: the bodies of its embedding requests."""
    return [body for method, path, body, _ in sim.requests if path in ("/api/embed", "/v1/embeddings")]


def test_embeddings_float_and_base64_agree(proxy, ollama):
    body = {"model": "embed", "input": "same text"}
    # no-store: each answer is computed by the backend, not replayed from the cache the first one filled
    fresh = {"Cache-Control": "no-store"}
    floats = httpx.post(f"{proxy.url}/v1/embeddings", json={**body, "encoding_format": "float"}, headers=fresh)
    b64 = httpx.post(f"{proxy.url}/v1/embeddings", json={**body, "encoding_format": "base64"}, headers=fresh)
    assert floats.headers["x-cache"] == b64.headers["x-cache"] == "MISS"
    assert [call["input"] for call in embed_calls(ollama)] in (["same text"] * 2, [["same text"]] * 2)
    floats, b64 = floats.json(), b64.json()
    vector = floats["data"][0]["embedding"]
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(vector) == 16
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, vector))
    assert b64["object"] == "list" and b64["data"][0]["object"] == "embedding"


def test_embeddings_dimensions_reach_ollama(client, ollama):
    resp = client.embeddings.create(model="embed", input="text", dimensions=8, encoding_format="float",
                                    extra_headers={"Cache-Control": "no-store"})  # fmt: skip
    assert len(resp.data[0].embedding) == 8
    assert embed_calls(ollama)[-1]["dimensions"] == 8
    assert abs(norm(resp.data[0].embedding) - 1.0) < 1e-5


def test_embeddings_single_string_input(client):
    resp = client.embeddings.create(model="embed", input="just one", encoding_format="float")
    assert len(resp.data) == 1


def test_embeddings_on_vllm_pass_through():
    with SimVLLM(model="BAAI/bge-m3", served_model_names=["bge"], embedding=True) as sim:
        config = {
            "backends": [{"name": "emb", "kind": "vllm", "url": sim.url}],
            "models": [{"name": "vectors", "target": "bge"}],
        }
        with running_proxy(config) as server:
            import openai

            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            resp = client.embeddings.create(model="vectors", input=["a", "b"])
            assert len(resp.data) == 2 and len(resp.data[0].embedding) > 0
            assert resp.model == "vectors"
            # no-store: the second answer must come from vLLM too, not from what the first one cached
            floats = client.embeddings.create(model="vectors", input="a", encoding_format="float",
                                              extra_headers={"Cache-Control": "no-store"})  # fmt: skip
            assert all(abs(x - y) < 1e-6 for x, y in zip(floats.data[0].embedding, resp.data[0].embedding))
            calls = embed_calls(sim)
            assert len(calls) == 2 and calls[0]["input"] == ["a", "b"] and calls[1]["input"] in ("a", ["a"])
            assert calls[1]["model"] == "bge"


def test_models_list_has_aliases_and_served_names(client):
    ids = {m.id for m in client.models.list()}
    assert {"chat", "thinker", "embed", "qwen-chat"} <= ids  # aliases
    assert {"llama3.1:8b", "qwen3:4b", "nomic-embed-text:latest", "qwen2.5-7b"} <= ids  # what backends serve
    for m in client.models.list():
        assert m.object == "model"
        assert m.owned_by


def test_models_retrieve(client):
    assert client.models.retrieve("chat").id == "chat"
    assert client.models.retrieve("qwen3:4b").id == "qwen3:4b"


def test_models_retrieve_unknown_is_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_model_ids_with_slashes_are_retrievable():
    with SimVLLM(model="Qwen/Qwen2.5-7B-Instruct") as sim:
        with running_proxy({"backends": [{"name": "v", "kind": "vllm", "url": sim.url}]}) as server:
            resp = httpx.get(f"{server.url}/v1/models/Qwen/Qwen2.5-7B-Instruct")
            assert resp.status_code == 200
            assert resp.json()["id"] == "Qwen/Qwen2.5-7B-Instruct"


def test_health_and_ready(proxy):
    assert httpx.get(f"{proxy.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.url}/ready")
    assert ready.status_code == 200
    assert ready.json()["backends"]["ollama-1"]["reachable"] is True


def test_ready_is_503_when_no_backend_answers():
    with running_proxy({"backends": [{"name": "gone", "kind": "ollama", "url": "http://127.0.0.1:9"}]}) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        resp = httpx.get(f"{server.url}/ready")
        assert resp.status_code == 503
        assert resp.json()["backends"]["gone"]["reachable"] is False
