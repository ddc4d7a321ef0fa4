"""Shared fixtures: simulated backends and the proxy, each a real HTTP server on loopback."""

from __future__ import annotations

import openai
import pytest

from proxy.sim import Behavior, SimOllama, SimVLLM
from tests.support import VLLM_KEY, backends_config, ollama_models, running_proxy


@pytest.fixture(scope="session")
def ollama():
    with SimOllama(models=ollama_models()) as sim:
        yield sim


@pytest.fixture(scope="session")
def vllm():
    with SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"], api_key=VLLM_KEY) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _fresh_backends(request):
    """Each test starts with well-behaved backends and empty request logs."""
    for name in ("ollama", "vllm"):
        if name in request.fixturenames:
            sim = request.getfixturevalue(name)
            sim.behavior = Behavior()
            sim.reset()
    yield


@pytest.fixture(scope="session")
def proxy(ollama, vllm):
    with running_proxy(backends_config(ollama, vllm)) as server:
        yield server


@pytest.fixture
def client(proxy) -> openai.OpenAI:
    # max_retries=0: the SDK's own retries would hide the proxy's status codes.
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def aclient(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
