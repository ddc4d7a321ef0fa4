"""Cache, history and metrics, seen from outside: through the SDK, the admin API and /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.sim import Behavior, SimOllama
from tests.support import ollama_models, running_proxy, wait_for
from tests.test_cli import ROOT, free_port, wait_until_up

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sim():
    with SimOllama(models=ollama_models()) as s:
        yield s


@pytest.fixture
def node(sim):
    sim.behavior = Behavior(reply="Paris is the capital.")
    sim.reset()
    return sim


def _config(sim, **extra) -> dict:
    return {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "server": {"api_keys": ["sk-app-1"]},
        "backends": [{"name": "n1", "kind": "ollama", "url": sim.url}],
        "models": [{"name": "chat", "target": "llama3.1:8b"}, {"name": "embed", "target": "nomic-embed-text"}],
        **extra,
    }


@pytest.fixture
def proxy(node):
    with running_proxy(_config(node)) as server:
        yield server


@pytest.fixture
def client(proxy):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-app-1", max_retries=0)


def chats(sim) -> list[dict]:
    return [r[2] for r in sim.requests if r[1] == "/api/chat"]


def post(proxy, body: dict, **headers) -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-app-1", **headers}, timeout=10)  # fmt: skip


# --- cache ----------------------------------------------------------------------------------------


def test_same_request_in_another_key_order_hits(proxy, node):
    first = post(proxy, {"model": "chat", "messages": MSG, "temperature": 0, "max_tokens": 20})
    assert first.headers["x-cache"] == "MISS"
    raw = b'{"max_tokens": 20,  "temperature": 0.0, "messages": [{"content": "What is the capital of France?", "role": "user"}], "model": "chat"}'  # fmt: skip
    second = httpx.post(f"{proxy.url}/v1/chat/completions", content=raw,
                        headers={"Authorization": "Bearer sk-app-1", "content-type": "application/json"})  # fmt: skip
    assert second.headers["x-cache"] == "HIT"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    assert len(chats(node)) == 1  # the backend answered once


@pytest.mark.parametrize("change", [{"temperature": 0, "max_tokens": 21}, {"seed": 7}, {"temperature": 0, "top_p": 0.5},
                                    {"temperature": 0, "messages": [{"role": "user", "content": "Other?"}]},
                                    {"temperature": 0, "stop": ["."]}])  # fmt: skip
def test_any_parameter_change_misses(proxy, node, change):
    base = {"model": "chat", "messages": MSG, "temperature": 0, "max_tokens": 20}
    assert post(proxy, base).headers["x-cache"] == "MISS"
    assert post(proxy, base).headers["x-cache"] == "HIT"
    assert post(proxy, {**base, **change}).headers["x-cache"] == "MISS"


def test_non_deterministic_requests_are_not_cached_by_default(proxy, node):
    for _ in range(2):
        assert post(proxy, {"model": "chat", "messages": MSG, "temperature": 0.8}).headers["x-cache"] == "MISS"
    assert len(chats(node)) == 2


def test_mode_always_caches_everything_and_off_nothing(node):
    with running_proxy(_config(node, cache={"mode": "always"})) as server:
        post(server, {"model": "chat", "messages": MSG, "temperature": 0.8})
        assert post(server, {"model": "chat", "messages": MSG, "temperature": 0.8}).headers["x-cache"] == "HIT"
    with running_proxy(_config(node, cache={"mode": "off"})) as server:
        post(server, {"model": "chat", "messages": MSG, "temperature": 0})
        assert post(server, {"model": "chat", "messages": MSG, "temperature": 0}).headers["x-cache"] == "MISS"


def test_streaming_and_non_streaming_serve_each_other(client, node):
    direct = client.chat.completions.create(model="chat", messages=MSG, temperature=0)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG, temperature=0, stream=True,
                                                           stream_options={"include_usage": True})  # fmt: skip
    assert raw.headers["x-cache"] == "HIT"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
    assert {c.model for c in chunks} == {"chat"}
    # and the other way: a streamed answer, stored, serves a non-streaming request
    other = [{"role": "user", "content": "And of Italy?"}]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="chat", messages=other, temperature=0, stream=True)
                       if c.choices)  # fmt: skip
    hit = client.chat.completions.with_raw_response.create(model="chat", messages=other, temperature=0)
    assert hit.headers["x-cache"] == "HIT"
    assert hit.parse().choices[0].message.content == streamed
    assert len(chats(node)) == 2


def test_a_stream_that_breaks_is_not_stored(proxy, node):
    node.behavior = Behavior(reply="one two three four", fail="error_mid_stream", fail_after_chunks=2, fail_times=1)
    body = {"model": "chat", "messages": MSG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-app-1"}) as resp:  # fmt: skip
        assert b'"error"' in resp.read()
    again = post(proxy, {**body, "stream": False})
    assert again.headers["x-cache"] == "MISS" and again.status_code == 200


def test_cache_control_opt_outs(proxy, node):
    body = {"model": "chat", "messages": MSG, "temperature": 0}
    assert post(proxy, body, **{"Cache-Control": "no-store"}).headers["x-cache"] == "MISS"
    assert post(proxy, body).headers["x-cache"] == "MISS"  # no-store stored nothing
    assert post(proxy, body, **{"Cache-Control": "no-cache"}).headers["x-cache"] == "MISS"  # skipped the read
    assert post(proxy, body).headers["x-cache"] == "HIT"
    assert len(chats(node)) == 3


def test_embeddings_are_cached_per_input(client, node):
    first = client.embeddings.create(model="embed", input=["alpha", "beta"])
    raw = client.embeddings.with_raw_response.create(model="embed", input=["beta", "gamma", "alpha"])
    second = raw.parse()
    embeds = [r[2] for r in node.requests if r[1] == "/api/embed"]
    assert embeds[-1]["input"] == ["gamma"]  # only what was not known went to the backend
    assert raw.headers["x-cache"] == "MISS" and raw.headers["x-cache-hits"] == "2"
    assert second.data[0].embedding == pytest.approx(first.data[1].embedding)
    assert second.data[2].embedding == pytest.approx(first.data[0].embedding)
    full = client.embeddings.with_raw_response.create(model="embed", input="gamma")  # base64 by default in the SDK
    assert full.headers["x-cache"] == "HIT"
    assert full.parse().data[0].embedding == pytest.approx(second.data[1].embedding, rel=1e-6)


def test_purge_empties_the_cache(proxy, node):
    body = {"model": "chat", "messages": MSG, "temperature": 0}
    post(proxy, body)
    assert post(proxy, body).headers["x-cache"] == "HIT"
    purged = httpx.delete(f"{proxy.url}/admin/cache", params={"model": "chat"})
    assert purged.status_code == 200 and purged.json()["purged"] >= 1
    assert post(proxy, body).headers["x-cache"] == "MISS"


# --- history --------------------------------------------------------------------------------------


def history(proxy, **params) -> list[dict]:
    resp = httpx.get(f"{proxy.url}/admin/history/requests", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def row(proxy, request_id: str) -> dict:
    assert wait_for(lambda: httpx.get(f"{proxy.url}/admin/history/requests/{request_id}").status_code == 200)
    return httpx.get(f"{proxy.url}/admin/history/requests/{request_id}").json()


def test_history_records_ok_and_error_rows(proxy, client):
    ok = client.chat.completions.with_raw_response.create(model="chat", messages=MSG)
    entry = row(proxy, ok.headers["x-request-id"])
    assert entry["status"] == "ok" and entry["http_status"] == 200
    assert entry["requested_model"] == "chat" and entry["resolved_model"] == "llama3.1:8b"
    assert entry["backend"] == "n1" and entry["attempts"] == 1 and entry["cache_hit"] is False
    assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
    assert entry["duration_seconds"] >= 0 and entry["finished_at"] is not None
    assert entry["key_id"] and "sk-app-1" not in str(entry)  # a short hash of the key, never the key
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MSG)
    failed = row(proxy, info.value.response.headers["x-request-id"])
    assert failed["status"] == "error" and failed["http_status"] == 404 and "nope" in failed["error"]


def test_history_marks_a_client_that_left_as_cancelled(proxy, node):
    node.behavior = Behavior(reply="word " * 200, tokens_per_second=50)
    body = {"model": "chat", "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-app-1"}) as resp:  # fmt: skip
        request_id = resp.headers["x-request-id"]
        chunks = resp.iter_raw()  # kept: dropping the iterator would close the response
        next(chunks)
        in_flight = row(proxy, request_id)
    assert in_flight["status"] == "in_progress"
    assert in_flight["finished_at"] is None and in_flight["duration_seconds"] is None
    assert wait_for(lambda: row(proxy, request_id)["status"] == "cancelled")
    assert wait_for(lambda: node.cancelled == 1)


def test_history_filters_and_pages(proxy, client):
    for _ in range(3):
        client.chat.completions.create(model="chat", messages=MSG)
    client.embeddings.create(model="embed", input="x")
    assert wait_for(lambda: len(history(proxy, limit=100)) >= 4)
    assert {r["endpoint"] for r in history(proxy, endpoint="/v1/embeddings")} == {"/v1/embeddings"}
    assert len(history(proxy, model="chat", status="ok")) == 3
    page = httpx.get(f"{proxy.url}/admin/history/requests", params={"limit": 2}).json()
    rest = httpx.get(f"{proxy.url}/admin/history/requests", params={"limit": 2, "cursor": page["next"]}).json()
    assert len(page["data"]) == 2 and not {r["id"] for r in page["data"]} & {r["id"] for r in rest["data"]}
    assert history(proxy, since="2999-01-01T00:00:00Z") == []
    bad = httpx.get(f"{proxy.url}/admin/history/requests", params={"status": "weird"})
    assert bad.status_code == 400 and "status" in bad.json()["error"]["message"]


# --- metrics --------------------------------------------------------------------------------------


def samples(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_a_known_sequence(proxy, client, node):
    for _ in range(3):
        client.chat.completions.create(model="chat", messages=MSG)
    client.chat.completions.create(model="chat", messages=MSG, temperature=0)
    client.chat.completions.create(model="chat", messages=MSG, temperature=0)  # a cache hit
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    m = samples(proxy.url)
    endpoint = ("endpoint", "/v1/chat/completions")
    assert m[("llm_proxy_requests_total", (("backend", "n1"), endpoint, ("model", "chat"), ("status", "200")))] == 4
    assert m[("llm_proxy_requests_total", (("backend", ""), endpoint, ("model", "chat"), ("status", "200")))] == 1
    assert m[("llm_proxy_requests_total", (("backend", ""), endpoint, ("model", "unknown"), ("status", "404")))] == 1
    assert m[("llm_proxy_cache_hits_total", (endpoint, ("model", "chat")))] == 1
    assert m[("llm_proxy_cache_misses_total", (endpoint, ("model", "chat")))] == 1
    assert m[("llm_proxy_overhead_seconds_count", (endpoint,))] == 6
    assert m[("llm_proxy_backend_up", (("backend", "n1"),))] == 1
    assert m[("llm_proxy_completion_tokens_total", (("backend", "n1"), ("model", "chat")))] > 0


def test_overhead_header_is_a_small_number(client):
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MSG)
    overhead = float(raw.headers["x-proxy-overhead-ms"])
    assert 0 <= overhead < 1000


# --- processes: several workers, SIGTERM under load -----------------------------------------------


def _serve(sim, tmp_path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = _config(sim, server={"host": "127.0.0.1", "port": port}, storage={"path": str(tmp_path / "p.db")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", proc)
    return proc, url


def test_metrics_add_up_across_worker_processes(node, tmp_path):
    proc, url = _serve(node, tmp_path, "--workers", "2")
    try:

        async def load():
            async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-app-1"}, timeout=10) as http:
                # fresh connections, so the kernel spreads them over both workers
                return await asyncio.gather(*(
                    http.post(f"{url}/v1/chat/completions", json={"model": "chat", "messages": MSG},
                              headers={"Connection": "close"}) for _ in range(40)
                ))  # fmt: skip

        assert all(r.status_code == 200 for r in asyncio.run(load()))
        key = ("llm_proxy_requests_total", (("backend", "n1"), ("endpoint", "/v1/chat/completions"),
                                            ("model", "chat"), ("status", "200")))  # fmt: skip
        for _ in range(4):  # whichever worker answers the scrape, the total is the same
            assert samples(url)[key] == 40
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_sigterm_under_load_loses_no_history_row(node, tmp_path):
    node.behavior = Behavior(reply="some words to stream out", tokens_per_second=60)
    proc, url = _serve(node, tmp_path)
    seen: list[str] = []

    async def load():
        async with httpx.AsyncClient(headers={"Authorization": "Bearer sk-app-1"}, timeout=20) as http:

            async def user():
                for _ in range(50):
                    try:
                        resp = await http.post(f"{url}/v1/chat/completions",
                                               json={"model": "chat", "messages": MSG})  # fmt: skip
                    except httpx.HTTPError:
                        return  # the server stopped taking connections
                    seen.append(resp.headers["x-request-id"])

            await asyncio.gather(*(user() for _ in range(6)))

    def stop_soon():
        wait_for(lambda: len(seen) >= 12, timeout=20)  # under load: some answered, more in flight
        proc.send_signal(signal.SIGTERM)

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    asyncio.run(load())
    stopper.join()
    assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert len(seen) > 6
    with sqlite3.connect(tmp_path / "p.db") as db:
        rows = dict(db.execute("SELECT id, status FROM requests WHERE endpoint = '/v1/chat/completions'").fetchall())
    assert set(seen) <= set(rows)  # every answered request has its row
    assert "in_progress" not in rows.values()
