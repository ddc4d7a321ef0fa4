"""llm-proxy: an OpenAI-compatible gateway for self-hosted Ollama and vLLM nodes."""

__version__ = "0.1.0"
