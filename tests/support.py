"""Helpers the tests share: backend line-ups and a proxy started from a plain config dict."""

from __future__ import annotations

import contextlib
import tempfile
import time

from proxy.app import create_app
from proxy.config import parse_config
from proxy.sim import ModelSpec, ServerThread, SimOllama, SimVLLM

VLLM_KEY = "vllm-secret-key"
PROXY_KEY = "sk-proxy-test"


def ollama_models() -> list[ModelSpec]:
    return [
        ModelSpec("llama3.1:8b", capabilities=("completion", "tools")),
        ModelSpec("qwen3:4b", capabilities=("completion", "tools", "thinking")),
        ModelSpec("llava:7b", capabilities=("completion", "vision")),
        ModelSpec("nomic-embed-text:latest", capabilities=("embedding",), embedding_dim=16),
    ]


@contextlib.contextmanager
def running_proxy(config: dict):
    """A proxy under uvicorn on a free loopback port, serving ``config`` (a plain dict).

    Its SQLite file goes in a fresh temporary directory unless the config names one.
    """
    with tempfile.TemporaryDirectory(prefix="llm-proxy-test-") as tmp:
        if "path" not in config.get("storage", {}):
            config = {**config, "storage": {**config.get("storage", {}), "path": f"{tmp}/proxy.db"}}
        parsed = parse_config(config, env={})
        server = ServerThread(create_app(parsed), config=parsed)  # the protocol and timeouts `serve` uses
        server.start()
        try:
            yield server
        finally:
            server.stop()


def backends_config(ollama: SimOllama, vllm: SimVLLM) -> dict:
    return {
        "timeouts": {"connect": 2, "first_byte": 5, "idle": 5},
        "backends": [
            {"name": "ollama-1", "kind": "ollama", "url": ollama.url},
            {"name": "vllm-1", "kind": "vllm", "url": vllm.url, "api_key": VLLM_KEY},
        ],
        "models": [
            {"name": "chat", "target": "llama3.1:8b", "backends": ["ollama-1"]},
            {"name": "thinker", "target": "qwen3:4b"},
            {"name": "embed", "target": "nomic-embed-text"},
            {"name": "qwen-chat", "target": "qwen2.5-7b", "backends": ["vllm-1"]},
        ],
    }


def wait_for(predicate, timeout: float = 3.0) -> bool:
    """Poll a condition that another thread (a simulated backend) makes true a moment later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def reset_health(server) -> None:
    """Forget what the proxy learned about its backends' health, so one test's failures don't steer the next."""
    from proxy.health import BackendHealth

    health = server.app.state.services.catalog.health
    for name, old in list(health.items()):
        health[name] = BackendHealth(name, old.weight, old.config)
