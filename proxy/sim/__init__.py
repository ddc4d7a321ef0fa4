"""Simulated Ollama and vLLM nodes for end-to-end tests, ``llm-proxy demo`` and load tests.

Each sim is a real HTTP server on a loopback port that speaks the node's wire
protocol and can be scripted through :class:`Behavior` (latency, tool calls,
thinking, failures), in process or over ``/_sim/behavior``::

    with SimOllama() as ollama, SimVLLM(served_model_names=["qwen"]) as vllm:
        ollama.behavior.ttft = 0.2
        ...  # point the proxy at ollama.url and vllm.url
"""

from .behavior import Behavior, ModelSpec, PullBehavior
from .ollama import SimOllama
from .server import ServerThread
from .vllm import SimVLLM

__all__ = ["Behavior", "ModelSpec", "PullBehavior", "ServerThread", "SimOllama", "SimVLLM"]
