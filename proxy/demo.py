"""``llm-proxy demo``: the proxy in front of a simulated Ollama and a simulated vLLM, all on loopback."""

from __future__ import annotations

import os
import sys
import tempfile

from .config import parse_config
from .sim import Behavior, ModelSpec, SimOllama, SimVLLM
from .sim.behavior import PullBehavior
from .sim.ollama_wire import default_models

_INSTRUCTIONS = """\
llm-proxy demo is running on {url}

  Dashboard: {url}/ui/    (nodes, models, pulls with progress, operations, requests, charts)

  simulated Ollama "sim-ollama"       at {ollama}  (24 GB GPU: llama3.1:8b, qwen3:4b, gemma3:1b, nomic-embed-text)
  simulated Ollama "sim-ollama-small" at {ollama_small}  (8 GB GPU: gemma3:1b, nomic-embed-text)
  simulated vLLM   "sim-vllm"         at {vllm}  (serves qwen2.5-7b)

Public names: chat -> llama3.1:8b, small -> gemma3:1b, qwen -> qwen2.5-7b on vLLM, embed -> nomic-embed-text;
"auto" picks by task (default: chat). Any model a backend serves also works under its own name.
GPU tiers: nodes with 16 GB or more get llama3.1:8b and qwen3:4b, smaller ones gemma3:1b; every node holds
nomic-embed-text. Pulls in the demo take about 15 s, so the progress bars have time to move.

Try:
  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "chat", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "qwen", "stream": true, "messages": [{{"role": "user", "content": "Stream please"}}]}}'
  curl -s {url}/v1/embeddings -H 'content-type: application/json' -d '{{"model": "embed", "input": "hello"}}'
  llm-proxy status --url {url}
  llm-proxy pull mistral:7b --nodes auto --url {url}     (or from the dashboard's Models page)

or from Python:
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="chat", stream=True,
                                              messages=[{{"role": "user", "content": "Hi"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Press Ctrl-C to stop.
"""

DEMO_PULL_SECONDS = 15.0  # how long a pull takes on the demo's simulated nodes


def demo_behavior() -> Behavior:
    """A little pacing, so streaming is visible in a terminal, and pulls slow enough to watch."""
    return Behavior(ttft=0.05, tokens_per_second=30, pull=PullBehavior(seconds=DEMO_PULL_SECONDS))


def small_node_models() -> list[ModelSpec]:
    """What the demo's second, smaller Ollama node holds."""
    return [m for m in default_models() if m.name in ("gemma3:1b", "nomic-embed-text:latest")]


def demo_config(ollama_url: str, vllm_url: str, host: str, port: int, storage: str = ":memory:",
                ollama_small_url: str | None = None):  # fmt: skip
    ollama_nodes = [{"name": "sim-ollama", "kind": "ollama", "url": ollama_url, "gpu_memory_gb": 24}]
    if ollama_small_url:
        ollama_nodes.append({"name": "sim-ollama-small", "kind": "ollama", "url": ollama_small_url, "gpu_memory_gb": 8})
    return parse_config(
        {
            "server": {"host": host, "port": port},
            "storage": {"path": storage},
            "routing": {"default_model": "chat"},
            # The demo stays on this machine: the catalog answers from the shipped file alone.
            "catalog": {"ollama_url": "", "huggingface_url": ""},
            "distribution": {
                "tiers": [
                    {"min_gpu_memory_gb": 16, "models": ["llama3.1:8b", "qwen3:4b"]},
                    {"min_gpu_memory_gb": 0, "models": ["gemma3:1b"]},
                ],
                "baseline": ["nomic-embed-text"],
                "manifest_path": os.path.join(os.path.dirname(storage) or tempfile.gettempdir(), "manifest.json"),
            },
            "backends": [*ollama_nodes, {"name": "sim-vllm", "kind": "vllm", "url": vllm_url}],
            "models": [
                {
                    "name": "chat",
                    "target": "llama3.1:8b",
                    "backends": ["sim-ollama"],
                    "capabilities": ["chat", "tools"],
                },
                {"name": "small", "target": "gemma3:1b", "capabilities": ["chat"], "preference": 200},
                {
                    "name": "qwen",
                    "target": "qwen2.5-7b",
                    "backends": ["sim-vllm"],
                    "capabilities": ["code", "reasoning"],
                },
                {"name": "embed", "target": "nomic-embed-text", "capabilities": ["embedding"]},
            ],
        },
        env={},
    )


def run_demo(host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> int:
    from .app import create_app
    from .server import BindError, bind_socket, run

    try:
        # Listen first: the banner below must not promise a port that turns out to be taken.
        sock = bind_socket(host, port)
    except BindError as exc:
        print(f"llm-proxy demo: {exc}", file=sys.stderr)
        return 1
    # A little pacing, so streaming is visible in a terminal.
    paced = Behavior(ttft=0.05, tokens_per_second=30)
    ollama = SimOllama(behavior=demo_behavior()).start()
    ollama_small = SimOllama(models=small_node_models(), behavior=demo_behavior()).start()
    vllm = SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"], behavior=paced).start()
    try:
        port = sock.getsockname()[1]  # the one bound, should port be 0
        # The demo's history and cache live in a throwaway database.
        config = demo_config(ollama.url, vllm.url, host, port, tempfile.mkdtemp(prefix="llm-proxy-demo-") + "/demo.db",
                             ollama_small_url=ollama_small.url)  # fmt: skip
        url = f"http://{host}:{port}"
        print(_INSTRUCTIONS.format(url=url, ollama=ollama.url, ollama_small=ollama_small.url, vllm=vllm.url),
              file=sys.stderr, flush=True)  # fmt: skip
        started = run(create_app(config), config, sock, log_level=log_level)
    finally:
        ollama.stop()
        ollama_small.stop()
        vllm.stop()
        sock.close()
    return 0 if started else 1
