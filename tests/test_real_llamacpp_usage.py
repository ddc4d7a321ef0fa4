"""Opt-in: a real llama.cpp server sends no usage on streams; through the proxy the client gets it anyway.

Skipped unless LLM_PROXY_LLAMACPP_MODEL names a .gguf file and llama-cpp-python[server] is
installed (see tests/test_real_llamacpp.py for the commands).
"""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.support import running_proxy
from tests.test_real_llamacpp import MSG, llamacpp, pytestmark  # noqa: F401  (the fixture and the skip)


@pytest.fixture(scope="module")
def proxy(llamacpp):  # noqa: F811
    config = {
        "backends": [{"name": "llamacpp", "kind": "openai", "url": llamacpp}],
        "models": [{"name": "tiny", "target": "real-model"}],
    }
    with running_proxy(config) as server:
        yield server


def test_the_real_server_sends_no_usage_but_the_proxy_adds_it(proxy, llamacpp):  # noqa: F811
    body = {"model": "real-model", "messages": MSG, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{llamacpp}/v1/chat/completions", json=body, timeout=120) as resp:
        direct = [orjson.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    # no-store: the stream below must reach the server, not be replayed from this answer's cache entry.
    want = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0,
                                          extra_headers={"cache-control": "no-store"})  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSG, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())
    if not any(c.get("usage") for c in direct):  # what this test is about; newer servers may send it
        assert raw.headers["x-proxy-usage"] in ("backend-or-counted", "counted")
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    # One chunk per token holds for llama.cpp: the count matches the server's own non-streaming figure.
    assert usage.completion_tokens == want.usage.completion_tokens
    assert usage.prompt_tokens > 0
