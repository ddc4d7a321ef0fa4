"""``llm-proxy demo``: the proxy in front of a simulated Ollama and a simulated vLLM, all on loopback."""

from __future__ import annotations

import sys
import tempfile

from .config import parse_config
from .sim import Behavior, SimOllama, SimVLLM

_INSTRUCTIONS = """\
llm-proxy demo is running on {url}
  simulated Ollama at {ollama}  (llama3.1:8b, qwen3:4b, gemma3:1b, nomic-embed-text)
  simulated vLLM   at {vllm}  (serves qwen2.5-7b)

Public names: chat -> llama3.1:8b on Ollama, qwen -> qwen2.5-7b on vLLM, embed -> nomic-embed-text.
Any model a backend serves also works under its own name.

Try:
  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "chat", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "qwen", "stream": true, "messages": [{{"role": "user", "content": "Stream please"}}]}}'
  curl -s {url}/v1/embeddings -H 'content-type: application/json' -d '{{"model": "embed", "input": "hello"}}'

or from Python:
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="chat", stream=True,
                                              messages=[{{"role": "user", "content": "Hi"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Press Ctrl-C to stop.
"""


def demo_config(ollama_url: str, vllm_url: str, host: str, port: int, storage: str = ":memory:"):
    return parse_config(
        {
            "server": {"host": host, "port": port},
            "storage": {"path": storage},
            "backends": [
                {"name": "sim-ollama", "kind": "ollama", "url": ollama_url},
                {"name": "sim-vllm", "kind": "vllm", "url": vllm_url},
            ],
            "models": [
                {"name": "chat", "target": "llama3.1:8b", "backends": ["sim-ollama"]},
                {"name": "qwen", "target": "qwen2.5-7b", "backends": ["sim-vllm"]},
                {"name": "embed", "target": "nomic-embed-text"},
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
    ollama = SimOllama(behavior=paced).start()
    vllm = SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"], behavior=paced).start()
    try:
        port = sock.getsockname()[1]  # the one bound, should port be 0
        # The demo's history and cache live in a throwaway database.
        config = demo_config(ollama.url, vllm.url, host, port, tempfile.mkdtemp(prefix="llm-proxy-demo-") + "/demo.db")
        url = f"http://{host}:{port}"
        print(_INSTRUCTIONS.format(url=url, ollama=ollama.url, vllm=vllm.url), file=sys.stderr, flush=True)
        started = run(create_app(config), config, sock, log_level=log_level)
    finally:
        ollama.stop()
        vllm.stop()
        sock.close()
    return 0 if started else 1
