"""Backend adapters: one per wire protocol, each knowing nothing of routing."""

from ..config import BackendConfig, TimeoutConfig
from .base import Backend, Reply, ServedModel, Stream
from .ollama import OllamaBackend
from .openai import OpenAIBackend

__all__ = ["Backend", "Reply", "ServedModel", "Stream", "OllamaBackend", "OpenAIBackend", "make_backend"]


def make_backend(config: BackendConfig, timeouts: TimeoutConfig) -> Backend:
    if config.kind == "ollama":
        return OllamaBackend(config, timeouts)
    return OpenAIBackend(config, timeouts)  # vllm and openai speak the same protocol
