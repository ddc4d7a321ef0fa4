"""Usage for every stream: a final usage chunk whenever the client asks, numbers in history and metrics always."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest

from proxy.sim import Behavior, SimOllama, SimVLLM
from proxy.usage import UsageTap, relayed, source
from tests.support import ollama_models, running_proxy, wait_for

MSG = [{"role": "user", "content": "hi"}]
REPLY = "one two three four five"  # five tokens, one chunk each


# --- the tap, frame by frame ----------------------------------------------------------------------


def _chunk(content: str | None, **extra) -> bytes:
    delta = {"content": content} if content is not None else {}
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra}  # fmt: skip
    return b"data: " + orjson.dumps(body) + b"\n\n"


_USAGE_CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],' \
               b'"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'  # fmt: skip
_DONE = b"data: [DONE]\n\n"


def _run(tap: UsageTap, frames: list[bytes]) -> list[dict | str]:
    out = b"".join(tap.feed(f) for f in frames) + tap.flush()
    events = [e for e in out.split(b"\n\n") if e]
    return [e[6:].decode() if e == b"data: [DONE]" else orjson.loads(e[6:]) for e in events]


def test_a_missing_usage_chunk_is_counted_and_added_before_done():
    tap = UsageTap(count=True, prompt_estimate=lambda: 12)
    events = _run(tap, [_chunk(""), _chunk("one"), _chunk(" two"), _chunk(" three"), _chunk(None), _DONE])
    assert events[-1] == "[DONE]"
    added = events[-2]
    assert added["choices"] == [] and added["id"] == "c1" and added["model"] == "m"
    assert added["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert tap.tokens == (12, 3)


def test_events_split_across_frames_are_handled():
    whole = _chunk("one") + _chunk(" two") + _DONE
    tap = UsageTap(count=True, prompt_estimate=lambda: 1)
    events = _run(tap, [whole[:10], whole[10:50], whole[50:-5], whole[-5:]])
    assert [e["choices"][0]["delta"]["content"] for e in events[:2]] == ["one", " two"]
    assert events[2]["usage"]["completion_tokens"] == 2 and events[3] == "[DONE]"


def test_the_backends_usage_is_taken_not_estimated():
    tap = UsageTap(count=False, prompt_estimate=lambda: 99)
    events = _run(tap, [_chunk("a"), _USAGE_CHUNK + _DONE])
    assert [e if isinstance(e, str) else e.get("usage") for e in events[1:]] == [
        {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, "[DONE]"]  # fmt: skip
    assert tap.tokens == (7, 3)  # the backend's numbers, not an estimate


def test_a_client_that_did_not_ask_gets_no_usage_chunk():
    continuous = _chunk("b", usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})

    async def run() -> bytes:
        async def frames():
            for frame in (_chunk("a"), continuous, _USAGE_CHUNK + _DONE):
                yield frame

        tap = UsageTap(count=False, prompt_estimate=lambda: 0)
        return b"".join([f async for f in relayed(frames(), tap, drop_usage=True)])

    out = asyncio.run(run())
    assert out == _chunk("a") + continuous + _DONE  # only the trailing usage chunk goes


def test_a_client_that_asked_gets_the_backends_own_chunk():
    tap = UsageTap(count=True, prompt_estimate=lambda: 99)
    events = _run(tap, [_chunk("a"), _USAGE_CHUNK, _DONE])
    assert events[1]["usage"]["prompt_tokens"] == 7 and events[2] == "[DONE]"
    assert len(events) == 3


def test_usage_on_content_chunks_stays_there():
    continuous = _chunk("a", usage={"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8})
    tap = UsageTap(count=False, prompt_estimate=lambda: 0)
    events = _run(tap, [continuous, _DONE])
    assert events[0]["usage"]["completion_tokens"] == 1  # part of a content chunk: not removed
    assert tap.tokens == (7, 1)


def test_the_header_value_follows_the_kind_and_what_was_seen():
    assert source("ollama", None) == b"backend" and source("vllm", None) == b"backend"
    assert source("openai", None) == b"backend-or-counted"
    assert source("openai", True) == b"backend" and source("openai", False) == b"counted"


# --- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sims():
    with SimOllama(models=ollama_models()) as ollama, \
            SimVLLM(model="qwen", api_key=None) as vllm, \
            SimVLLM(model="tiny", stream_usage=False) as llamacpp:  # fmt: skip
        yield ollama, vllm, llamacpp


@pytest.fixture(scope="module")
def proxy(sims):
    ollama, vllm, llamacpp = sims
    config = {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "cache": {"mode": "off"},
        "backends": [
            {"name": "ollama", "kind": "ollama", "url": ollama.url},
            {"name": "vllm", "kind": "vllm", "url": vllm.url},
            {"name": "llamacpp", "kind": "openai", "url": llamacpp.url},
        ],
        "models": [
            {"name": "local", "target": "llama3.1:8b"},
            {"name": "gpu", "target": "qwen"},
            {"name": "cpp", "target": "tiny"},
        ],
    }
    with running_proxy(config) as server:
        yield server


@pytest.fixture
def client(proxy, sims):
    for sim in sims:
        sim.behavior = Behavior(reply=REPLY)
        sim.reset()
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _stream(client, model: str, include_usage: bool | None):
    options = {"include_usage": include_usage} if include_usage is not None else None
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG, stream=True,
                                                           stream_options=options)  # fmt: skip
    return raw, list(raw.parse())


def _row(proxy, request_id: str) -> dict:
    url = f"{proxy.url}/admin/history/requests/{request_id}"
    assert wait_for(lambda: httpx.get(url).json().get("status") == "ok"), httpx.get(url).text
    return httpx.get(url).json()


@pytest.mark.parametrize("model", ["local", "gpu", "cpp"])
def test_include_usage_always_ends_with_a_usage_chunk(client, proxy, model):
    raw, chunks = _stream(client, model, True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5 and last.usage.prompt_tokens > 0
    assert sum(1 for c in chunks if c.usage) == 1
    row = _row(proxy, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (last.usage.prompt_tokens, 5)


def test_the_header_says_when_usage_is_counted(client, sims):
    _, _, llamacpp = sims
    first, chunks = _stream(client, "cpp", True)
    sent = [r[2] for r in llamacpp.requests if r[1] == "/v1/chat/completions"]
    assert sent[0]["stream_options"] == {"include_usage": True}  # asked for, ignored (like llama.cpp)
    assert chunks[-1].usage.prompt_tokens == 4 + 1  # estimated: one word and the message overhead
    second, _ = _stream(client, "cpp", True)
    assert first.headers["x-proxy-usage"] in ("backend-or-counted", "counted")  # another test may have run first
    assert second.headers["x-proxy-usage"] == "counted"  # now it is known that this backend sends none
    gpu, chunks = _stream(client, "gpu", True)
    assert gpu.headers["x-proxy-usage"] == "backend"
    assert chunks[-1].usage.prompt_tokens == 5  # the simulated vLLM's own count (words + 4)


@pytest.mark.parametrize("model", ["local", "gpu", "cpp"])
@pytest.mark.parametrize("include_usage", [None, False])
def test_history_and_metrics_count_streams_that_did_not_ask(client, proxy, sims, model, include_usage):
    def total(name: str) -> float:
        lines = httpx.get(f"{proxy.url}/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith(f"llm_proxy_{name}_total{{") and f'model="{model}"' in line)  # fmt: skip

    before = total("completion_tokens")
    raw, chunks = _stream(client, model, include_usage)
    assert all(c.usage is None for c in chunks)  # the client sees what it asked for: no usage chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    row = _row(proxy, raw.headers["x-request-id"])
    assert row["completion_tokens"] == 5 and row["prompt_tokens"] > 0
    assert wait_for(lambda: total("completion_tokens") == before + 5)
    if model == "gpu":
        _, vllm, _ = sims
        sent = [r[2] for r in vllm.requests if r[1] == "/v1/chat/completions"]
        assert sent[-1]["stream_options"]["include_usage"] is True  # the proxy asked on its own


def test_completions_streams_get_usage_too(proxy, client):
    for model in ("local", "gpu", "cpp"):
        chunks = list(client.completions.create(model=model, prompt="hello there", stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5, model


def test_a_cached_stream_from_a_backend_without_usage_replays_with_usage(sims):
    _, _, llamacpp = sims
    llamacpp.behavior = Behavior(reply=REPLY)
    config = {
        "backends": [{"name": "llamacpp", "kind": "openai", "url": llamacpp.url}],
        "models": [{"name": "cpp", "target": "tiny"}],
    }
    with running_proxy(config) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            first = list(client.chat.completions.create(model="cpp", messages=MSG, stream=True, temperature=0))
            raw = client.chat.completions.with_raw_response.create(
                model="cpp", messages=MSG, stream=True, temperature=0, stream_options={"include_usage": True}
            )
            replayed = list(raw.parse())
    assert all(c.usage is None for c in first)
    assert raw.headers["x-cache"] == "HIT"
    assert replayed[-1].usage is not None and replayed[-1].usage.completion_tokens == 5


def test_the_prompt_is_counted_by_the_servers_tokenizer_where_it_has_one():
    long_words = [{"role": "user", "content": "antidisestablishmentarianism is long"}]  # the sim counts 3 + 4
    with SimVLLM(model="tiny", llamacpp=True, behavior=Behavior(reply=REPLY)) as llamacpp:
        config = {
            "cache": {"mode": "off"},
            "backends": [{"name": "llamacpp", "kind": "openai", "url": llamacpp.url}],
            "models": [{"name": "cpp", "target": "tiny"}],
        }
        with running_proxy(config) as server:
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:

                def usage():
                    chunks = client.chat.completions.create(
                        model="cpp", messages=long_words, stream=True, stream_options={"include_usage": True}
                    )
                    return list(chunks)[-1].usage

                first = usage()  # nobody knows yet that this server sends no usage: estimated
                second = usage()  # now its tokenizer is asked while it generates
        paths = [r[1] for r in llamacpp.requests]
    assert first.prompt_tokens == 13  # the estimate: 36 bytes / 4 + 4 for the message
    assert second.prompt_tokens == 7  # the server's own count, template included
    assert first.completion_tokens == second.completion_tokens == 5
    assert paths.count("/apply-template") == 1 and paths.count("/tokenize") == 1


def test_a_server_without_a_tokenizer_is_not_asked_again(sims, proxy, client):
    _, _, llamacpp = sims  # answers 404 to /apply-template, like llama-cpp-python or LM Studio
    for _ in range(4):
        _stream(client, "cpp", True)
    assert [r[1] for r in llamacpp.requests].count("/apply-template") <= 1
